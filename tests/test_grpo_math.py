"""The math of dual-reward GRPO (DESIGN.md sections 3 and 4) against naive implementations.

Every expected value here is computed by a numpy loop written in this file from the DESIGN.md
formulas (never by the module's own helpers):

1. group advantages: unbiased std, 1e-8, clipping, constant groups; Flow-GRPO's population
   std + 1e-4;
2. process advantages per (group, step) and the process-reward sources pre / post / delta;
3. the modes none / only / both select the right advantage terms;
4. the ratio is 1 at the rollout parameters (unguided and guided log-prob means), the clipped
   objective after a step matches a naive evaluation, and the accumulated gradient of the
   update is the gradient of `make_loss`;
5. `select_steps` (random subsets; Flow-GRPO's first K in order) and the networks' time
   t_model (Wan's truncated timesteps) in the update;
6. the exact Gaussian kernel KL;
7. the distillation oracle: minimising D alone makes the unguided sampler of the learned
   velocity reproduce the guided (exactly tilted) law of the Gaussian flow.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from euphonium_jax import sampling
from euphonium_jax.rl import grpo

from test_sampling_oracle import _k, exact_chain, oracle_prm, oracle_velocity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

N_STEPS = 8
GROUP = 4
BATCH = 8
DIM = 3


# ---------------------------------------------------------------------------- naive helpers


def naive_normalise(values, group_size, clip, ddof=1, eps=1e-8):
  """`[B, ...]` -> clip((v - mean) / (std + eps)) per group and trailing index (std with
  `ddof`); 0 for a group whose values are all equal. A float64 loop."""
  v = np.asarray(values, np.float64)
  out = np.zeros_like(v)
  flat_v = v.reshape(v.shape[0], -1)
  flat_o = out.reshape(v.shape[0], -1)
  for c in range(flat_v.shape[1]):
    for start in range(0, v.shape[0], group_size):
      grp = flat_v[start:start + group_size, c]
      if np.all(grp == grp[0]):
        continue
      mean = sum(grp) / len(grp)
      std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (len(grp) - ddof))
      for j, x in enumerate(grp):
        flat_o[start + j, c] = min(max((x - mean) / (std + eps), -clip), clip)
  return out


def naive_mean(x, v, t, t_next, g):
  """The unguided mean of DESIGN.md section 3, float64."""
  dt = t - t_next
  return x - dt * (v + g * g / (2.0 * t) * (x + (1.0 - t) * v))


def naive_logprob(x_next, mean, t, t_next, g):
  """Mean over latent dims of log N(x_next; mean, g^2 dt), float64."""
  var = g * g * (t - t_next)
  return float(np.mean(-0.5 * (x_next - mean) ** 2 / var - 0.5 * math.log(2 * math.pi * var)))


def lin_velocity(p, x, t, c):
  return p["w"] * x + p["b"] + 0 * t[:, None]


def lin_prm(p, x, t, c):
  return jnp.sum(x, axis=-1)


def np_lin_velocity(p, x):
  return float(p["w"]) * x + np.asarray(p["b"], np.float64)


def host(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ------------------------------------------------------------------------------- fixtures


PARAMS = {"w": jnp.float32(0.3), "b": jnp.array([0.1, -0.2, 0.05], jnp.float32)}


def make_batch(logprob_mean="unguided", n_outcome=2):
  """A real guided rollout of the linear field (euphonium preset, steps 4-7 guided) and its
  GRPO batch with `n_outcome` outcome terms."""
  cfg = sampling.preset("euphonium", num_steps=N_STEPS, group_size=GROUP,
                        guidance=dict(start=4), logprob_mean=logprob_mean)
  roll = sampling.make_rollout(lin_velocity, lin_prm, cfg, keep_means=True)
  r = jax.jit(roll, static_argnames="latent_shape")(PARAMS, None, jax.random.key(0), None,
                                                    (BATCH, DIM))
  rew = jnp.stack([jnp.sum(r.x0_hat, -1), jnp.sum(r.x0_hat ** 2, -1)][:n_outcome])
  adv_o = grpo.outcome_advantages(rew, GROUP, 5.0).T
  adv_p = grpo.process_advantages(r.process_rewards, GROUP, 5.0)
  steps = grpo.select_steps(jax.random.key(1), BATCH, N_STEPS, 0.6)
  batch = grpo.Batch(r.latents, r.logprobs, adv_o, adv_p, steps, None, r.means_guided,
                     r.guidance)
  return cfg, sampling.grid_arrays(cfg), r, batch


@pytest.fixture(scope="module")
def rollout_batch():
  return make_batch()


def naive_objective(params, ref, batch, arrs, hp):
  """Loss terms of `make_loss` written out: a loop over samples j and trained steps k."""
  p, pr = host(params), host(ref)
  lat, old_lp = np.asarray(batch.latents, np.float64), np.asarray(batch.logprobs, np.float64)
  adv_o, adv_p = np.asarray(batch.adv_outcome), np.asarray(batch.adv_process)
  mg = np.asarray(batch.means_guided, np.float64)
  steps = np.asarray(batch.steps)
  t_all, g_all = arrs.t.astype(np.float64), arrs.g.astype(np.float64)
  eps = hp.clip_range
  acc = dict(policy=[], kl=[], distill=[], ratio=[], approx_kl=[], clipped=[])
  for j in range(steps.shape[0]):
    for k in (int(s) for s in steps[j]):
      t, t_next, g = t_all[k], t_all[k + 1], g_all[k]
      x, x_next = lat[j, k], lat[j, k + 1]
      v = np_lin_velocity(p, x)
      mean = naive_mean(x, v, t, t_next, g)
      if hp.logprob_mean == "guided":
        mean = mean + np.asarray(batch.guidance, np.float64)[j, k]
      lp = naive_logprob(x_next, mean, t, t_next, g)
      ratio = math.exp(lp - old_lp[j, k])
      clipped = lambda a: max(-a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps))
      pol = 0.0
      if hp.mode in ("none", "both"):
        pol += sum(hp.outcome_coef * w * clipped(adv_o[j, i])
                   for i, w in enumerate(hp.outcome_weights))
      if hp.mode in ("only", "both"):
        pol += hp.process_coef * clipped(adv_p[j, k])
      # Exact KL of two Gaussians N(m1, s^2), N(m2, s^2) per dim, from the two step means.
      mean_ref = naive_mean(x, np_lin_velocity(pr, x), t, t_next, g)
      mean_unguided = naive_mean(x, v, t, t_next, g)
      var = g * g * (t - t_next)
      kl = float(np.mean((mean_unguided - mean_ref) ** 2 / (2 * var)))
      dist = float(np.mean((mean_unguided - mg[j, k]) ** 2 / (2 * var))) * arrs.guided[k]
      for name, val in (("policy", pol), ("kl", kl), ("distill", dist), ("ratio", ratio),
                        ("approx_kl", 0.5 * (lp - old_lp[j, k]) ** 2),
                        ("clipped", float(abs(ratio - 1) > eps))):
        acc[name].append(val)
  out = {name: float(np.mean(vals)) for name, vals in acc.items()}
  out["loss"] = out["policy"] + hp.kl_coef * out["kl"] + hp.distill_coef * out["distill"]
  out["ratios"] = np.array(acc["ratio"])
  return out


# -------------------------------------------------------------------- 1. group advantages


def test_outcome_advantages_match_naive_group_normalisation():
  """z-scores per group with ddof = 1 and + 1e-8, clipped; constant groups give exactly 0."""
  rng = np.random.default_rng(0)
  rew = (rng.normal(size=(2, 16)) * np.array([[3.0], [0.01]]) + np.array([[10.0], [-2.0]]))
  rew = rew.astype(np.float32)
  rew[0, 8:12] = np.float32(0.3)         # constant groups: 0.3 is not a binary fraction
  rew[1, 4:8] = np.float32(1234.5678)
  adv = np.asarray(grpo.outcome_advantages(jnp.asarray(rew), GROUP, 100.0))
  np.testing.assert_allclose(adv, naive_normalise(rew.T, GROUP, 100.0).T, atol=2e-5)
  assert np.all(adv[0, 8:12] == 0.0) and np.all(adv[1, 4:8] == 0.0)
  constant = {(0, 2), (1, 1)}
  for term in range(2):
    for grp in range(4):
      a = adv[term, grp * GROUP:(grp + 1) * GROUP].astype(np.float64)
      if (term, grp) in constant:
        continue
      # float32 rounding: term 1 has std 0.01 around -2 (z-scores good to ~2e-5).
      assert abs(a.mean()) < 1e-4, (term, grp, a)
      assert abs(a.std(ddof=1) - 1.0) < 1e-4, (term, grp, a.std(ddof=1))
  # Each term on its own: a row equals `normalise` of that row.
  np.testing.assert_array_equal(adv[1], np.asarray(grpo.normalise(jnp.asarray(rew[1]), GROUP,
                                                                 100.0)))
  # A small bound clips, and binds (a z-score of a group of 4 reaches 1.5).
  small = np.asarray(grpo.outcome_advantages(jnp.asarray(rew), GROUP, 0.5))
  np.testing.assert_allclose(small, naive_normalise(rew.T, GROUP, 0.5).T, atol=2e-5)
  assert np.max(np.abs(small)) == pytest.approx(0.5)
  assert np.sum(np.abs(small) == 0.5) >= 4
  # Group of 2 at +-1 with ddof = 1: std sqrt(2), z = +-1 / sqrt(2) (not +-1 as ddof = 0).
  z = np.asarray(grpo.normalise(jnp.array([1.0, -1.0]), 2, 5.0))
  np.testing.assert_allclose(z, np.array([1, -1]) / (math.sqrt(2) + 1e-8), rtol=1e-6)


def test_population_std_and_eps_match_naive():
  """Flow-GRPO's normalisation (population std, + 1e-4): outcome and process advantages
  against the naive loop; a group of 2 at +-1 gets +-1 / (1 + 1e-4), not +-1 / sqrt(2)."""
  rng = np.random.default_rng(5)
  rew = (rng.normal(size=(2, 16)) * np.array([[3.0], [1e-3]]) + np.array([[1.0], [0.0]]))
  rew = rew.astype(np.float32)
  rew[0, 4:8] = np.float32(0.3)
  kw = dict(adv_std="population", adv_eps=1e-4)
  adv = np.asarray(grpo.outcome_advantages(jnp.asarray(rew), GROUP, 5.0, **kw))
  want = naive_normalise(rew.T, GROUP, 5.0, ddof=0, eps=1e-4).T
  np.testing.assert_allclose(adv, want, atol=2e-5)
  assert np.all(adv[0, 4:8] == 0.0)
  # eps matters at std ~1e-3: 1e-4 shrinks those z-scores by std / (std + 1e-4), 10-20 %.
  plain = np.asarray(grpo.outcome_advantages(jnp.asarray(rew), GROUP, 5.0, "population"))
  std = np.repeat(rew[1].astype(np.float64).reshape(-1, GROUP).std(axis=1), GROUP)
  np.testing.assert_allclose(adv[1] / plain[1], std / (std + 1e-4), rtol=1e-4)
  assert np.all(std / (std + 1e-4) < 0.92)
  pr = rng.normal(size=(BATCH, 5)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(grpo.process_advantages(jnp.asarray(pr), GROUP, 5.0,
                                                                **kw)),
                             naive_normalise(pr, GROUP, 5.0, ddof=0, eps=1e-4), atol=2e-5)
  z = np.asarray(grpo.normalise(jnp.array([1.0, -1.0]), 2, 5.0, **kw))
  np.testing.assert_allclose(z, np.array([1, -1]) / (1 + 1e-4), rtol=1e-6)
  with pytest.raises(ValueError, match=r"grpo.adv_std = 'pop' is not allowed: .*sample"):
    grpo.normalise(jnp.array([1.0, -1.0]), 2, 5.0, adv_std="pop")


# ------------------------------------------------------------------ 2. process advantages


def test_process_advantages_per_group_and_step():
  rng = np.random.default_rng(1)
  n = 6
  pr = rng.normal(size=(BATCH, n)).astype(np.float32) * 2.0 + 1.0
  pr[:, :2] = 0.0                       # unscored steps carry 0
  pr[GROUP:, 3] = np.float32(-0.7)      # one constant (group, step) cell
  # Sources, written out.
  pre = pr.astype(np.float64)
  post = np.zeros_like(pre)
  for k in range(n - 1):
    post[:, k] = pre[:, k + 1]
  delta = post - pre
  for source, expected in (("pre", pre), ("post", post), ("delta", delta)):
    np.testing.assert_allclose(np.asarray(grpo.process_values(jnp.asarray(pr), source)),
                               expected, atol=1e-6)
    adv = np.asarray(grpo.process_advantages(jnp.asarray(pr), GROUP, 5.0, source))
    np.testing.assert_allclose(adv, naive_normalise(expected.astype(np.float32), GROUP, 5.0),
                               atol=2e-5)
  adv = np.asarray(grpo.process_advantages(jnp.asarray(pr), GROUP, 5.0))
  assert np.all(adv[:, :2] == 0.0) and np.all(adv[GROUP:, 3] == 0.0)
  for k in range(2, n):                 # every scored column: mean 0, unbiased std 1
    for grp in range(BATCH // GROUP):
      a = adv[grp * GROUP:(grp + 1) * GROUP, k].astype(np.float64)
      if (grp, k) == (1, 3):
        continue
      assert abs(a.mean()) < 1e-5 and abs(a.std(ddof=1) - 1.0) < 1e-5, (grp, k, a)
  # Columns are independent: normalising one column alone gives the same numbers.
  np.testing.assert_array_equal(adv[:, 4], np.asarray(grpo.normalise(jnp.asarray(pr[:, 4]),
                                                                     GROUP, 5.0)))
  with pytest.raises(ValueError, match="process_source"):
    grpo.process_values(jnp.asarray(pr), "bogus")


# ---------------------------------------------------------------------------- 3. modes


@pytest.mark.parametrize("mode", ["none", "only", "both"])
def test_modes_select_advantage_terms_at_ratio_one(rollout_batch, mode):
  """At the rollout parameters (ratio 1) the policy loss is -(c_o sum_i w_i mean A^o_i)
  ('none'), -(c_p mean over trained transitions of A^p) ('only') or their sum ('both')."""
  _, arrs, _, batch = rollout_batch
  # Normalised outcome advantages average to 0 over the batch (each sample has K transitions),
  # so the terms are told apart with arbitrary advantages (the loss takes them as given).
  rng = np.random.default_rng(4)
  batch = batch._replace(
      adv_outcome=jnp.asarray(rng.normal(0.5, 1.0, size=(BATCH, 2)), jnp.float32),
      adv_process=jnp.asarray(rng.normal(-0.3, 1.0, size=(BATCH, N_STEPS)), jnp.float32))
  hp = grpo.Hyper(mode=mode, outcome_coef=0.7, process_coef=1.3, outcome_weights=(1.0, 0.5))
  loss, met = jax.jit(grpo.make_loss(lin_velocity, arrs, hp))(PARAMS, PARAMS, batch)
  adv_o, adv_p = np.asarray(batch.adv_outcome, np.float64), np.asarray(batch.adv_process)
  steps = np.asarray(batch.steps)
  outcome = -0.7 * (adv_o[:, 0].mean() + 0.5 * adv_o[:, 1].mean())
  process = -1.3 * np.mean([adv_p[j, k] for j in range(BATCH) for k in steps[j]])
  expected = {"none": outcome, "only": process, "both": outcome + process}[mode]
  assert abs(outcome) > 0.1 and abs(process) > 0.1 and abs(outcome + process) > 0.1
  assert float(met["policy_loss"]) == pytest.approx(expected, abs=1e-5)
  assert float(loss) == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------- 4. ratio, clip, gradient


def test_ratio_one_then_clipped_objective_matches_naive(rollout_batch):
  """Stored log-probs are the naive ones; the first inner step has ratio 1 (loss -mean A);
  after one large step the clipped objective is the naive one from naive log-probs."""
  _, arrs, r, batch = rollout_batch
  # The rollout's log-probs are the naive Gaussian log-probs under the unguided mean.
  lat = np.asarray(r.latents, np.float64)
  for j in range(BATCH):
    for k in range(N_STEPS):
      t, t_next, g = (float(arrs.t[k]), float(arrs.t[k + 1]), float(arrs.g[k]))
      mean = naive_mean(lat[j, k], np_lin_velocity(host(PARAMS), lat[j, k]), t, t_next, g)
      assert float(r.logprobs[j, k]) == pytest.approx(
          naive_logprob(lat[j, k + 1], mean, t, t_next, g), abs=2e-4)
  # First inner step: ratio exactly 1, nothing clipped, the clipped loss is -mean A.
  hp = grpo.Hyper(mode="both")
  tx = optax.adam(0.05)
  update = jax.jit(grpo.make_update(lin_velocity, tx, arrs, hp, accumulation=2))
  state = {"params": PARAMS, "opt": tx.init(PARAMS), "ref": PARAMS}
  state2, met = update(state, batch)
  assert abs(float(met["ratio_mean"]) - 1.0) < 1e-6
  assert float(met["ratio_std"]) < 1e-3
  assert float(met["clip_fraction"]) == 0.0
  assert float(met["approx_kl"]) < 1e-10
  adv_p = np.asarray(batch.adv_process, np.float64)
  trained_p = [adv_p[j, k] for j, row in enumerate(np.asarray(batch.steps)) for k in row]
  expected = -float(np.mean(np.asarray(batch.adv_outcome, np.float64)[:, 0])
                    + np.mean(trained_p))
  assert abs(expected) > 0.05
  assert float(met["policy_loss"]) == pytest.approx(expected, abs=1e-5)
  # After one step with a large lr the ratio moves; the clipped objective, the ratio
  # statistics and approx_kl match the naive evaluation (a tight and a loose clip range).
  new = state2["params"]
  assert abs(float(new["w"]) - 0.3) > 0.01
  for eps in (1e-4, 0.05):
    hp = grpo.Hyper(mode="both", outcome_coef=0.7, process_coef=1.3, outcome_weights=(1.0, 0.5),
                    clip_range=eps)
    _, met = jax.jit(grpo.make_loss(lin_velocity, arrs, hp))(new, PARAMS, batch)
    ref = naive_objective(new, PARAMS, batch, arrs, hp)
    assert np.std(ref["ratios"]) > 1e-2
    assert float(met["policy_loss"]) == pytest.approx(ref["policy"], rel=1e-4, abs=1e-5)
    assert float(met["ratio_mean"]) == pytest.approx(ref["ratio"], rel=1e-5)
    assert float(met["approx_kl"]) == pytest.approx(ref["approx_kl"], rel=1e-3)
    assert abs(float(met["clip_fraction"]) - ref["clipped"]) <= 1.0 / ref["ratios"].size
    if eps == 0.05:                     # some transitions clipped, some not
      assert 0.0 < ref["clipped"] < 1.0


def test_update_gradient_is_gradient_of_make_loss(rollout_batch):
  """With accumulation = 2 the update applies the mean gradient over all M x K transitions,
  i.e. jax.grad of make_loss; its loss terms (policy, kernel KL, distillation) are naive."""
  _, arrs, _, batch = rollout_batch
  hp = grpo.Hyper(mode="both", outcome_coef=0.7, process_coef=1.3, outcome_weights=(1.0, 0.5),
                  clip_range=0.05, kl_coef=0.1, distill_coef=1.0)
  params = {"w": jnp.float32(0.33), "b": jnp.array([0.12, -0.23, 0.04], jnp.float32)}

  # A "transformation" that stores the gradient it receives in its state (and moves nothing).
  capture = optax.GradientTransformation(
      lambda p: jax.tree.map(jnp.zeros_like, p),
      lambda u, s, p=None: (jax.tree.map(jnp.zeros_like, u), u))
  update = jax.jit(grpo.make_update(lin_velocity, capture, arrs, hp, accumulation=2))
  state = {"params": params, "opt": capture.init(params), "ref": PARAMS}
  state2, met = update(state, batch)
  loss_fn = grpo.make_loss(lin_velocity, arrs, hp)
  (loss, lmet), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, PARAMS,
                                                                           batch)
  for name in ("w", "b"):
    np.testing.assert_allclose(np.asarray(state2["opt"][name]), np.asarray(grads[name]),
                               rtol=2e-5, atol=1e-7)
  assert float(met["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)
  ref = naive_objective(params, PARAMS, batch, arrs, hp)
  assert ref["kl"] > 0 and ref["distill"] > 0
  for name, key in (("loss", "loss"), ("policy_loss", "policy"), ("kl", "kl"),
                    ("distill", "distill")):
    assert float(met[name]) == pytest.approx(ref[key], rel=1e-4, abs=1e-7), name
    assert float(lmet[name]) == pytest.approx(ref[key], rel=1e-4, abs=1e-7), name


def test_guided_logprob_mean_gives_ratio_one():
  """A rollout that records log-probs under the guided mean, trained with
  logprob_mean='guided', has ratio 1 at its parameters (scoring it under the unguided mean
  does not: the guided steps move)."""
  _, arrs, r, batch = make_batch("guided", n_outcome=1)
  g = np.asarray(r.guidance, np.float64)
  for k in range(N_STEPS):   # c_k grad R (grad of sum(x) = 1), stored as mu^G - mu in float32
    np.testing.assert_allclose(g[:, k], float(arrs.guide_coef[k]), rtol=1e-5, atol=2e-7)
  assert np.all(g[:, 4:] > 0)
  hp = grpo.Hyper(mode="both", logprob_mean="guided")
  _, met = jax.jit(grpo.make_loss(lin_velocity, arrs, hp))(PARAMS, PARAMS, batch)
  assert abs(float(met["ratio_mean"]) - 1.0) < 1e-6
  assert float(met["clip_fraction"]) == 0.0 and float(met["approx_kl"]) < 1e-10
  ref = naive_objective(PARAMS, PARAMS, batch, arrs, hp)
  np.testing.assert_allclose(ref["ratios"], 1.0, atol=2e-4)
  _, met_u = jax.jit(grpo.make_loss(lin_velocity, arrs, hp._replace(logprob_mean="unguided"))
                     )(PARAMS, PARAMS, batch)
  assert float(met_u["clip_fraction"]) > 0.0


# --------------------------------------------------------------------------- 5. steps


@pytest.mark.parametrize("n", [8, 16])
def test_select_steps(n):
  b = 64
  steps = np.asarray(grpo.select_steps(jax.random.key(3), b, n, 0.6))
  assert steps.shape == (b, int(0.6 * (n - 1)))
  assert steps.dtype == np.int32
  assert steps.min() >= 0 and steps.max() <= n - 2   # the last transition is never trained
  assert all(len(set(row)) == steps.shape[1] for row in steps.tolist())
  # Rows differ (each sample has its own permutation): as ordered tuples and as sets.
  assert len({tuple(row) for row in steps.tolist()}) > b * 3 // 4
  assert (len({tuple(sorted(row)) for row in steps.tolist()})
          > min(math.comb(n - 1, steps.shape[1]), b) // 2)
  # Over many samples every trainable step appears.
  assert set(steps.ravel().tolist()) == set(range(n - 1))


def test_select_steps_first_is_flow_grpo_order():
  """`first`: steps 0 .. K - 1 in order for every sample; Flow-GRPO's Wan recipe (20 steps,
  `int(20 * 0.99)` = 19 trained) is timestep_fraction = 1.0 here (K counts the N - 1
  trainable transitions): steps 0 .. 18."""
  steps = np.asarray(grpo.select_steps(jax.random.key(0), 4, 8, 0.6, "first"))
  np.testing.assert_array_equal(steps, np.tile(np.arange(4), (4, 1)))
  assert steps.dtype == np.int32
  flow_grpo = np.asarray(grpo.select_steps(jax.random.key(0), 8, 20, 1.0, selection="first"))
  np.testing.assert_array_equal(flow_grpo, np.tile(np.arange(int(20 * 0.99)), (8, 1)))
  with pytest.raises(ValueError, match=r"grpo.step_selection = 'last' is not allowed"):
    grpo.select_steps(jax.random.key(0), 4, 8, 0.6, "last")


def test_update_evaluates_networks_at_t_model():
  """With `timesteps='truncated'` the rollout and the update both evaluate the velocity at
  floor(1000 t) / 1000: the ratio is 1 at the rollout parameters; an update that evaluated it
  at t instead would see ratios away from 1 (the field depends on t)."""
  def t_velocity(p, x, t, c):
    return p["w"] * x + p["b"] + jnp.sin(3000.0 * t)[:, None]   # O(1) change over 1e-3

  cfg = sampling.preset("flow_grpo", num_steps=N_STEPS, group_size=GROUP,
                        timesteps="truncated")
  arrs = sampling.grid_arrays(cfg)
  assert np.all(arrs.t_model <= arrs.t[:-1]) and np.any(arrs.t_model < arrs.t[:-1])
  r = jax.jit(sampling.make_rollout(t_velocity, None, cfg), static_argnames="latent_shape")(
      PARAMS, None, jax.random.key(5), None, (BATCH, DIM))
  steps = grpo.select_steps(None, BATCH, N_STEPS, 0.3, "first")   # steps 0 (t = 1), 1
  batch = grpo.Batch(r.latents, r.logprobs, jnp.ones((BATCH, 1)), jnp.zeros((BATCH, N_STEPS)),
                     steps, None)
  hp = grpo.Hyper(mode="none", kl_coef=0.1)
  _, met = jax.jit(grpo.make_loss(t_velocity, arrs, hp))(PARAMS, PARAMS, batch)
  assert abs(float(met["ratio_mean"]) - 1.0) < 1e-6 and float(met["approx_kl"]) < 1e-10
  assert float(met["kl"]) == 0.0
  wrong = arrs._replace(t_model=arrs.t[:-1])
  _, met = jax.jit(grpo.make_loss(t_velocity, wrong, hp))(PARAMS, PARAMS, batch)
  # Step 0 (t = 1 = t_model) is unaffected; step 1 (t = 0.9722, t_model = 0.972) is clipped.
  assert float(met["approx_kl"]) > 1e-6 and float(met["clip_fraction"]) == 0.5


def test_config_keys_of_the_flow_grpo_recipe():
  """`grpo.step_selection`, `grpo.adv_std`, `grpo.adv_eps` and `sampling.timesteps` are
  validated with key, value and what is allowed; defaults keep DESIGN.md's behaviour."""
  from euphonium_jax import config as config_lib

  def base():
    c = config_lib.get_default_config()
    c.stages = ("vae", "pretrain", "grpo")
    return config_lib.as_baseline(c, "flow_grpo")

  c = base()
  assert (c.grpo.step_selection, c.grpo.adv_std, c.grpo.adv_eps) == ("random", "sample", 1e-8)
  c.grpo.step_selection, c.grpo.adv_std, c.grpo.adv_eps = "first", "population", 1e-4
  c.sampling.timesteps = "truncated"
  config_lib.validate(c, num_devices=8)
  for key, value, needle in (
      ("step_selection", "last", "allowed values are 'random', 'first'"),
      ("adv_std", "pop", "allowed values are 'sample', 'population'"),
      ("adv_eps", 0.0, "must be > 0")):
    c = base()
    c.grpo[key] = value
    with pytest.raises(config_lib.ConfigError, match=f"config.grpo.{key} = {value!r}.*{needle}"):
      config_lib.validate(c, num_devices=8)
  c = base()
  c.sampling.timesteps = "int"
  with pytest.raises(config_lib.ConfigError, match="sampling.timesteps = 'int'.*continuous"):
    config_lib.validate(c, num_devices=8)


# ------------------------------------------------------------------------- 6. kernel KL


def test_kernel_kl_is_exact_gaussian_kl():
  cfg = sampling.preset("flow_grpo", num_steps=16)
  arrs = sampling.grid_arrays(cfg)
  rng = np.random.default_rng(2)
  b = 6
  x = rng.normal(size=(b, 2, 3, 2)).astype(np.float32)
  v = rng.normal(size=x.shape).astype(np.float32)
  v_ref = (v + 0.3 * rng.normal(size=x.shape)).astype(np.float32)
  ks = np.array([0, 1, 5, 9, 14, 15])
  t, t_next, g = arrs.t[ks], arrs.t[ks + 1], arrs.g[ks]
  kl = np.asarray(grpo.kernel_kl(jnp.asarray(v), jnp.asarray(v_ref), jnp.asarray(t),
                                 jnp.asarray(t_next), jnp.asarray(g)))
  for j in range(b):
    tj, tn, gj = float(t[j]), float(t_next[j]), float(g[j])
    xj = x[j].astype(np.float64)
    m1 = naive_mean(xj, v[j].astype(np.float64), tj, tn, gj)
    m2 = naive_mean(xj, v_ref[j].astype(np.float64), tj, tn, gj)
    s1 = s2 = gj * math.sqrt(tj - tn)
    # General KL(N(m1, s1^2) || N(m2, s2^2)) per dim, summed, / number of latent dims.
    full = np.sum(np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5)
    assert kl[j] == pytest.approx(full / xj.size, rel=1e-4)
    design = ((tj - tn) / (2 * gj**2) * (1 + gj**2 * (1 - tj) / (2 * tj)) ** 2
              * np.mean((v[j].astype(np.float64) - v_ref[j]) ** 2))
    assert kl[j] == pytest.approx(design, rel=1e-5)
  # Scalar times broadcast the same way.
  one = np.asarray(grpo.kernel_kl(jnp.asarray(v), jnp.asarray(v_ref), t[3], t_next[3], g[3]))
  assert one[3] == pytest.approx(kl[3], rel=1e-6)


# --------------------------------------------------------------- 7. distillation oracle


O_MU = np.array([0.5, -1.0, 0.0])
O_S = np.array([0.8, 0.5, 1.2])
O_W = np.array([1.0, 1.0, -0.5])
O_BETA = 2.0
O_N = 16


def test_distillation_moves_unguided_sampler_to_tilted_law():
  """Teacher: the exact velocity of the Gaussian flow, guided by the exact value gradient
  (memoryless schedule, gamma = 1/beta, all steps guided): the tilted law
  N(mu + s^2 w / beta, s^2). Student: the same velocity plus a learned per-step affine
  correction (zero at start). Minimising the distillation term D alone over fresh teacher
  rollouts makes the student's UNGUIDED sampler reproduce the tilted law."""
  base = dict(num_steps=O_N, shift=5.0, schedule="memoryless", eta=0.0)
  guided_cfg = sampling.preset("ode", **base,
                               guidance=dict(mode="theory", beta=O_BETA, start=0))
  plain_cfg = sampling.preset("ode", **base, guidance=dict(mode="off"))
  arrs = sampling.grid_arrays(guided_cfg)
  assert arrs.guided.all()
  mu, s, w = (jnp.asarray(a, jnp.float32) for a in (O_MU, O_S, O_W))
  grid = jnp.asarray(arrs.t[:-1])

  def velocity(p, x, t, c):
    k = jnp.argmin(jnp.abs(t[:, None] - grid[None, :]), axis=1)   # step index of t
    return oracle_velocity((mu, s), x, t, c) + p["b"][k] + p["a"][k] * x

  zero = {"a": jnp.zeros((O_N, O_W.size), jnp.float32),
          "b": jnp.zeros((O_N, O_W.size), jnp.float32)}
  teacher = jax.jit(sampling.make_rollout(velocity, oracle_prm, guided_cfg, keep_means=True),
                    static_argnames="latent_shape")
  student = jax.jit(sampling.make_rollout(velocity, None, plain_cfg),
                    static_argnames="latent_shape")
  m = 64
  hp = grpo.Hyper(mode="none", outcome_weights=(), outcome_coef=0.0, process_coef=0.0,
                  distill_coef=1.0)
  iters = 300
  tx = optax.adam(optax.cosine_decay_schedule(0.03, iters, alpha=0.01))
  update = grpo.make_update(velocity, tx, arrs, hp, accumulation=2)
  # D on every transition (the last one included: under the memoryless schedule it carries
  # about 0.1 of the 0.32 tilt of dimension 0); `select_steps` never picks it.
  steps = jnp.broadcast_to(jnp.arange(O_N, dtype=jnp.int32), (m, O_N))

  @jax.jit
  def train_step(state, key):
    r = teacher(zero, (mu, s, w), key, None, (m, O_W.size))
    batch = grpo.Batch(r.latents, r.logprobs, jnp.zeros((m, 0)), jnp.zeros((m, O_N)), steps,
                       None, r.means_guided, r.guidance)
    return update(state, batch)

  state = {"params": zero, "opt": tx.init(zero)}
  d0 = None
  for i in range(iters):
    state, met = train_step(state, jax.random.key(100 + i))
    d0 = float(met["distill"]) if d0 is None else d0
  assert float(met["policy_loss"]) == 0.0
  assert float(met["distill"]) < 1e-4 * d0, (d0, float(met["distill"]))
  # The learned correction is the closed-form optimum: the guidance shift in velocity units,
  # b_k = -(g^2 / beta) k_t w / (1 + g^2 (1 - t) / (2 t)), a_k = 0.
  t64, g64 = arrs.t[:-1].astype(np.float64), arrs.g.astype(np.float64)
  t64, g64 = t64[:, None], g64[:, None]
  b_opt = -(g64**2 / O_BETA * _k(t64, O_S) * O_W / (1 + g64**2 * (1 - t64) / (2 * t64)))
  np.testing.assert_allclose(np.asarray(state["params"]["b"]), b_opt, atol=5e-3)
  np.testing.assert_allclose(np.asarray(state["params"]["a"]), 0.0, atol=5e-3)
  # The student's unguided sampler vs. the teacher's guided one, on the same noise.
  n_eval = 16384
  key = jax.random.key(7)
  x_student = np.asarray(student(state["params"], None, key, None, (n_eval, O_W.size))
                         .latents[:, -1], np.float64)
  x_teacher = np.asarray(teacher(zero, (mu, s, w), key, None, (n_eval, O_W.size))
                         .latents[:, -1], np.float64)
  x_base = np.asarray(student(zero, None, key, None, (n_eval, O_W.size)).latents[:, -1],
                      np.float64)
  assert np.mean(np.abs(x_student - x_teacher)) < 0.01
  target = O_MU + O_S**2 * O_W / O_BETA
  m_chain, _ = exact_chain(O_N, "memoryless", 0.0, 1 / O_BETA, mu=O_MU, s=O_S, w=O_W)
  np.testing.assert_allclose(m_chain, target, atol=2e-3)
  se = 4.5 * O_S / math.sqrt(n_eval)
  assert np.all(np.abs(x_student.mean(0) - target) < se + 0.01), (x_student.mean(0), target)
  assert np.all(np.abs(x_base.mean(0) - O_MU) < se + 0.01), x_base.mean(0)
  tilt = O_S**2 * O_W / O_BETA
  assert np.all((x_student.mean(0) - x_base.mean(0)) * np.sign(tilt) > 0.8 * np.abs(tilt))


def _oracle_student():
  """The distillation oracle's student: the exact Gaussian-flow velocity plus a per-step
  affine correction p = {a, b} (zero = the teacher's own velocity)."""
  base = dict(num_steps=O_N, shift=5.0, schedule="memoryless", eta=0.0)
  guided_cfg = sampling.preset("ode", **base, guidance=dict(mode="theory", beta=O_BETA, start=0))
  arrs = sampling.grid_arrays(guided_cfg)
  mu, s, w = (jnp.asarray(a, jnp.float32) for a in (O_MU, O_S, O_W))
  grid = jnp.asarray(arrs.t[:-1])

  def velocity(p, x, t, c):
    k = jnp.argmin(jnp.abs(t[:, None] - grid[None, :]), axis=1)
    return oracle_velocity((mu, s), x, t, c) + p["b"][k] + p["a"][k] * x

  zero = {"a": jnp.zeros((O_N, O_W.size), jnp.float32),
          "b": jnp.zeros((O_N, O_W.size), jnp.float32)}
  rollout = jax.jit(sampling.make_rollout(velocity, oracle_prm, guided_cfg, keep_means=True),
                    static_argnames="latent_shape")
  t64, g64 = arrs.t[:-1].astype(np.float64)[:, None], arrs.g.astype(np.float64)[:, None]
  b_opt = -(g64**2 / O_BETA * _k(t64, O_S) * O_W / (1 + g64**2 * (1 - t64) / (2 * t64)))
  return velocity, zero, rollout, arrs, (mu, s, w), b_opt


def test_frozen_teacher_target_is_the_teachers_guided_mean():
  """distill_teacher = 'frozen': D_k's target is mu(x_k; v_teacher) + the rollout's guidance
  shift. With the teacher equal to the policy that rolled out, it is the stored guided mean
  (the 'rollout' target) up to float32 rounding; with another teacher it is that teacher's
  guided mean, computed here from the formula in float64."""
  velocity, zero, rollout, arrs, prm_p, _ = _oracle_student()
  rng = np.random.default_rng(5)
  pol = {"a": jnp.asarray(0.1 * rng.normal(size=(O_N, 3)), jnp.float32),
         "b": jnp.asarray(0.3 * rng.normal(size=(O_N, 3)), jnp.float32)}
  m = 8
  r = rollout(pol, prm_p, jax.random.key(3), None, (m, 3))
  steps = jnp.broadcast_to(jnp.arange(O_N, dtype=jnp.int32), (m, O_N))
  batch = grpo.Batch(r.latents, r.logprobs, jnp.zeros((m, 0)), jnp.zeros((m, O_N)), steps,
                     None, r.means_guided, r.guidance)
  hp_r = grpo.Hyper(mode="none", outcome_weights=(), distill_coef=1.0)
  hp_f = hp_r._replace(distill_teacher="frozen")
  student = {"a": pol["a"] * 0.5, "b": pol["b"] + 0.2}
  for col in (0, 5, 11):
    d_r = grpo.transition_loss(student, student, batch, col, velocity, arrs, hp_r)[1]["distill"]
    d_f = grpo.transition_loss(student, student, batch, col, velocity, arrs, hp_f,
                               teacher_params=pol)[1]["distill"]
    assert float(d_f) == pytest.approx(float(d_r), rel=1e-4), col
    d_z = float(grpo.transition_loss(student, student, batch, col, velocity, arrs, hp_f,
                                     teacher_params=zero)[1]["distill"])
    x = np.asarray(r.latents[:, col], np.float64)
    t, tn, g = (float(a[col]) for a in (arrs.t, arrs.t[1:], arrs.g))
    v = lambda p: np.asarray(velocity(p, jnp.asarray(x, jnp.float32),
                                      jnp.full((m,), t, jnp.float32), None), np.float64)
    shift = np.asarray(r.guidance[:, col], np.float64)
    target = naive_mean(x, v(zero), t, tn, g) + shift
    naive = np.mean((naive_mean(x, v(student), t, tn, g) - target) ** 2) / (2 * g * g * (t - tn))
    assert d_z == pytest.approx(naive, rel=1e-4), col
    assert abs(d_z - float(d_r)) > 1e-3 * naive  # another teacher, another target


def test_frozen_teacher_on_policy_converges_where_the_rollout_target_drifts():
  """Training on the student's OWN guided rollouts (on-policy, as the grpo stage does): with
  the frozen teacher (the initial model, never refreshed) D alone converges to the closed-form
  optimum b = the guidance shift in velocity units; with the rollout's target the guidance
  shift is added again every iteration and the correction keeps growing past it."""
  velocity, zero, rollout, arrs, prm_p, b_opt = _oracle_student()
  m, iters = 64, 150
  steps = jnp.broadcast_to(jnp.arange(O_N, dtype=jnp.int32), (m, O_N))
  results = {}
  for target in ("frozen", "rollout"):
    hp = grpo.Hyper(mode="none", outcome_weights=(), distill_coef=1.0, distill_teacher=target)
    tx = optax.adam(0.01)
    update = grpo.make_update(velocity, tx, arrs, hp)

    @jax.jit
    def train_step(state, key):
      r = rollout(state["params"], prm_p, key, None, (m, O_W.size))
      batch = grpo.Batch(r.latents, r.logprobs, jnp.zeros((m, 0)), jnp.zeros((m, O_N)),
                         steps, None, r.means_guided, r.guidance)
      return update(state, batch)

    state = {"params": zero, "opt": tx.init(zero)}
    if target == "frozen":
      state["teacher"] = zero
    for i in range(iters):
      state, met = train_step(state, jax.random.key(200 + i))
    results[target] = np.asarray(state["params"]["b"], np.float64)
  np.testing.assert_allclose(results["frozen"], b_opt, atol=1e-2)
  # the on-policy rollout target has run past the optimum (where the frozen one stops)
  big = np.abs(b_opt) > 0.05
  assert np.all(np.abs(results["rollout"][big]) > 1.5 * np.abs(b_opt[big])), (
      results["rollout"][big], b_opt[big])


def test_frozen_teacher_config_and_refresh():
  """grpo.distill_teacher / teacher_refresh_every are validated; the teacher is a copy of the
  parameters taken every K iterations (policy.refresh_teacher) and otherwise left alone."""
  import types
  from euphonium_jax import config as config_lib
  from euphonium_jax import policy as policy_lib
  c = config_lib.from_file(os.path.join(REPO, "configs", "euphonium.py"))
  c.grpo.update(distill_coef=0.3, distill_teacher="frozen", teacher_refresh_every=5)
  config_lib.validate(c)  # no KL needed: the frozen teacher is the anchor
  for key, value, needle in (
      ("distill_teacher", "ema", "allowed values are 'rollout', 'frozen'"),
      ("teacher_refresh_every", -1, "an integer >= 0"),
      ("distill_coef", 0.0, "a frozen teacher is the target of explicit distillation")):
    bad = config_lib.from_file(os.path.join(REPO, "configs", "euphonium.py"))
    bad.grpo.update(distill_coef=0.3, distill_teacher="frozen", teacher_refresh_every=5)
    bad.grpo[key] = value
    with pytest.raises(config_lib.ConfigError, match=needle):
      config_lib.validate(bad)
  bad = config_lib.from_file(os.path.join(REPO, "configs", "euphonium.py"))
  bad.grpo.update(distill_coef=0.3, kl_coef=0.1, teacher_refresh_every=5)
  with pytest.raises(config_lib.ConfigError, match="refreshes the frozen teacher"):
    config_lib.validate(bad)
  bad.grpo.update(teacher_refresh_every=0, kl_coef=0.0)
  with pytest.raises(config_lib.ConfigError, match="needs an anchor"):
    config_lib.validate(bad)

  pol = types.SimpleNamespace(config=c)
  params = {"w": jnp.arange(3.0)}
  state = {"params": params, "teacher": {"w": jnp.zeros(3)}}
  for done in (1, 4, 6):
    assert policy_lib.refresh_teacher(pol, state, done) is state
  new = policy_lib.refresh_teacher(pol, state, 10)
  np.testing.assert_array_equal(new["teacher"]["w"], params["w"])
  assert new["teacher"]["w"] is not params["w"]  # its own buffer (the state is donated)
  c.grpo.teacher_refresh_every = 0
  assert policy_lib.refresh_teacher(pol, state, 10) is state
