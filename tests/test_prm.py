"""The latent process reward model: network, losses, rollout cache, quality metrics, config."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from euphonium_jax import config as config_lib
from euphonium_jax import embedded, prm_report
from euphonium_jax.data import rollout_cache
from euphonium_jax.models import prm as models_prm
from euphonium_jax.rl import prm_losses
from conftest import tiny_world_config as tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@jax.jit
def perturb(tree, key, scale=0.05):
  """Noise on every leaf, so that zero-initialised (adaLN-zero) layers come alive."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      treedef, [l + scale * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def setup():
  """A tiny PRM (from the tiny config), its pure function, inputs of batch 3."""
  config = tiny_config()
  module = embedded.abstract("prm", config)  # shapes and logical names; weights below
  graphdef, params, rest = embedded.split_params(module)
  params = perturb(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params),
                   jax.random.key(1), scale=0.1)
  k_tok, k_pool, k_x = jax.random.split(jax.random.key(2), 3)
  length, width = config.text.max_length, config.text.width
  cond = {"tokens": jax.random.normal(k_tok, (3, length, width)),
          "mask": jnp.arange(length)[None] < jnp.array([[6], [6], [1]]),
          "pooled": jax.random.normal(k_pool, (3, config.text.pooled_dim))}
  x = jax.random.normal(k_x, (3,) + embedded.latent_shape(config))
  t = jnp.array([0.9, 0.5, 0.1])
  return dict(config=config, module=module, graphdef=graphdef, params=params, rest=rest,
              cond=cond, x=x, t=t, fn=jax.jit(embedded.prm_fn(graphdef)))


# ---------------------------------------------------------------------------- Network


def test_shapes_and_logical_names(setup):
  s = setup["fn"]((setup["params"], setup["rest"]), setup["x"], setup["t"], setup["cond"])
  assert s.shape == (3,) and s.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(s)))
  specs = nnx.get_partition_spec(nnx.state(setup["module"], nnx.Param))
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      nnx.state(setup["module"], nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
    names = leaf.get_metadata().get("out_sharding")
    assert names is not None and len(names) == len(leaf.get_value().shape), (path, names)
  assert specs is not None
  # The sigmoid output option.
  sig = embedded.prm_fn(setup["graphdef"], sigmoid=True)(
      (setup["params"], setup["rest"]), setup["x"], setup["t"], setup["cond"])
  np.testing.assert_allclose(sig, jax.nn.sigmoid(s), rtol=1e-5)


def test_depends_on_time_text_and_latent(setup):
  fn, p = setup["fn"], (setup["params"], setup["rest"])
  x, t, cond = setup["x"], setup["t"], setup["cond"]
  s = fn(p, x, t, cond)
  assert float(jnp.abs(fn(p, x, t[::-1], cond) - s).max()) > 1e-4
  assert float(jnp.abs(fn(p, x + 0.5, t, cond) - s).max()) > 1e-4
  swapped = jax.tree.map(lambda a: a[jnp.array([1, 0, 2])], cond)
  assert float(jnp.abs(fn(p, x, t, swapped) - s)[:2].max()) > 1e-4


def test_differentiable_in_latent(setup):
  fn, p = setup["fn"], (setup["params"], setup["rest"])
  x, t, cond = setup["x"], setup["t"], setup["cond"]
  total = jax.jit(lambda y: jnp.sum(fn(p, y, t, cond)))
  grad = jax.jit(jax.grad(total))(x)
  assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad)))
  assert float(jnp.abs(grad).max()) > 0
  # Per-sample: the gradient of sample 0 does not depend on the other samples.
  g0 = jax.jit(jax.grad(lambda y: jnp.sum(fn(p, y, t, cond)[0])))(x)
  np.testing.assert_allclose(grad[:1], g0[:1], rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(g0[1:]).max()) == 0.0
  # Central finite difference along a random direction.
  d = jax.random.normal(jax.random.key(3), x.shape)
  eps = 1e-2
  fd = (total(x + eps * d) - total(x - eps * d)) / (2 * eps)
  np.testing.assert_allclose(float(jnp.vdot(grad, d)), float(fd), rtol=2e-2, atol=1e-3)


def test_init_from_base_copies_the_trunk(setup):
  config = setup["config"]
  _, base, _ = embedded.split_params(embedded.abstract("model", config))
  rng = np.random.default_rng(5)
  base = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), base)
  out = models_prm.init_from_base(setup["params"], base)
  for key in ("embed", "t_fc1", "t_fc2", "pooled_proj"):
    for a, b in zip(jax.tree.leaves(out[key]), jax.tree.leaves(base[key])):
      np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(out["blocks"][0]), jax.tree.leaves(base["blocks"][0])):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(out["queries"], setup["params"]["queries"])
  config.prm.width = 2 * config.model.width
  _, wide, _ = embedded.split_params(embedded.abstract("prm", config))
  config.prm.width = 0
  with pytest.raises(ValueError, match="do not match"):
    models_prm.init_from_base(wide, base)


# ----------------------------------------------------------------------------- Losses


def _minimise(loss, x0, steps=500, lr=0.5):
  """Gradient descent on a scalar, in one compiled loop."""
  g = jax.grad(loss)
  return jax.jit(lambda x: jax.lax.fori_loop(0, steps, lambda _, x: x - lr * g(x), x))(x0)


def test_regression_loss_minimiser_is_the_mean():
  r = jnp.array([0.1, 0.4, 0.9, 0.6])
  np.testing.assert_allclose(prm_losses.regression_loss(jnp.zeros(4), r), np.mean(r**2),
                             rtol=1e-6)
  s = _minimise(lambda c: prm_losses.regression_loss(jnp.full(4, c), r), jnp.float32(0.0))
  np.testing.assert_allclose(s, r.mean(), rtol=1e-4)


def test_bce_loss_minimiser_is_the_log_odds():
  r = jnp.array([0.9, 0.7, 0.2, 0.6, 0.1])  # 3 of 5 above 0.5
  np.testing.assert_allclose(prm_losses.bce_loss(jnp.zeros(5), r, 0.5), np.log(2), rtol=1e-6)
  s = _minimise(lambda c: prm_losses.bce_loss(jnp.full(5, c), r, 0.5), jnp.float32(0.0),
                steps=2000, lr=2.0)
  np.testing.assert_allclose(s, np.log(0.6 / 0.4), rtol=1e-3)
  # Against the textbook formula at a few logits.
  s = jnp.array([-2.0, 0.3, 1.5, 0.0, 4.0])
  y = (r > 0.5).astype(float)
  p = jax.nn.sigmoid(s)
  expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
  np.testing.assert_allclose(prm_losses.bce_loss(s, r, 0.5), expected, rtol=1e-5)


def test_bradley_terry_minimiser_and_groups():
  # Groups of two (item A, item B); A wins in 3 of 4 groups: the optimum s_A - s_B = logit(3/4).
  r = jnp.array([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
  group = jnp.array([0, 0, 1, 1, 2, 2, 3, 3])
  is_a = jnp.array([1, 0] * 4, bool)
  loss = lambda d: prm_losses.bradley_terry_loss(jnp.where(is_a, d, 0.0), r, group)
  np.testing.assert_allclose(loss(0.0), np.log(2), rtol=1e-6)
  d = _minimise(loss, jnp.float32(0.0), steps=3000, lr=2.0)
  np.testing.assert_allclose(d, np.log(3.0), rtol=1e-3)
  # Pairs never cross groups: ties within every group -> no pair -> 0, whatever s is.
  tied = jnp.array([0.2, 0.2, 0.9, 0.9])
  assert float(prm_losses.bradley_terry_loss(jnp.array([5.0, -5.0, 1.0, 3.0]), tied,
                                             jnp.array([0, 0, 1, 1]))) == 0.0
  # The margin drops near-ties.
  s, r2, g2 = jnp.array([0.0, 1.0]), jnp.array([0.55, 0.5]), jnp.array([0, 0])
  assert float(prm_losses.bradley_terry_loss(s, r2, g2, margin=0.1)) == 0.0
  np.testing.assert_allclose(prm_losses.bradley_terry_loss(s, r2, g2),
                             np.log1p(np.exp(1.0)), rtol=1e-6)
  with pytest.raises(ValueError, match="allowed values"):
    prm_losses.prm_loss("hinge", s, r2, g2)


# ------------------------------------------------------------------------------ Cache


class _Maker:
  def __init__(self, offset=0.0):
    self.calls, self.offset = [], offset

  def __call__(self, i):
    self.calls.append(i)
    return {"x": np.full((2, 3), i + self.offset, np.float32), "y": np.arange(2) + 10 * i,
            "grid": np.linspace(1, 0, 4)}


def _load(directory, fp, maker, n=3):
  return rollout_cache.load_or_make(str(directory), fp, n, maker, keys=("x", "y"),
                                    ingredients={"what": "test"}, progress=False)


def test_cache_round_trip_and_resume(tmp_path):
  maker = _Maker()
  first = _load(tmp_path, "fp1", maker)
  assert maker.calls == [0, 1, 2] and first["x"].shape == (6, 3)
  np.testing.assert_array_equal(first["y"], [0, 1, 10, 11, 20, 21])
  with np.load(rollout_cache.chunk_path(str(tmp_path), 1)) as f:  # inspectable .npz
    assert set(f.files) == {"x", "y", "grid", "fingerprint"} and str(f["fingerprint"]) == "fp1"
  again = _Maker()
  second = _load(tmp_path, "fp1", again, n=4)  # more chunks: only the new one is made
  assert again.calls == [3]
  np.testing.assert_array_equal(second["x"][:6], first["x"])


def test_cache_fingerprint_mismatch_regenerates(tmp_path, capsys):
  _load(tmp_path, "fp1", _Maker())
  maker = _Maker(offset=100.0)
  out = _load(tmp_path, "fp2", maker)
  assert maker.calls == [0, 1, 2] and float(out["x"][0, 0]) == 100.0
  assert "different base model, reward or config" in capsys.readouterr().out
  assert _load(tmp_path, "fp2", _Maker())["x"][0, 0] == 100.0  # now reused


def test_cache_truncated_or_incomplete_chunk_regenerates(tmp_path, capsys):
  _load(tmp_path, "fp1", _Maker())
  path = rollout_cache.chunk_path(str(tmp_path), 1)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  maker = _Maker()
  out = _load(tmp_path, "fp1", maker)
  assert maker.calls == [1] and out["x"].shape == (6, 3)
  printed = capsys.readouterr().out
  assert "truncated or corrupt" in printed and path in printed
  rollout_cache.write_chunk(str(tmp_path), 2, {"x": np.zeros((2, 3))}, "fp1")  # lacks "y"
  maker = _Maker()
  _load(tmp_path, "fp1", maker)
  assert maker.calls == [2]


def test_digest_and_fingerprint():
  a = {"w": np.ones(3), "b": [np.zeros(2)]}
  assert rollout_cache.digest_arrays(a) == rollout_cache.digest_arrays(
      {"b": [np.zeros(2)], "w": np.ones(3)})
  assert rollout_cache.digest_arrays(a) != rollout_cache.digest_arrays(
      {"w": np.ones(3) * 1.0001, "b": [np.zeros(2)]})
  assert rollout_cache.fingerprint({"a": 1, "b": 2}) == rollout_cache.fingerprint({"b": 2, "a": 1})
  assert rollout_cache.fingerprint({"a": 1}) != rollout_cache.fingerprint({"a": 2})


# ---------------------------------------------------------------------------- Quality


def test_spearman_matches_scipy_and_buckets():
  rng = np.random.default_rng(0)
  r = rng.normal(size=40)
  noise = np.linspace(3.0, 0.0, 5)  # step 4 (t = 0) sees the reward exactly
  values = r[:, None] + noise[None] * rng.normal(size=(40, 5))
  values[:, 0] = np.round(values[:, 0])  # ties
  t = np.array([1.0, 0.75, 0.5, 0.25, 0.0])
  groups = np.arange(40) // 8
  table = prm_report.correlation_table(values, r, t, (0.0, 0.5, 1.0), groups)
  for row, s in zip(table["per_step"], range(5)):
    np.testing.assert_allclose(row["spearman"], stats.spearmanr(values[:, s], r)[0], rtol=1e-9)
  assert table["per_step"][4]["spearman"] == pytest.approx(1.0)
  assert table["per_step"][4]["within_group"] == pytest.approx(1.0)
  lo, hi = table["per_bucket"]
  assert lo["steps"] == [3, 4] and hi["steps"] == [0, 1, 2] and lo["num_states"] == 80
  pooled = np.concatenate([values[:, 3], values[:, 4]])
  np.testing.assert_allclose(lo["spearman"], stats.spearmanr(pooled, np.tile(r, 2))[0])
  assert np.isnan(prm_report.spearman(np.ones(5), np.arange(5)))
  p = prm_report.paired_stats(np.array([1.0, 2.0, 3.0]), np.zeros(3))
  assert p["mean"] == 2.0 and p["stderr"] == pytest.approx(1 / np.sqrt(3))
  assert prm_report.nan_to_none({"a": [float("nan"), 1.0]}) == {"a": [None, 1.0]}


# ----------------------------------------------------------------------------- Config


def test_prm_stage_config_is_valid_and_data_sampler_is_unguided():
  from euphonium_jax.stages import prm as prm_stage
  config = tiny_config()
  config_lib.validate(config)
  assert "prm" in config_lib.IMPLEMENTED_STAGES
  config.prm.data.sampler = "euphonium"  # guided preset: the data sampler switches it off
  sampler = prm_stage.data_sampler(config)
  assert sampler.guidance.mode == "off" and sampler.num_steps == config.prm.data.num_steps
  assert sampler.eta == 0.25
  config.prm.data.eta = 0.5
  assert prm_stage.data_sampler(config).eta == 0.5


def test_training_labels_follow_the_target():
  from euphonium_jax.stages import prm as prm_stage
  config = tiny_config()
  r = np.array([0.3, 1e-6, 0.9, 0.0])
  config.prm.target = "quantile"
  np.testing.assert_allclose(prm_stage.labels(config, r), [0.625, 0.375, 0.875, 0.125])
  config.prm.target = "log"
  np.testing.assert_allclose(prm_stage.labels(config, r), np.log(r + 1e-3), rtol=1e-6)
  config.prm.target = "reward"
  np.testing.assert_allclose(prm_stage.labels(config, r), r, rtol=1e-6)
  config.prm.target, config.prm.loss = "log", "bce"  # bce / bradley_terry: the reward itself
  np.testing.assert_allclose(prm_stage.labels(config, r), r, rtol=1e-6)


@pytest.mark.parametrize("key,value,needle", [
    ("prm.loss", "hinge", "allowed values are 'regression', 'bce', 'bradley_terry'"),
    ("prm.data.sampler", "ddim", "allowed values are"),
    ("prm.reward", "nope", "registered rewards are"),
    ("prm.depth", 5, "must be <= model.depth=1"),
    ("prm.width", 48, "must be 0 or model.width=32"),
    ("prm.heads", 3, "must divide the PRM width"),
    ("prm.data.num_prompts", 6, "multiple of prm.data.chunk_prompts=4"),
    ("prm.report.time_buckets", (0.0, 0.5, 0.5, 1.0), "strictly increasing"),
    ("prm.report.guidance_t", 1.0, "must be in [0.0, 1.0)"),
    ("prm.steps", 0, "must be > 0"),
    ("prm.data.eta", -0.1, "must be >= 0"),
    ("prm.data.split", "test", "allowed values are"),
    ("prm.states", "fresh", "allowed values are 'rollout', 'renoised', 'both'"),
    ("prm.target", "rank", "allowed values are 'reward', 'log', 'quantile'"),
])
def test_bad_prm_values_name_key_value_and_allowed(key, value, needle):
  config = tiny_config()
  section, name = key.rsplit(".", 1)
  node = config
  for part in section.split("."):
    node = node[part]
  node[name] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert f"config.{key} = {value!r}" in str(e.value) and needle in str(e.value)


def test_bradley_terry_needs_whole_groups_and_stage_needs_a_base_model():
  config = tiny_config()
  config.prm.loss = "bradley_terry"
  config.prm.batch_size = 18
  with pytest.raises(config_lib.ConfigError, match="multiple of prm.data.group_size=4"):
    config_lib.validate(config)
  config = tiny_config()
  config.prm.width = 48
  config.prm.heads = 4
  config.prm.init_from_base = False  # a PRM of its own width is fine when not copied
  config_lib.validate(config)
  config.stages = ("prm",)
  with pytest.raises(config_lib.ConfigError, match="the prm stage needs a flow model"):
    config_lib.validate(config)


# ------------------------------------------------------------------------- End to end


@pytest.mark.slow
def test_stage_end_to_end_on_a_random_base(tmp_path):
  """The stage on an untrained tiny base: cache, checkpoint, report files and their keys."""
  import json
  from euphonium_jax import checkpoint, main
  config = tiny_config()
  base = str(tmp_path / "base")
  tree = {}
  rng = np.random.default_rng(0)  # random weights from the shapes (no compiled initialisers)
  fill = lambda a: (0.05 * rng.standard_normal(a.shape)).astype(a.dtype)
  for kind in ("vae", "text", "model"):
    _, p, r = embedded.split_params(embedded.abstract(kind, config))
    tree[kind] = {"params": jax.tree.map(fill, p),
                  "rest": jax.tree.map(lambda a: np.ones(a.shape, a.dtype), r)}
  checkpoint.save_final(base, tree, {})
  config.stages = ("prm",)
  config.init.pretrain = base
  config.prm.update(steps=4, log_every=2, ckpt_every=2)
  config.prm.data.update(num_prompts=4, num_steps=2)
  config.prm.report.ode_steps = 1
  workdir = str(tmp_path / "work")
  main.run(config, workdir)
  out = os.path.join(workdir, "prm")
  assert checkpoint.is_done(os.path.join(out, "final"))
  assert os.path.getsize(os.path.join(out, "report.png")) > 0
  with open(os.path.join(out, "report.json")) as f:
    rep = json.load(f)
  assert rep["num_rollouts"] == 16 and len(rep["correlation"]["per_bucket"]) == 4
  assert {"grad_minus_random", "reward_base", "t"} <= set(rep["guidance_check"])
  with np.load(rollout_cache.chunk_path(os.path.join(out, "cache", "train"), 0)) as f:
    assert f["latents"].shape == (16, 3, 4, 4, 4, 4) and f["reward"].shape == (16,)
  g, p, r = embedded.load("prm", config, os.path.join(out, "final"))
  assert "text" in checkpoint.load_final(os.path.join(out, "final"))
