"""SDE windows (Flow-GRPO-Fast, MixGRPO): the sampler, the log-probs, the trained steps.

1. A window covering every step is today's sampler (guided, with kept means).
2. Off the window a step is the Euler ODE step with log-prob 0 and no guidance.
3. A group's shared ODE prefix computed once (`branch`) gives the same trajectories.
4. Window starts: MixGRPO's progressive schedule (a naive re-implementation of its
   GRPOTrainingStates), Flow-GRPO-Fast's uniform draw, traced (one compile for every iteration).
5. `select_steps` draws only SDE steps; the update's mask gives ODE steps no loss or gradient.
6. The Gaussian oracle: the windowed sampler is the exact linear-Gaussian chain with g = 0 off
   the window, and lands on the unguided law N(mu, s^2) (Euler and DPM-Solver++(2M) outside).
7. DPM-Solver++(2M) as the Euler step plus a correction equals MixGRPO's formula.
8. The two configs run the grpo stage (the tiny world's random networks).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from euphonium_jax import config as config_lib
from euphonium_jax import sampling
from euphonium_jax.rl import grpo
from euphonium_jax.sampling import windows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MU = np.array([0.5, -1.0, 0.0, 2.0])
S = np.array([0.8, 0.5, 1.2, 0.3])
W = np.array([1.0, 0.0, -0.5, 0.2])


from test_sampling_oracle import oracle_prm, oracle_velocity  # the Gaussian oracle, shared


P_V = (jnp.asarray(MU, jnp.float32), jnp.asarray(S, jnp.float32))
P_R = P_V + (jnp.asarray(W, jnp.float32),)


def _roll(cfg, b, key=0, keep_means=False, **kw):
  fn = jax.jit(sampling.make_rollout(oracle_velocity, oracle_prm, cfg, keep_means=keep_means),
               static_argnames="latent_shape")
  return fn(P_V, P_R, jax.random.key(key), None, (b, MU.size), **kw)


def _cfg(window=None, n=8, **kw):
  base = dict(num_steps=n, group_size=4, share_noise_in_group=True,
              guidance=dict(mode="theory", beta=2.0, start=2))
  base.update(kw)
  return sampling.preset("dance_grpo", window=window or dict(mode="off"), **base)


def test_full_window_is_todays_sampler():
  n = 8
  off = _roll(_cfg(), 8, keep_means=True)
  full = _roll(_cfg(dict(mode="sliding", size=n, range_end=n)), 8, keep_means=True)
  assert np.asarray(full.sde_mask).all() and off.sde_mask is None
  for name in ("latents", "logprobs", "process_rewards", "x0_hat", "means_guided", "guidance"):
    np.testing.assert_allclose(getattr(full, name), getattr(off, name), rtol=0, atol=1e-6,
                               err_msg=name)


def test_ode_steps_outside_the_window():
  """Off the window: x_{i+1} = x_i - dt v (Euler), log-prob 0, no guidance; inside: SDE."""
  cfg = _cfg(dict(mode="random", size=2, per="group"))
  b, n = 8, cfg.num_steps
  starts = windows.window_starts(cfg, jax.random.key(3), 0, b)
  r = _roll(cfg, b, keep_means=True, window_start=starts)
  mask = np.asarray(r.sde_mask)
  np.testing.assert_array_equal(mask, np.asarray(windows.window_mask(cfg, starts)))
  assert (mask.sum(1) == 2).all()
  lp = np.asarray(r.logprobs)
  assert (lp[~mask] == 0).all() and (lp[mask] != 0).all()
  arrs = sampling.grid_arrays(cfg)
  lat = np.asarray(r.latents)
  for i in range(n):
    x = jnp.asarray(lat[:, i])
    v = oracle_velocity(P_V, x, jnp.full((b,), arrs.t[i]), None)
    euler = np.asarray(x - arrs.dt[i] * v)
    ode = ~mask[:, i]
    np.testing.assert_allclose(lat[ode, i + 1], euler[ode], atol=1e-6)
    if (~ode).any():
      assert not np.allclose(lat[~ode, i + 1], euler[~ode], atol=1e-3)  # noise inside
  guided = np.abs(np.asarray(r.guidance)).sum(-1) > 0
  np.testing.assert_array_equal(guided, mask & arrs.guided[None])  # guidance in both windows
  assert (np.asarray(r.process_rewards)[:, arrs.scored] != 0).all()  # values on every scored step


@pytest.mark.parametrize("per", ["iteration", "group"])
def test_branching_shared_prefix_is_exact(per):
  window = dict(mode="random", size=2, range_end=6, per=per)
  plain, branched = _cfg(window), _cfg(dict(window, branch=True))
  for key in range(3):
    starts = windows.window_starts(plain, jax.random.key(key), key, 8)
    a = _roll(plain, 8, key=key, keep_means=True, window_start=starts)
    c = _roll(branched, 8, key=key, keep_means=True, window_start=starts)
    for name in ("latents", "logprobs", "process_rewards", "x0_hat", "means_guided"):
      np.testing.assert_allclose(getattr(c, name), getattr(a, name), atol=1e-5, err_msg=name)
  with pytest.raises(ValueError, match="share_noise_in_group"):
    _cfg(dict(window, branch=True), share_noise_in_group=False)


def _mixgrpo_starts(iterations, w, n, iters_per_group, step, roll_back):
  """MixGRPO's GRPOTrainingStates ('progressive', prog_overlap) with its window
  range(cur, cur + w) kept whole: positions 0 .. N - 1 - w (our `bounds`)."""
  cur, it_in, out, last = 0, 0, [], n - 1 - w
  for _ in range(iterations):
    out.append(cur)
    it_in += 1
    if it_in >= iters_per_group:
      it_in, cur = 0, cur + step
    if cur > last:
      cur = 0 if roll_back else last
  return out


@pytest.mark.parametrize("wrap,stride", [(True, 1), (True, 3), (False, 2)])
def test_sliding_window_follows_mixgrpo(wrap, stride):
  cfg = _cfg(dict(mode="sliding", size=3, shift_every=2, stride=stride, wrap=wrap), n=10)
  fn = jax.jit(lambda it: windows.window_starts(cfg, jax.random.key(0), it, 4))
  got = [int(fn(jnp.int32(it))[0]) for it in range(40)]
  assert got == _mixgrpo_starts(40, 3, 10, 2, stride, wrap)
  assert fn._cache_size() == 1  # the iteration is traced: one program for every position


def test_random_window_starts():
  cfg = _cfg(dict(mode="random", size=2, range_start=1, range_end=6, per="group"))
  draws = np.stack([np.asarray(windows.window_starts(cfg, jax.random.key(k), 0, 16))
                    for k in range(200)])
  assert draws.min() == 1 and draws.max() == 4  # uniform in [range_start, range_end - size]
  assert (draws.reshape(200, 4, 4) == draws.reshape(200, 4, 4)[:, :, :1]).all()  # per group
  np.testing.assert_array_equal(windows.window_starts(cfg, jax.random.key(7), 0, 16),
                                windows.window_starts(cfg, jax.random.key(7), 0, 16))
  with pytest.raises(ValueError, match="window.range_end"):
    _cfg(dict(mode="random", size=4, range_start=5))


def test_select_steps_draws_only_sde_steps():
  n, b = 8, 16
  cfg = _cfg(dict(mode="random", size=3, per="group", range_end=n))
  starts = windows.window_starts(cfg, jax.random.key(1), 0, b)
  mask = windows.window_mask(cfg, starts)
  k_train = windows.trainable_per_sample(cfg)
  assert k_train == 2  # a window may end at N, whose last step is never trained
  for selection in ("random", "first"):
    steps = np.asarray(grpo.select_steps(jax.random.key(2), b, n, 1.0, selection, mask=mask,
                                         trainable=k_train))
    assert steps.shape == (b, 2) and (steps < n - 1).all()
    assert np.take_along_axis(np.asarray(mask), steps, 1).all()
    assert (np.diff(np.sort(steps, 1), axis=1) > 0).all()  # distinct
  ones = jnp.ones((b, n), bool)
  np.testing.assert_array_equal(grpo.select_steps(jax.random.key(2), b, n, 0.6, mask=ones),
                                grpo.select_steps(jax.random.key(2), b, n, 0.6))


def test_update_never_trains_ode_steps():
  """Transitions off the mask: zero loss, zero gradient, ratio 1 (the velocity's parameters
  are the oracle's mean)."""
  cfg = _cfg(dict(mode="sliding", size=2, range_start=2))
  b, n = 8, cfg.num_steps
  r = _roll(cfg, b, window_start=jnp.full((b,), 2, jnp.int32))
  arrs = sampling.grid_arrays(cfg)
  hp = grpo.Hyper(mode="none", clip_range=0.2)
  adv = jnp.asarray(np.random.default_rng(0).normal(size=(b, 1)), jnp.float32)
  vel = lambda p, x, t, c: oracle_velocity((p, P_V[1]), x, t, c)
  mu = P_V[0] + 0.1
  ode_steps = jnp.full((b, 1), 5, jnp.int32)
  sde_steps = jnp.full((b, 1), 3, jnp.int32)
  batch = lambda steps, mask: grpo.Batch(r.latents, r.logprobs, adv, jnp.zeros((b, n)), steps,
                                         None, sde_mask=mask)
  loss_fn = grpo.make_loss(vel, arrs, hp)
  grad = jax.grad(lambda p, bt: loss_fn(p, p, bt)[0])
  (loss, met), g_ode = loss_fn(mu, mu, batch(ode_steps, r.sde_mask)), grad(mu, batch(ode_steps,
                                                                                   r.sde_mask))
  assert float(loss) == 0.0 and float(met["ratio_mean"]) == 1.0
  assert float(jnp.abs(g_ode).max()) == 0.0
  assert float(jnp.abs(grad(mu, batch(ode_steps, None))).max()) > 0  # unmasked it would train
  g_sde = grad(mu, batch(sde_steps, r.sde_mask))
  np.testing.assert_array_equal(g_sde, grad(mu, batch(sde_steps, None)))  # SDE steps: as before


def _chain(n, g, grid):
  """Exact law (mean, std) of the linear-Gaussian chain with per-step g (oracle velocity)."""
  t = grid
  m, var = np.zeros_like(MU), np.ones_like(MU)
  for i in range(n):
    ti, dt = t[i], t[i] - t[i + 1]

    def mean(x):
      v = np.asarray(oracle_velocity(P_V, jnp.full((1, MU.size), x, jnp.float32),
                                     jnp.full((1,), ti, jnp.float32), None))[0]
      return x - dt * (v + g[i]**2 / (2 * ti) * (x + (1 - ti) * v))
    c = mean(0.0)
    a = mean(1.0) - c
    m, var = a * m + c, a * a * var + g[i]**2 * dt
  return m, np.sqrt(var)


@pytest.mark.parametrize("solver", ["euler", "dpm2"])
def test_oracle_windowed_law(solver):
  b = 4096
  for n in (16, 64):
    cfg = sampling.preset("flow_grpo", num_steps=n, shift=5.0, group_size=1,
                          window=dict(mode="sliding", size=n // 4, range_start=n // 4,
                                      ode_solver=solver))
    start = jnp.full((b,), n // 4, jnp.int32)
    x = np.asarray(_roll(cfg, b, key=n, window_start=start).latents[:, -1], np.float64)
    if solver == "euler":
      arrs = sampling.grid_arrays(cfg)
      g = np.where(np.asarray(windows.window_mask(cfg, start))[0], arrs.g, 0.0)
      m_ex, s_ex = _chain(n, g, sampling.time_grid(cfg))
      np.testing.assert_array_less(np.abs(x.mean(0) - m_ex), 4.5 * s_ex / np.sqrt(b))
      np.testing.assert_array_less(np.abs(x.std(0) - s_ex), 4.5 * s_ex / np.sqrt(2 * b))
    tol = 0.05 if n == 16 else 0.02  # discretisation, shrinking with N
    np.testing.assert_array_less(np.abs(x.mean(0) - MU), tol + 4.5 * S / np.sqrt(b))
    if n == 64:
      np.testing.assert_array_less(np.abs(x.std(0) - S), 0.06 + 4.5 * S / np.sqrt(2 * b))


def test_dpm2_matches_mixgrpo_formula():
  """x_t = (s_t / s_0) x - a_t (e^-h - 1) (D0 + D1 / 2), D1 = (m0 - m1) / r0 (MixGRPO's
  multistep_dpm_solver_second_order_update, dpmsolver++, midpoint) in flow time."""
  t = sampling.shifted_grid(20, 3.0)
  c = windows.dpm2_coefficients(t)
  rng = np.random.default_rng(0)
  lam = lambda s: np.log(1 - s) - np.log(s)
  for i in range(2, 17):
    x, v, m1 = rng.normal(size=(3, 5))
    m0 = x - t[i] * v
    h, h0 = lam(t[i + 1]) - lam(t[i]), lam(t[i]) - lam(t[i - 1])
    ref = (t[i + 1] / t[i]) * x - (1 - t[i + 1]) * (np.exp(-h) - 1) * (m0 + 0.5 * (m0 - m1) * h / h0)
    ours = x - (t[i] - t[i + 1]) * v + c[i] * (m0 - m1)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)
  assert c[0] == 0 and c[-1] == 0  # no history / the final first-order step
  assert windows.dpm2_coefficients(sampling.shifted_grid(10, 3.0))[-2] == 0  # N < 15 rule
  assert windows.dpm2_coefficients(sampling.shifted_grid(20, 3.0))[1] == 0  # after t = 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flow_grpo_fast", "mix_grpo"])
def test_grpo_stage_runs_window_configs(name, tiny_init, tmp_path):
  from euphonium_jax import main, report
  from conftest import use_tiny_world
  c = use_tiny_world(config_lib.from_file(os.path.join(REPO, "configs", f"{name}.py")))
  c.sampling.update(num_steps=6, group_size=4)
  c.sampling.window.range_end = 4 if name == "flow_grpo_fast" else None
  c.sampling.window.shift_every = 1
  c.grpo.update(iterations=2, prompts_per_iteration=2, samples_per_update=8, eval_every=0,
                ckpt_every=2)
  c.eval.update(num_prompts=4, num_steps=2)
  c.init.pretrain = os.path.join(tiny_init, "pretrain")
  config_lib.validate(c)
  main.run(c, str(tmp_path))
  rows = [r for r in report.read_metrics(str(tmp_path), "grpo") if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert np.isfinite(r["loss"]) and r["skipped"] == 0
    assert r["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # one update: on policy
