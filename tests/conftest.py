"""Test setup: 8 forced CPU devices, set before JAX starts (multi-device paths are tested on CPU),
a compilation cache shared by the suite's processes, and the tiny world's random init.

The persistent compilation cache lives in a fresh temporary folder per test session (so every
program is still compiled at least once per session, as on a clean machine) and is inherited
through the environment by the subprocesses the tests start (multi-process runs, servers, the
notebook's kernel): the many end-to-end runs of the tiny config compile the same programs once.
`JAX_COMPILATION_CACHE_DIR` set by the caller is used as given (and kept).
"""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _OWN_CACHE = tempfile.mkdtemp(prefix="euphonium_test_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end tests (tiny configs, still seconds to minutes)")


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def tiny_world_config():
  """configs/tiny.py: the tiny world's sizes (4 frames of 16x16, one-layer networks)."""
  from euphonium_jax import config as config_lib
  return config_lib.from_file(os.path.join(REPO, "configs", "tiny.py"))


def use_tiny_world(config):
  """`config` with the tiny world's world, VAE, model, text encoder and PRM sizes."""
  tiny = tiny_world_config()
  for key in ("world", "vae", "model", "text", "prm"):
    config[key] = tiny[key]
  return config


@pytest.fixture(scope="session")
def tiny_init(tmp_path_factory):
  """Finished `pretrain` (model, VAE, text encoder) and `prm` directories of the tiny world,
  freshly initialised and stored as host arrays, so that any device topology can load them."""
  import jax
  import numpy as np
  from euphonium_jax import checkpoint, embedded
  cfg = tiny_world_config()
  root = tmp_path_factory.mktemp("init")
  host = lambda tree: jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)
  nets = {kind: embedded.split_params(embedded.build(kind, cfg, seed=i))
          for i, kind in enumerate(("model", "vae", "text", "prm"))}
  entry = lambda kind: {"params": host(nets[kind][1]), "rest": host(nets[kind][2])}
  checkpoint.save_final(str(root / "pretrain"), {k: entry(k) for k in ("model", "vae", "text")},
                        {"stage": "pretrain", "note": "random init (test)"})
  checkpoint.save_final(str(root / "prm"), {"prm": entry("prm"), "text": entry("text")},
                        {"stage": "prm", "note": "random init (test)"})
  return str(root)
