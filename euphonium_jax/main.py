r"""Runs the stages a config names, in order, under one workdir.

  python -m euphonium_jax.main --config configs/sample.py --workdir /tmp/euph
  python -m euphonium_jax.main --config configs/pretrain.py --workdir /tmp/euph \
      --config.pretrain.steps=200

A stage whose finished checkpoint is already in the workdir is skipped. The config is
validated before anything compiles: a bad value exits non-zero with a message that names the
key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from euphonium_jax import config as config_lib
from euphonium_jax import workdir as workdir_lib

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
  with workdir_lib.lock(workdir):  # a second run on this workdir is refused, naming this one
    done = [n for n in config.stages
            if importlib.import_module(f"euphonium_jax.stages.{n}").is_done(workdir)]
    workdir_lib.record_run(workdir, config.to_json_best_effort(indent=2),
                           [n for n in config.stages if n not in done], done)
    for name in config.stages:
      stage = importlib.import_module(f"euphonium_jax.stages.{name}")
      if stage.is_done(workdir):
        logging.info("stage %s: finished checkpoint found in %s, skipping", name, workdir)
        print(f"[{name}] already finished in {workdir}; skipping")
        continue
      print(f"[{name}] starting")
      stage.run(config, workdir)


def workdir_error(workdir: str) -> str | None:
  """Why `workdir` cannot hold a run, as one line naming it and what to do; None if it can.

  Writability is tried, not inferred from permission bits (root, read-only mounts): the
  missing directories are made, a temporary file is written, and what was made is removed.
  """
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    return (f"--workdir={workdir} is a file, not a directory: give a directory (one that does "
            "not exist yet is created)")
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    return (f"--workdir={workdir} is under {parent}, which is a file, not a directory: give "
            "a path whose parents are directories")
  missing, d = [], path
  while d != parent:
    missing.append(d)
    d = os.path.dirname(d)
  made, where = [], path
  try:
    for where in reversed(missing):
      os.mkdir(where)
      made.append(where)
    where = path
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    return (f"--workdir={workdir} is not writable ({e.strerror or e}: {where}): give a "
            "directory you can write to, or change its permissions")
  finally:
    for d in reversed(made):
      os.rmdir(d)
  return None


def override_error(argv) -> str | None:
  """The first `--config.KEY` override of `argv` naming a key no config has, as one line with
  the closest keys; None if every override names a key (the error was something else)."""
  reference = config_lib.get_default_config()
  node_type = type(reference)  # a group of settings
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    node, seen = reference, "config"
    for part in arg[len("--config."):].split("=", 1)[0].split("."):
      if not isinstance(node, node_type):
        return (f"{arg}: {seen} is a setting ({type(node).__name__}), not a group of "
                f"settings: set it with --{seen}=VALUE")
      if part not in node:
        close = difflib.get_close_matches(part, list(node.keys()), n=3, cutoff=0.6)
        hint = (f"did you mean {' or '.join(f'--{seen}.{c}' for c in close)}?" if close else
                f"the keys under {seen} are {', '.join(sorted(node.keys()))}")
        return f"{arg}: {seen} has no key {part!r}; {hint}"
      node, seen = node[part], f"{seen}.{part}"
  return None


def parse_flags(argv) -> list[str]:
  """absl's flag parsing, with an override of an unknown config key as one line (ml_collections
  raises AttributeError / KeyError / TypeError from inside the parser) instead of a traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError):
    message = override_error(argv)
    if message is None:
      raise
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def start_subprocesses_without_fork() -> None:
  """Makes the MP4 writer start ffmpeg without a fork that runs Python code in the child.

  imageio-ffmpeg passes `preexec_fn=os.setpgrp` unless IMAGEIO_FFMPEG_NO_PREVENT_SIGINT is
  set; a preexec_fn makes subprocess fork() and run Python in the child of a multithreaded
  (JAX) process, which can deadlock (the warning JAX prints on every run). Without one,
  CPython starts ffmpeg from C (vfork + exec) and no Python code runs in the child. What is
  lost: ffmpeg shares our Ctrl-C, which stops the run anyway.
  """
  os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every read and write at INFO
  start_subprocesses_without_fork()
  if _WORKDIR.value is None:
    print("error: --workdir is required", file=sys.stderr)
    sys.exit(2)
  problem = workdir_error(_WORKDIR.value)
  if problem is not None:
    print(f"error: {problem}", file=sys.stderr)
    sys.exit(2)
  from euphonium_jax import checkpoint
  from euphonium_jax.models.wan import loading
  # Errors a user can act on, each one line that names the key or path, the problem and what
  # to do; anything else is a bug and keeps its traceback.
  user_errors = (config_lib.ConfigError, checkpoint.CheckpointError, workdir_lib.WorkdirInUse,
                 loading.WeightsError)
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except user_errors as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=parse_flags)
