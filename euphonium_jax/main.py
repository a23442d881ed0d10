r"""Runs the stages a config names, in order, under one workdir.

  python -m euphonium_jax.main --config configs/sample.py --workdir /tmp/euph
  python -m euphonium_jax.main --config configs/pretrain.py --workdir /tmp/euph \
      --config.pretrain.steps=200

A stage whose finished checkpoint is already in the workdir is skipped. The config is
validated before anything compiles: a bad value exits non-zero with a message that names the
key, the value and what is allowed.
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from euphonium_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file with get_config().", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and videos go.")


def initialize_distributed() -> None:
  """`jax.distributed.initialize` for a multi-process run (EUPHONIUM_DISTRIBUTED=1).

  The coordinator `host:port`, the number of processes and this process's id come from
  EUPHONIUM_COORDINATOR, EUPHONIUM_NUM_PROCESSES and EUPHONIUM_PROCESS_ID; any left unset is
  auto-detected by JAX (SLURM, Cloud TPU, Open MPI, ...; all unset: pure auto-detection).
  Cross-process collectives on CPU use gloo unless another implementation is configured.
  Must run before anything touches a JAX backend; a second call is a no-op.
  """
  import jax

  if jax.distributed.is_initialized():
    return
  if jax.config.jax_cpu_collectives_implementation in (None, "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  for key, var, kind in (("coordinator_address", "EUPHONIUM_COORDINATOR", str),
                         ("num_processes", "EUPHONIUM_NUM_PROCESSES", int),
                         ("process_id", "EUPHONIUM_PROCESS_ID", int)):
    value = os.environ.get(var, "").strip()
    if not value:
      continue
    try:
      kwargs[key] = kind(value)
    except ValueError:
      raise config_lib.ConfigError(f"{var}={value!r} must be an integer") from None
  jax.distributed.initialize(**kwargs)


def run(config, workdir: str) -> None:
  """Validates `config` and runs its stages in order (importable, for notebooks and tests)."""
  if os.environ.get("EUPHONIUM_DISTRIBUTED") == "1":
    initialize_distributed()
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  for name in config.stages:
    stage = importlib.import_module(f"euphonium_jax.stages.{name}")
    if stage.is_done(workdir):
      logging.info("stage %s: finished checkpoint found in %s, skipping", name, workdir)
      print(f"[{name}] already finished in {workdir}; skipping")
      continue
    print(f"[{name}] starting")
    stage.run(config, workdir)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every read and write at INFO
  if _WORKDIR.value is None:
    print("error: --workdir is required", file=sys.stderr)
    sys.exit(2)
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
