"""The shipped assets load, and the base model's reward matches the recorded number."""

import os

import jax
import numpy as np
import pytest

from euphonium_jax import checkpoint, config as config_lib, generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "assets", "embedded")


def _sample_config():
  return config_lib.from_file(os.path.join(REPO, "configs", "sample.py"))


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


def test_shipped_prm_loads_and_ranks_as_recorded():
  """The PRM in assets/embedded/prm loads into config.prm's network, is differentiable in
  x_t, and its recorded held-out correlations meet the target (>= 0.5 for t <= 0.5)."""
  import jax.numpy as jnp
  from euphonium_jax import embedded

  config = _sample_config()
  directory = os.path.join(ASSETS, "prm")
  assert checkpoint.is_done(directory)
  tree = checkpoint.load_final(directory)
  g, p, r = embedded.load("prm", config, directory, tree)
  tg, tp, tr = embedded.load("text", config, directory, tree)
  ids, mask = embedded.tokenize(config, ["a red circle moving left", "a blue square moving up"])
  text = embedded.text_fn(tg)((tp, tr), ids, mask)
  prm = embedded.prm_fn(g)
  x = jax.random.normal(jax.random.key(0), (2,) + embedded.latent_shape(config))
  t = jnp.array([0.5, 0.3])
  value, grad = jax.value_and_grad(lambda x: prm((p, r), x, t, text).sum())(x)
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
  assert float(jnp.abs(grad).sum()) > 0
  info = checkpoint.read_info(directory)
  low_t = [v for k, v in info["spearman_by_bucket"].items() if float(k.split("-")[1]) <= 0.5]
  assert len(low_t) == 2 and min(low_t) >= 0.5, info["spearman_by_bucket"]
  assert info["guidance_grad_minus_random"]["z"] > 2
