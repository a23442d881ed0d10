"""Config validation: every bad value is one clear error naming key, value and what is allowed."""

import os
import subprocess
import sys

import pytest

from euphonium_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**stages):
  c = config_lib.get_default_config()
  c.stages = stages.get("stages", ("vae", "pretrain"))
  return c


def _set(c, key, value):
  node = c
  parts = key.split(".")
  for p in parts[:-1]:
    node = node[p]
  with node.ignore_type():
    node[parts[-1]] = value
  return c


def test_default_config_is_valid():
  config_lib.validate(_cfg(), num_devices=8)
  config_lib.validate(_cfg(), num_devices=1)


@pytest.mark.parametrize("key, value, needle", [
    ("pretrain.steps", 0, "config.pretrain.steps = 0 is invalid: must be > 0"),
    ("vae_train.batch_size", -4, "config.vae_train.batch_size = -4 is invalid: must be > 0"),
    ("pretrain.lr", -1e-3, "config.pretrain.lr"),
    ("world.size", 30, "divisible by the VAE's spatial factor 4"),
    ("world.frames", 1, "must be >= 2"),
    ("model.patch_size", (1, 3, 3), "must be divisible by the patch size (3)"),
    ("model.heads", 3, "must divide config.model.width=128"),
    ("model.dtype", "float16", "allowed values are 'float32', 'bfloat16'"),
    ("model.remat", "sometimes", "config.model.remat = 'sometimes'"),
    ("pretrain.time_sampling", "beta", "allowed values are 'logit_normal', 'uniform'"),
    ("pretrain.ema_decay", 1.0, "must be in [0.0, 1.0)"),
    ("eval.split", "test", "config.eval.split = 'test'"),
    ("stages", ("vae", "train"), "each stage must be one of"),
    ("stages", (), "name at least one of"),
    ("mesh.shape", (3, 1), "must multiply to the device count (8)"),
    ("mesh.shape", (2, 2, 2), "needs one size per axis"),
    ("mesh.axes", ("data", "model"), "must include the axis 'fsdp'"),
    ("init.vae", "/no/such/checkpoint", "the checkpoint path does not exist"),
    ("pretrain.steps", "many", "expected type int, got str"),
    ("model.remat", 3, "expected type str, got int"),
])
def test_bad_values_name_key_value_and_allowed(key, value, needle):
  c = _set(_cfg(), key, value)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, num_devices=8)
  assert needle in str(e.value), str(e.value)
  assert f"config.{key}" in str(e.value), str(e.value)


def test_temporal_factor():
  c = _set(_cfg(), "vae.temporal_downsample", True)
  _set(c, "world.frames", 7)
  with pytest.raises(config_lib.ConfigError, match=r"config.world.frames = 7 .*temporal"):
    config_lib.validate(c, num_devices=1)


def test_unknown_keys():
  c = _cfg()
  c.unlock()
  c.pretrian = {"steps": 3}
  with pytest.raises(config_lib.ConfigError, match=r"config.pretrian is an unknown key"):
    config_lib.validate(c, num_devices=1)
  c = _cfg()
  c.pretrain.unlock()
  c.pretrain.stpes = 3
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.pretrain.stpes is an unknown key: allowed keys under "
                           r"config.pretrain are .*steps"):
    config_lib.validate(c, num_devices=1)


def test_stage_dependencies():
  c = _cfg(stages=("pretrain",))
  with pytest.raises(config_lib.ConfigError, match=r"config.init.vae = '' .*needs a VAE"):
    config_lib.validate(c, num_devices=1)
  c = _cfg(stages=("sample",))
  with pytest.raises(config_lib.ConfigError, match=r"config.init.pretrain = ''"):
    config_lib.validate(c, num_devices=1)


def test_cfg_needs_caption_dropout():
  c = _set(_cfg(), "eval.cfg_scale", 3.0)
  _set(c, "pretrain.caption_dropout", 0.0)
  with pytest.raises(config_lib.ConfigError, match=r"config.eval.cfg_scale = 3.0"):
    config_lib.validate(c, num_devices=1)


def test_sampling_section_is_validated():
  c = _set(_cfg(), "sampling.num_steps", 0)
  with pytest.raises(config_lib.ConfigError, match=r"sampling.num_steps"):
    config_lib.validate(c, num_devices=1)


def test_command_line_error_exits_nonzero_with_message(tmp_path):
  cmd = [sys.executable, "-m", "euphonium_jax.main", "--config",
         os.path.join(REPO, "configs", "pretrain.py"), "--workdir", str(tmp_path),
         "--config.world.size=30"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
  assert proc.returncode != 0
  assert "config.world.size = 30 is invalid" in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(os.path.join(tmp_path, "vae")), "nothing may run before validation"


def test_user_config_outside_repository(tmp_path):
  path = tmp_path / "my_config.py"
  path.write_text(
      "from euphonium_jax import config as config_lib\n"
      "def get_config():\n"
      "  c = config_lib.get_default_config()\n"
      "  c.stages = ('vae',)\n"
      "  c.vae_train.steps = -1\n"
      "  return c\n")
  cmd = [sys.executable, "-m", "euphonium_jax.main", "--config", str(path),
         "--workdir", str(tmp_path / "w")]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path),
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
  assert proc.returncode != 0
  assert "config.vae_train.steps = -1 is invalid: must be > 0" in proc.stderr, proc.stderr[-2000:]
