"""SDE windows: which steps of a trajectory are stochastic, and the ODE solver outside them.

Flow-GRPO-Fast and MixGRPO train only the transitions of a short window of w SDE steps
`[s, s + w)` and run the probability-flow ODE (g = 0: the Euler step `x - dt v`, a deterministic
kernel with no log-prob) everywhere else. The window start `s` of an iteration is a traced value
(`window_starts`: jnp only, so the rollout program compiles once for every position) and a pure
function of (the iteration's key, the iteration), so a resumed run draws the same windows:

  random   (Flow-GRPO-Fast, its pipeline's `sde_window`): s uniform in [first, last], one draw
           per iteration (`per = 'iteration'`) or one per group of G (`per = 'group'`).
  sliding  (MixGRPO's `progressive` strategy with `prog_overlap`): position
           k = iteration // shift_every, s = first + stride * k, wrapping back to `first` after
           the last start (`wrap`, MixGRPO's `roll_back`) or held at `last`.

`(first, last) = WindowConfig.bounds(N)`. MixGRPO's DPM-Solver++(2M) for the ODE steps after
the window (its `dpm_apply_strategy = 'post'`, `dpm_solver_type = 'midpoint'`) is, in flow
time (alpha = 1 - t, sigma = t, lambda = log(alpha / sigma)), the Euler step plus a correction:

  x_{i+1} = x_i - dt_i v_i + C_i (x0_hat_i - x0_hat_{i-1}),   C_i = (dt_i / (2 t_i)) h_i / h0_i
  h_i = lambda(t_{i+1}) - lambda(t_i),   h0_i = lambda(t_i) - lambda(t_{i-1})

(its first-order update is exactly the Euler step of the flow), with C_i = 0 where diffusers and
MixGRPO fall back to first order: step 0 (no history), the last step, the second-to-last when
N < 15, and after t = 1 (h0 infinite). MixGRPO-Flash's compression of the post-window grid is
not offered: it changes the number of steps with the window position.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from euphonium_jax.sampling.config import SamplerConfig

WINDOW_KEY = 0x5DE  # folded into the rollout key for random windows (the rollout splits it too)


def window_starts(cfg: SamplerConfig, key: jax.Array, iteration, batch: int) -> jax.Array:
  """`[B]` int32 window start of every sample (see module doc); zeros when windows are off.

  `iteration` may be traced (an int32 scalar); `key` is the iteration's rollout key."""
  w = cfg.window
  if w.mode == "off":
    return jnp.zeros((batch,), jnp.int32)
  first, last = w.bounds(cfg.num_steps)
  if w.mode == "sliding":
    k = jnp.asarray(iteration, jnp.int32) // w.shift_every
    if w.wrap:
      positions = (last - first) // w.stride + 1
      s = first + w.stride * (k % positions)
    else:
      s = jnp.minimum(first + w.stride * k, last)
    return jnp.full((batch,), s, jnp.int32)
  k = jax.random.fold_in(key, WINDOW_KEY)
  if w.per == "iteration":
    return jnp.full((batch,), jax.random.randint(k, (), first, last + 1), jnp.int32)
  g = cfg.group_size
  if batch % g:
    raise ValueError(f"sampling.group_size = {g} must divide the batch size {batch} when "
                     "sampling.window.per = 'group'")
  s = jax.random.randint(k, (batch // g,), first, last + 1).astype(jnp.int32)
  return jnp.repeat(s, g)


def window_mask(cfg: SamplerConfig, starts: jax.Array) -> jax.Array:
  """`[B, N]` bool: step i of sample b is an SDE step iff starts_b <= i < starts_b + size (all
  True when windows are off)."""
  n = cfg.num_steps
  i = jnp.arange(n, dtype=jnp.int32)[None]
  if cfg.window.mode == "off":
    return jnp.ones((starts.shape[0], n), bool)
  s = starts.astype(jnp.int32)[:, None]
  return (i >= s) & (i < s + cfg.window.size)


def trainable_per_sample(cfg: SamplerConfig) -> int:
  """SDE steps every sample has among the trainable transitions 0 .. N - 2 (N - 1 without a
  window; `size`, or `size - 1` when a window may end at N, where the last step is never
  trained)."""
  n = cfg.num_steps
  if cfg.window.mode == "off":
    return n - 1
  _, last = cfg.window.bounds(n)
  return cfg.window.size - (1 if last + cfg.window.size == n else 0)


def dpm2_coefficients(t: np.ndarray) -> np.ndarray:
  """C_i of the DPM-Solver++(2M) correction (module doc) for grid `t` `[N + 1]`; float64 `[N]`."""
  t = np.asarray(t, np.float64)
  n = len(t) - 1
  c = np.zeros(n)
  with np.errstate(divide="ignore"):
    lam = np.log(1.0 - t) - np.log(t)
  for i in range(1, n - 1):
    if n < 15 and i == n - 2:
      continue
    if not (np.isfinite(lam[i - 1]) and np.isfinite(lam[i + 1])):
      continue
    h, h0 = lam[i + 1] - lam[i], lam[i] - lam[i - 1]
    c[i] = (t[i] - t[i + 1]) / (2.0 * t[i]) * h / h0
  return c
