"""Sampler: grids, schedules, the step against DanceGRPO / Flow-GRPO, the rollout, errors.

The Gaussian oracle (exact target laws) is in test_sampling_oracle.py.
"""
import math
import re

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from euphonium_jax import sampling

SHAPE = (4, 2, 3, 3, 2)   # [B, T, H, W, C]


def mlp_velocity(params, x, t, cond):
  """A small nonlinear velocity field over flattened latents (stand-in network)."""
  h = x.reshape(x.shape[0], -1)
  h = jnp.tanh(h @ params["w1"] + t[:, None] + cond["emb"])
  return (h @ params["w2"]).reshape(x.shape)


def mlp_prm(params, x, t, cond):
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w"] + t[:, None])
  return jnp.sum(h * cond["emb"], axis=-1)


def make_params(key, shape=SHAPE, width=8):
  d = math.prod(shape[1:])
  k = jax.random.split(key, 3)
  params = {"w1": jax.random.normal(k[0], (d, width)) / math.sqrt(d),
            "w2": jax.random.normal(k[1], (width, d)) / math.sqrt(width)}
  prm_params = {"w": jax.random.normal(k[2], (d, width)) / math.sqrt(d)}
  cond = {"emb": jnp.linspace(-1, 1, shape[0] * width).reshape(shape[0], width)}
  return params, prm_params, cond


# ------------------------------------------------------------------ grids and schedules


def test_shifted_grid_and_explicit_grid():
  t = sampling.shifted_grid(16, 5.0)
  u = np.linspace(1, 0, 17)
  np.testing.assert_allclose(t, 5 * u / (1 + 4 * u))
  assert t[0] == 1 and t[-1] == 0 and np.all(np.diff(t) < 0)
  grid = (1.0, 0.9, 0.5, 0.2, 0.0)
  cfg = sampling.preset("dance_grpo", grid=grid)   # num_steps follows the grid
  assert cfg.num_steps == 4
  arrs = sampling.grid_arrays(cfg)
  np.testing.assert_allclose(arrs.t, grid)
  np.testing.assert_allclose(arrs.dt, [0.1, 0.4, 0.3, 0.2], rtol=1e-6)


def test_schedules_values():
  t = sampling.shifted_grid(16, 5.0)
  tk = t[:-1]
  g = lambda s, eta=0.7: sampling.diffusion_coefficients(t, s, eta)
  np.testing.assert_array_equal(g("ode"), 0)
  np.testing.assert_array_equal(g("constant", 0.25), 0.25)
  np.testing.assert_allclose(g("flow_grpo")[0], 0.7 * math.sqrt(1 / (1 - t[1])))   # t = 1 guard
  np.testing.assert_allclose(g("flow_grpo")[1:], 0.7 * np.sqrt(tk[1:] / (1 - tk[1:])))
  np.testing.assert_allclose(g("memoryless")[1:], np.sqrt(2 * tk[1:] / (1 - tk[1:])))
  np.testing.assert_allclose(g("flow_grpo_wan"), t[1] * tk)
  assert np.all(np.isfinite(g("memoryless")))


GUARD_GRIDS = {
    "shifted_16_5": sampling.shifted_grid(16, 5.0),      # t_0 = 1 exactly
    "shifted_16_1": sampling.shifted_grid(16, 1.0),
    "unipc_20_3": sampling.unipc_flow_grid(20, 3.0),     # Wan's: t_0 = 1 - 1e-6
    "unipc_6_3": sampling.unipc_flow_grid(6, 3.0),
}


@pytest.mark.parametrize("grid", GUARD_GRIDS)
def test_t1_guard_gives_exact_first_coefficient(grid):
  """g_0 of every schedule, written out: the guard puts t_1 in the denominator whenever
  1 - t_0 < T1_GUARD (t_0 = 1, and diffusers' UniPC 1 - 1e-6, where the plain formula gives
  g_0 ~ 700 a); the later steps are the plain formula."""
  t = GUARD_GRIDS[grid]
  t0, t1 = t[0], t[1]
  assert 1 - t0 < sampling.T1_GUARD and 1 - t1 > 10 * sampling.T1_GUARD
  want = {"ode": 0.0, "constant": 0.7, "flow_grpo": 0.7 * math.sqrt(t0 / (1 - t1)),
          "memoryless": math.sqrt(2 * t0 / (1 - t1)), "flow_grpo_wan": t1 * t0}
  for sched, g0 in want.items():
    g = sampling.diffusion_coefficients(t, sched, 0.7)
    assert g[0] == pytest.approx(g0, rel=1e-14, abs=0), (sched, g[0], g0)
    tk = t[1:-1]
    rest = {"ode": 0 * tk, "constant": 0 * tk + 0.7, "flow_grpo": 0.7 * np.sqrt(tk / (1 - tk)),
            "memoryless": np.sqrt(2 * tk / (1 - tk)), "flow_grpo_wan": t1 * tk}[sched]
    np.testing.assert_allclose(g[1:], rest, rtol=1e-14, atol=0)
  # What the bug gave on the UniPC grid: a * sqrt(t_0 / (1 - t_0)) ~ 700 a.
  if grid.startswith("unipc"):
    assert 0.7 * math.sqrt(t0 / (1 - t0)) > 600
    assert sampling.diffusion_coefficients(t, "flow_grpo", 0.7)[0] < 6
  # A grid starting just outside the threshold is not guarded.
  far = np.array([1 - 2 * sampling.T1_GUARD, 0.5, 0.0])
  np.testing.assert_allclose(sampling.diffusion_coefficients(far, "flow_grpo", 0.7)[0],
                             0.7 * math.sqrt(far[0] / (1 - far[0])), rtol=1e-14)


def test_guidance_strengths():
  eup = sampling.preset("euphonium")          # eta 0.25, beta 3.125: 0.01 * dt from step 12
  arrs = sampling.grid_arrays(eup)
  np.testing.assert_array_equal(arrs.guided, np.arange(16) >= 12)
  np.testing.assert_allclose(arrs.guide_coef, np.where(arrs.guided, 0.01 * arrs.dt, 0), rtol=1e-6)
  raw = sampling.grid_arrays(sampling.preset("euphonium", guidance=dict(mode="raw", scale=0.01)))
  np.testing.assert_allclose(raw.guide_coef, arrs.guide_coef, rtol=1e-6)
  th = sampling.grid_arrays(sampling.preset(
      "euphonium", schedule="memoryless", guidance=dict(mode="theory", beta=2.0, start=2,
                                                          end=9, interval=3)))
  np.testing.assert_array_equal(np.flatnonzero(th.guided), [2, 5, 8])
  np.testing.assert_allclose(th.guide_coef[th.guided], (th.g**2 * th.dt / 2.0)[th.guided],
                             rtol=1e-5)


def test_normalize_grad_unit_rms_per_sample():
  scale = jnp.arange(1.0, 5.0).reshape(4, 1, 1, 1, 1)
  grad = sampling.standard_normal(jax.random.key(0), SHAPE) * scale
  rms = jnp.sqrt(jnp.mean(sampling.normalize_grad(grad).reshape(4, -1)**2, -1))
  np.testing.assert_allclose(rms, 1.0, rtol=1e-5)


def test_config_dict_section_and_presets():
  c = sampling.default_sampling_config()
  assert sampling.sampler_config_from(c) == sampling.preset("euphonium")
  c.preset = "flow_grpo"
  c.num_steps = 10
  c.shift = 3.0
  c.guidance.mode = "theory"
  c.guidance.beta = 4.0
  cfg = sampling.sampler_config_from(c)
  assert (cfg.schedule, cfg.eta, cfg.num_steps, cfg.shift) == ("flow_grpo", 0.7, 10, 3.0)
  assert (cfg.guidance.mode, cfg.guidance.beta) == ("theory", 4.0)
  for name in sampling.PRESETS:
    hash(sampling.preset(name))   # static, hashable


# ------------------------------------------------------------------ the step


def _draw(key, shape=SHAPE):
  k = jax.random.split(key, 3)
  return tuple(sampling.standard_normal(kk, shape) for kk in k)


def test_step_equals_dance_grpo_update():
  """DanceGRPO's flux_step (constant eta), written out from its code."""
  x, v, noise = _draw(jax.random.key(1))
  sigma, sigma_next, eta = 0.8333333, 0.7954546, 0.3
  dsigma = sigma_next - sigma
  prev_mean = x + dsigma * v
  pred_x0 = x - sigma * v
  std_dev = eta * math.sqrt(sigma - sigma_next)
  score = -(x - pred_x0 * (1 - sigma)) / sigma**2
  prev_mean = prev_mean + (-0.5 * eta**2 * score) * dsigma
  prev = prev_mean + std_dev * noise
  lp = (-((prev - prev_mean)**2) / (2 * std_dev**2) - math.log(std_dev)
        - math.log(math.sqrt(2 * math.pi))).mean(axis=(1, 2, 3, 4))
  out = sampling.sde_step(x, v, sigma, sigma_next, eta, noise)
  np.testing.assert_allclose(out.mean, prev_mean, atol=1e-5)
  np.testing.assert_allclose(out.sample, prev, atol=1e-5)
  np.testing.assert_allclose(out.logprob, lp, atol=1e-4)


@pytest.mark.parametrize("i", [0, 7])     # i = 0 exercises the t = 1 guard
def test_step_equals_flow_grpo_update(i):
  """Flow-GRPO's sde_step_with_logprob, written out from its code."""
  x, v, noise = _draw(jax.random.key(2))
  sigmas = sampling.shifted_grid(16, 5.0).astype(np.float32)
  sigma, sigma_prev, a = float(sigmas[i]), float(sigmas[i + 1]), 0.7
  sigma_max = float(sigmas[1])
  std_dev_t = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * a
  dt = sigma_prev - sigma
  prev_mean = (x * (1 + std_dev_t**2 / (2 * sigma) * dt)
               + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt)
  std = std_dev_t * math.sqrt(-dt)
  prev = prev_mean + std * noise
  lp = (-((prev - prev_mean)**2) / (2 * std**2) - math.log(std)
        - math.log(math.sqrt(2 * math.pi))).mean(axis=(1, 2, 3, 4))
  g = sampling.diffusion_coefficients(sigmas.astype(np.float64), "flow_grpo", a)[i]
  out = sampling.sde_step(x, v, sigma, sigma_prev, g, noise)
  np.testing.assert_allclose(out.mean, prev_mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.sample, prev, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.logprob, lp, rtol=1e-4, atol=1e-4)


def test_eta_zero_is_euler_and_guided_mean():
  x, v, noise = _draw(jax.random.key(3))
  out = sampling.sde_step(x, v, 0.6, 0.5, 0.0, noise)
  np.testing.assert_allclose(out.sample, x - 0.1 * v, atol=1e-6)
  np.testing.assert_array_equal(out.logprob, 0.0)
  grad = noise * 2.0
  out = sampling.sde_step(x, v, 0.6, 0.5, 0.3, noise, guidance_grad=grad, guidance_coef=0.05)
  np.testing.assert_allclose(out.mean_guided, out.mean + 0.05 * grad, atol=1e-6)
  np.testing.assert_allclose(out.std, 0.3 * math.sqrt(0.1), rtol=1e-6)
  np.testing.assert_allclose(sampling.x0_hat(x, v, 0.6), x - 0.6 * v, atol=1e-6)


def test_gradients_through_step_are_finite():
  params, _, cond = make_params(jax.random.key(4))
  x, x_next, _ = _draw(jax.random.key(5))
  t = jnp.asarray([1.0, 0.5, 0.3, 0.1])        # per-sample times, t = 1 included
  t_next = t - 0.05
  for sched in ("ode", "constant", "flow_grpo", "memoryless"):
    g = jnp.asarray(sampling.diffusion_coefficients(
        np.array([1.0, 0.95]), sched, 0.7)[0]) * jnp.ones(4)

    def loss(p):
      v = mlp_velocity(p, x, t, cond)
      return jnp.sum(sampling.step_logprob(x, x_next, v, t, t_next, g))

    grads = jax.grad(loss)(params)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(grads)), sched


# ------------------------------------------------------------------ the rollout


def _guided_cfg(**kw):
  return sampling.preset("euphonium", num_steps=6, group_size=2,
                         guidance=dict(start=3), **kw)


def _jit(rollout):
  return jax.jit(rollout, static_argnames="latent_shape")


@pytest.fixture(scope="module")
def guided_rollout():
  """One jitted guided rollout shared by several tests: it must be traced only once."""
  return _jit(chex.assert_max_traces(
      sampling.make_rollout(mlp_velocity, mlp_prm, _guided_cfg()), n=1))


def _recompute(cfg, ro, params, prm_params, cond, guided):
  """Log-probs of all stored transitions, recomputed outside the scan."""
  arrs = sampling.grid_arrays(cfg)
  lps = []
  for k in range(cfg.num_steps):
    x_k, x_next = ro.latents[:, k], ro.latents[:, k + 1]
    tb = jnp.full((x_k.shape[0],), arrs.t[k])
    v = mlp_velocity(params, x_k, tb, cond)
    term = None
    if guided and arrs.guided[k]:
      grad = jax.grad(lambda y: mlp_prm(prm_params, y, tb, cond).sum())(x_k)
      term = arrs.guide_coef[k] * grad
    lps.append(sampling.step_logprob(x_k, x_next, v, arrs.t[k], arrs.t[k + 1], arrs.g[k], term))
  return jnp.stack(lps, axis=1)


@pytest.mark.parametrize("mean", ["unguided", "guided"])
def test_ratio_is_one_at_rollout_parameters(mean, guided_rollout):
  params, prm_params, cond = make_params(jax.random.key(6))
  cfg = _guided_cfg(logprob_mean=mean)
  rollout = (guided_rollout if mean == "unguided" else
             _jit(sampling.make_rollout(mlp_velocity, mlp_prm, cfg)))
  ro = rollout(params, prm_params, jax.random.key(7), cond, SHAPE)
  lp = jax.jit(_recompute, static_argnums=(0, 5))(cfg, ro, params, prm_params, cond,
                                                  mean == "guided")
  ratio = np.exp(np.asarray(lp) - np.asarray(ro.logprobs))
  np.testing.assert_allclose(ratio, 1.0, rtol=0, atol=1e-6)   # float32 rounding only
  if mean == "guided":     # the guidance really changed the scored mean
    unguided = _recompute(cfg, ro, params, prm_params, cond, False)
    assert float(jnp.max(jnp.abs(unguided - ro.logprobs)[:, 3:])) > 1e-4


def test_scan_equals_python_loop_and_outputs(guided_rollout):
  params, prm_params, cond = make_params(jax.random.key(8))
  cfg = _guided_cfg()
  arrs = sampling.grid_arrays(cfg)
  key = jax.random.key(9)
  ro = guided_rollout(params, prm_params, key, cond, SHAPE)

  @jax.jit
  def python_loop(key):     # unrolled at trace time: N separate steps, no scan
    k_init, k_steps = jax.random.split(key)
    x = sampling.initial_noise(k_init, SHAPE, cfg)
    xs, lps, rs = [x], [], []
    for i in range(cfg.num_steps):
      tb = jnp.full((SHAPE[0],), arrs.t[i])
      v = mlp_velocity(params, x, tb, cond)
      r, grad = mlp_prm(prm_params, x, tb, cond), None
      if arrs.guided[i]:
        grad = jax.grad(lambda y: mlp_prm(prm_params, y, tb, cond).sum())(x)
      noise = sampling.standard_normal(jax.random.fold_in(k_steps, i), SHAPE)
      out = sampling.sde_step(x, v, arrs.t[i], arrs.t[i + 1], arrs.g[i], noise, grad,
                              arrs.guide_coef[i])
      x0 = sampling.x0_hat(x, v, arrs.t[i])
      x = out.sample
      xs.append(x), lps.append(out.logprob), rs.append(r if arrs.guided[i] else 0 * r)
    return jnp.stack(xs, 1), jnp.stack(lps, 1), jnp.stack(rs, 1), x0

  xs, lps, rs, x0 = python_loop(key)
  assert ro.latents.shape == (4, 7) + SHAPE[1:] and ro.logprobs.shape == (4, 6)
  np.testing.assert_allclose(ro.latents, xs, atol=1e-5)
  np.testing.assert_allclose(ro.logprobs, lps, atol=1e-4)
  np.testing.assert_allclose(ro.process_rewards, rs, atol=1e-5)
  np.testing.assert_allclose(ro.x0_hat, x0, atol=1e-5)
  np.testing.assert_allclose(ro.timesteps, arrs.t)
  assert np.all(np.asarray(ro.process_rewards[:, :3]) == 0)
  assert np.all(np.asarray(ro.process_rewards[:, 3:]) != 0)


def test_prm_calls_only_when_needed_and_score_unguided():
  params, prm_params, cond = make_params(jax.random.key(10))
  calls = []

  def counting_prm(p, x, t, c):
    calls.append(1)
    return mlp_prm(p, x, t, c)

  off = sampling.preset("dance_grpo", num_steps=4, group_size=2)
  ro = _jit(sampling.make_rollout(mlp_velocity, counting_prm, off))(
      params, prm_params, jax.random.key(0), cond, SHAPE)
  assert not calls and np.all(np.asarray(ro.process_rewards) == 0)
  no_prm = _jit(sampling.make_rollout(mlp_velocity, None, off))(
      params, None, jax.random.key(0), cond, SHAPE)
  np.testing.assert_array_equal(no_prm.latents, ro.latents)
  scored = sampling.preset("dance_grpo", num_steps=4, group_size=2, score_unguided_steps=True)
  ro = _jit(sampling.make_rollout(mlp_velocity, mlp_prm, scored))(
      params, prm_params, jax.random.key(0), cond, SHAPE)
  t = jnp.asarray(sampling.grid_arrays(scored).t[:-1])
  r = jax.vmap(lambda x, tk: mlp_prm(prm_params, x, jnp.full((4,), tk), cond), (1, 0), 1)(
      ro.latents[:, :-1], t)
  np.testing.assert_allclose(ro.process_rewards, r, atol=1e-5)
  with pytest.raises(ValueError, match="prm_fn is None"):
    sampling.make_rollout(mlp_velocity, None, _guided_cfg())


def test_one_trace_for_repeated_rollouts(guided_rollout):
  """Repeated calls (new keys, new parameter values) reuse the one trace of the fixture."""
  for seed in range(3):
    params, prm_params, cond = make_params(jax.random.key(11 + seed))
    jax.block_until_ready(guided_rollout(params, prm_params, jax.random.key(seed), cond, SHAPE))


def _loops_and_callbacks(text):
  """(trip counts of the step loops, trip counts of the RNG's loops, host transfers) of a
  compiled HLO module: XLA:CPU lowers threefry's rounds as small while loops of their own."""
  steps, rng, host = [], [], []
  for line in text.splitlines():
    if re.search(r"\bwhile\(", line):
      trip = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
      trip = int(trip.group(1)) if trip else None
      rng_op = re.search(r'op_name="[^"]*(threefry|_uniform|_normal)', line)
      (rng if rng_op else steps).append(trip)
    host += re.findall(r'custom_call_target="[^"]*callback[^"]*"', line)
    host += re.findall(r"\b(?:send|recv|infeed|outfeed)\(", line)
  return steps, rng, host


def test_rollout_is_one_program_without_host_callbacks():
  """The compiled guided rollout: exactly one while loop over the N steps (the RNG's own
  rounds aside), no host callback; with the noise given (replay) the step loop is the only
  loop. A `jax.debug.callback` in the step makes the check fail."""
  params, prm_params, cond = make_params(jax.random.key(20))
  cfg = _guided_cfg()
  n = cfg.num_steps

  def compiled(velocity, *extra):
    roll = _jit(sampling.make_rollout(velocity, mlp_prm, cfg))
    lowered = roll.lower(params, prm_params, jax.random.key(0), cond, SHAPE, *extra)
    return lowered.as_text(), lowered.compile().as_text()

  lowered, text = compiled(mlp_velocity)
  steps, rng, host = _loops_and_callbacks(text)
  assert steps == [n] and not host and "callback" not in lowered, (steps, host)
  assert rng and all(trip is not None and trip < n for trip in rng), rng
  replay = (jnp.zeros(SHAPE), jnp.zeros((SHAPE[0], n) + SHAPE[1:]))
  steps, rng, host = _loops_and_callbacks(compiled(mlp_velocity, *replay)[1])
  assert steps == [n] and not rng and not host, (steps, rng, host)

  def leaky_velocity(p, x, t, c):
    jax.debug.callback(lambda tt: None, t)
    return mlp_velocity(p, x, t, c)

  lowered, text = compiled(leaky_velocity, *replay)
  assert _loops_and_callbacks(text)[2] and "callback" in lowered


def test_noise_input_replays_and_networks_see_t_model(guided_rollout):
  """`x_init` + `noise` replay the keyed rollout exactly; with `timesteps='truncated'` the
  velocity and the PRM are evaluated at floor(1000 t) / 1000 and the step at t (a Python
  loop written out), which changes the trajectory."""
  params, prm_params, cond = make_params(jax.random.key(21))
  cfg = _guided_cfg()
  n = cfg.num_steps
  key = jax.random.key(22)
  ro = guided_rollout(params, prm_params, key, cond, SHAPE)
  k_init, k_steps = jax.random.split(key)
  x_init = sampling.initial_noise(k_init, SHAPE, cfg)
  noise = jnp.stack([sampling.standard_normal(jax.random.fold_in(k_steps, i), SHAPE)
                     for i in range(n)], axis=1)
  rollout = _jit(sampling.make_rollout(mlp_velocity, mlp_prm, cfg))
  replay = rollout(params, prm_params, jax.random.key(99), cond, SHAPE, x_init, noise)
  np.testing.assert_allclose(replay.latents, ro.latents, rtol=0, atol=1e-6)  # float32 fusion
  np.testing.assert_allclose(replay.logprobs, ro.logprobs, rtol=0, atol=1e-5)

  trunc = _guided_cfg(timesteps="truncated")
  arrs = sampling.grid_arrays(trunc)
  k = np.round(arrs.t_model.astype(np.float64) * 1000)   # integer timesteps (diffusers' check
  np.testing.assert_array_equal(arrs.t_model, (k / 1000).astype(np.float32))  # is in
  gap = arrs.t[:-1].astype(np.float64) - k / 1000          # test_wan_rollout_parity.py)
  assert np.all((gap > -1e-7) & (gap < 1e-3)) and np.sum(gap > 1e-5) >= 4, gap
  np.testing.assert_array_equal(sampling.grid_arrays(cfg).t_model, arrs.t[:-1])   # continuous
  out = _jit(sampling.make_rollout(mlp_velocity, mlp_prm, trunc))(
      params, prm_params, key, cond, SHAPE, x_init, noise)

  @jax.jit
  def python_loop(x):
    xs, rs = [x], []
    for i in range(n):
      tm = jnp.full((SHAPE[0],), arrs.t_model[i])
      v = mlp_velocity(params, x, tm, cond)
      grad = None
      if arrs.guided[i]:
        grad = jax.grad(lambda y: mlp_prm(prm_params, y, tm, cond).sum())(x)
      rs.append(mlp_prm(prm_params, x, tm, cond) if arrs.guided[i] else jnp.zeros(SHAPE[0]))
      x = sampling.sde_step(x, v, arrs.t[i], arrs.t[i + 1], arrs.g[i], noise[:, i], grad,
                            arrs.guide_coef[i]).sample
      xs.append(x)
    return jnp.stack(xs, 1), jnp.stack(rs, 1)

  xs, rs = python_loop(x_init)
  np.testing.assert_allclose(out.latents, xs, rtol=0, atol=2e-6)
  np.testing.assert_allclose(out.process_rewards, rs, rtol=0, atol=2e-6)
  assert float(jnp.max(jnp.abs(out.latents - replay.latents))) > 1e-4   # ~3e-4: t moves < 1e-3
  with pytest.raises(ValueError, match=r"noise has shape \(4, 5, 2, 3, 3, 2\)"):
    rollout(params, prm_params, key, cond, SHAPE, x_init, noise[:, :5])


def test_noise_sharded_groups_distinct_and_sharding_invariant():
  """16 samples over 8 devices, groups of 4: initial noise shared within a group only,
  step noise never shared, and the result equals the unsharded rollout."""
  shape = (16, 2, 2, 2, 2)
  params, prm_params, cond = make_params(jax.random.key(12), shape)
  cfg = sampling.preset("euphonium", num_steps=3, group_size=4, guidance=dict(start=1))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  sh = NamedSharding(mesh, P("data"))
  rollout = _jit(sampling.make_rollout(mlp_velocity, mlp_prm, cfg, batch_sharding=sh))
  cond_sh = jax.device_put(cond, sh)
  ro = rollout(params, prm_params, jax.random.key(13), cond_sh, shape)
  assert ro.latents.sharding.is_equivalent_to(sh, ro.latents.ndim)
  plain = _jit(sampling.make_rollout(mlp_velocity, mlp_prm, cfg))(
      params, prm_params, jax.random.key(13), cond, shape)
  np.testing.assert_allclose(ro.latents, plain.latents, atol=1e-6)
  x1 = np.asarray(ro.latents[:, 0]).reshape(16, -1)
  same = np.all(np.isclose(x1[:, None], x1[None]), axis=-1)
  np.testing.assert_array_equal(same, np.kron(np.eye(4), np.ones((4, 4))).astype(bool))
  x2 = np.asarray(ro.latents[:, 1]).reshape(16, -1)
  assert not np.any(np.triu(np.all(np.isclose(x2[:, None], x2[None], atol=1e-3), -1), 1))
  with pytest.raises(ValueError, match="group_size = 4 must divide"):
    rollout(params, prm_params, jax.random.key(0), cond, (6,) + shape[1:])


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("overrides,key,value", [
    (dict(num_steps=0), "sampling.num_steps", "0"),
    (dict(shift=0.0), "sampling.shift", "0.0"),
    (dict(shift=-1.0), "sampling.shift", "-1.0"),
    (dict(eta=-0.1), "sampling.eta", "-0.1"),
    (dict(schedule="ddim"), "sampling.schedule", "'ddim'"),
    (dict(guidance=dict(start=16)), "sampling.guidance.start", "16"),
    (dict(guidance=dict(start=4, end=4)), "sampling.guidance.end", "4"),
    (dict(guidance=dict(end=17)), "sampling.guidance.end", "17"),
    (dict(guidance=dict(mode="raw")), "sampling.guidance.scale", "None"),
    (dict(schedule="ode", guidance=dict(mode="theory")), "sampling.guidance.mode", "'theory'"),
    (dict(schedule="flow_grpo"), "sampling.guidance.mode", "'beta'"),
    (dict(grid=(1.0, 0.5, 0.0), num_steps=16), "sampling.grid", "(1.0, 0.5, 0.0)"),
    (dict(grid=(1.0, 0.2, 0.5, 0.0)), "sampling.grid", "(1.0, 0.2, 0.5, 0.0)"),
    (dict(timesteps="integer"), "sampling.timesteps", "'integer'"),
])
def test_bad_inputs_name_key_value_and_allowed(overrides, key, value):
  with pytest.raises(ValueError) as e:
    sampling.preset("euphonium", **overrides)
  msg = str(e.value)
  assert key + " = " + value in msg and "allowed" in msg, msg


def test_bad_config_dict_and_preset_names():
  c = sampling.default_sampling_config()
  c.num_steps = 0
  with pytest.raises(ValueError, match=r"sampling.num_steps = 0 .*integer >= 1"):
    sampling.sampler_config_from(c)
  with pytest.raises(ValueError, match=r"sampling.preset = 'grpo' .*euphonium, dance_grpo"):
    sampling.sampler_config_from(ml_collections.ConfigDict({"preset": "grpo"}))
