"""The shipped assets load, and the base model's reward matches the recorded number."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from euphonium_jax import checkpoint, config as config_lib, generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "assets", "embedded")


def _sample_config():
  spec = importlib.util.spec_from_file_location("s", os.path.join(REPO, "configs", "sample.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def test_assets_are_finished_and_small():
  assert checkpoint.is_done(ASSETS)
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(
      os.path.join(REPO, "assets")) for f in fs)
  assert total < 30e6, f"shipped assets are {total / 1e6:.1f} MB"
  info = checkpoint.read_info(ASSETS)
  for key in ("reward_mean", "reward_stderr", "num_prompts", "steps"):
    assert key in info


@pytest.mark.slow
def test_base_model_reward_matches_record():
  """Fresh held-out samples (another seed) score the recorded mean within sampling error."""
  config = _sample_config()
  config_lib.validate(config)
  info = checkpoint.read_info(ASSETS)
  gen = generate.Generator.from_checkpoint(config, ASSETS)
  res = gen.evaluate(jax.random.key(12345), "/tmp/euph_asset_test", "check")
  se = np.hypot(res["reward_stderr"], info["reward_stderr"])
  assert abs(res["reward_mean"] - info["reward_mean"]) < 4 * se + 1e-6, (res, info)
  # Headroom for RL: clearly below ground truth (>= 0.9), clearly above noise.
  assert 0.2 < res["reward_mean"] < 0.9
