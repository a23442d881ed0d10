"""Time grids, diffusion schedules g(t) and guidance strengths of the SDE sampler.

Everything here is computed once on the host, in float64 numpy, from a static
`SamplerConfig`, then cast to float32: the per-step arrays are compile-time constants of
the rollout and the same numbers the GRPO update indexes (`grid_arrays`).

Conventions (DESIGN.md section 2): t = 1 is noise, t = 0 data; the grid is decreasing,
`dt_i = t_i - t_{i+1} > 0`, and step i uses `g_i = g(t_i)`. The networks (velocity and PRM)
of step i are evaluated at `t_model_i`: `t_i`, or Wan's integer timestep `floor(1000 t_i)`
over 1000 (`sampling.timesteps = 'truncated'`); the SDE step always uses `t_i`.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from euphonium_jax.sampling.config import TIMESTEPS, SamplerConfig

SQRT2 = float(np.sqrt(2.0))
# Flow-GRPO's t = 1 guard fires at step 0 when 1 - t_0 is below this: one training timestep
# (1 / 1000) of the networks' integer clock, so t_0 is "pure noise" to the network. Flow-GRPO
# tests `sigma == 1`, right on its SD3 (Euler) grids, which start at 1; diffusers' UniPC grid
# (Wan's) starts at 1 - 1e-6, where `a sqrt(t / (1 - t))` is 1000 a (Flow-GRPO's Wan recipe
# uses `t_1 t` instead and needs no guard). Only step 0 is guarded: a very fine grid (e.g. 768
# steps at shift 5) has t_1 within 1e-3 of 1 too, and keeps the plain formula there.
T1_GUARD = 1e-3
NUM_TRAIN_TIMESTEPS = 1000  # the networks' timestep is `1000 t` (truncated: its integer part)


def shift_times(u, shift: float) -> np.ndarray:
  """The resolution shift `shift * u / (1 + (shift - 1) u)` of times u in [0, 1] (float64)."""
  u = np.asarray(u, np.float64)
  return shift * u / (1.0 + (shift - 1.0) * u)


def shifted_grid(num_steps: int, shift: float) -> np.ndarray:
  """The default grid: `shift_times(linspace(1, 0, N + 1), shift)`, float64 `[N + 1]`.

  To reproduce a diffusers flow-matching scheduler pass its sigmas (N + 1 decreasing
  times, ending at 0) as `sampling.grid` instead; e.g. the Euler scheduler's
  `shift_times(linspace(1, 1/1000, N), shift)` with 0 appended (check your diffusers
  version: the construction has changed between releases).
  """
  return shift_times(np.linspace(1.0, 0.0, num_steps + 1), shift)


def unipc_flow_grid(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> np.ndarray:
  """The [N + 1] times of diffusers' UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift)
  (Wan's scheduler): N points of linspace(1, 1 / num_train_timesteps), shifted, the first
  nudged below 1 by 1e-6 as diffusers does, then 0."""
  s = np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)[:-1]
  s = shift * s / (1.0 + (shift - 1.0) * s)
  if abs(s[0] - 1.0) < 1e-6:
    s[0] -= 1e-6
  return np.concatenate([s, [0.0]])


def time_grid(cfg: SamplerConfig) -> np.ndarray:
  """The N + 1 decreasing times of `cfg`, float64: the explicit grid if given, else shifted."""
  if cfg.grid is not None:
    return np.asarray(cfg.grid, np.float64)
  return shifted_grid(cfg.num_steps, cfg.shift)


def diffusion_coefficients(t: np.ndarray, schedule: str, eta: float) -> np.ndarray:
  """g_i = g(t_i) for the N steps of grid `t` `[N + 1]`; float64 `[N]`.

  - `ode`: 0.   - `constant`: eta (DanceGRPO; the Euphonium reference uses 0.25).
  - `flow_grpo`: `eta * sqrt(t / (1 - t))` with Flow-GRPO's guard at t = 1: at step 0, when
    `1 - t_0 < T1_GUARD` (t_0 = 1, or diffusers' UniPC 1 - 1e-6), the denominator uses the
    second grid point, `g_0 = eta * sqrt(t_0 / (1 - t_1))` (`eta / sqrt(1 - t_1)` at t_0 = 1).
  - `memoryless`: the same form with `a = sqrt 2` (eta unused): the time reversal of the
    interpolation itself, the schedule under which guidance with gamma = 1/beta is an exact tilt.
  - `flow_grpo_wan`: `t_1 * t` (Flow-GRPO's Wan2.1 recipe; eta unused).
  """
  t = np.asarray(t, np.float64)
  tk = t[:-1]
  if schedule == "ode":
    return np.zeros_like(tk)
  if schedule == "constant":
    return np.full_like(tk, eta)
  if schedule in ("flow_grpo", "memoryless"):
    a = eta if schedule == "flow_grpo" else SQRT2
    denom_t = tk.copy()
    if 1.0 - tk[0] < T1_GUARD:
      denom_t[0] = t[1]
    return a * np.sqrt(tk / (1.0 - denom_t))
  if schedule == "flow_grpo_wan":
    return t[1] * tk
  raise ValueError(f"sampling.schedule = {schedule!r} is not allowed: choose one of "
                   "ode, constant, flow_grpo, flow_grpo_wan, memoryless")


def model_times(t: np.ndarray, timesteps: str) -> np.ndarray:
  """t_model_i, the time each step's networks see; float64 `[N]` from grid `t` `[N + 1]`.

  - `continuous`: `t_i` (the network computes `1000 t_i` itself).
  - `truncated`: `floor(1000 t_i) / 1000`, diffusers' integer timesteps (its UniPC scheduler
    casts the float64 `1000 sigma` to int64; Flow-GRPO's Wan pipeline feeds them to the
    transformer). Done in float64: a float32 floor is one off on some (unshifted) grids.
  """
  tk = np.asarray(t, np.float64)[:-1]
  if timesteps == "continuous":
    return tk
  if timesteps == "truncated":
    return np.floor(tk * NUM_TRAIN_TIMESTEPS) / NUM_TRAIN_TIMESTEPS
  raise ValueError(f"sampling.timesteps = {timesteps!r} is not allowed: choose one of "
                   + ", ".join(TIMESTEPS))


def guidance_mask(cfg: SamplerConfig) -> np.ndarray:
  """Bool `[N]`: step i is guided iff start <= i < end and (i - start) % interval == 0."""
  n = cfg.num_steps
  i = np.arange(n)
  gd = cfg.guidance
  if gd.mode == "off":
    return np.zeros(n, bool)
  end = n if gd.end is None else gd.end
  return (i >= gd.start) & (i < end) & ((i - gd.start) % gd.interval == 0)


def guidance_coefficients(cfg: SamplerConfig, t: np.ndarray, g: np.ndarray) -> np.ndarray:
  """c_i, the factor of grad R in the guided mean `mu^G = mu + c_i grad R`; float64 `[N]`.

  - `raw`:    `scale * dt_i` (the reference: 0.01 from step 12 of 16).
  - `beta`:   `eta^2 / (2 beta) * dt_i` (the reference's parameterisation of the same
              number; = `gamma g^2 dt` with `gamma = 1/(2 beta)` for g = eta constant).
  - `theory`: `g_i^2 dt_i / beta` (`gamma = 1/beta`: the exact tilt `p(x0) exp(r/beta)` under
              the memoryless schedule, DESIGN.md section 3).
  Zero outside the guidance window.
  """
  dt = np.diff(-np.asarray(t, np.float64))
  gd = cfg.guidance
  if gd.mode == "off":
    c = np.zeros_like(dt)
  elif gd.mode == "raw":
    c = gd.scale * dt
  elif gd.mode == "beta":
    c = cfg.eta**2 / (2.0 * gd.beta) * dt
  elif gd.mode == "theory":
    c = g**2 * dt / gd.beta
  else:
    raise ValueError(f"sampling.guidance.mode = {gd.mode!r} is not allowed: choose one of "
                     "off, raw, beta, theory")
  return np.where(guidance_mask(cfg), c, 0.0)


class GridArrays(NamedTuple):
  """Per-step constants of a sampler config, float32 numpy (GRPO indexes these).

  t: `[N + 1]` times; dt: `[N]` `t_k - t_{k+1}` (computed in float32, as in the step);
  t_model: `[N]` the time the networks (velocity, PRM) of step k are evaluated at (`t[:-1]`
  exactly unless `timesteps = 'truncated'`);
  g: `[N]` diffusion coefficients; guide_coef: `[N]` c_k (0 off the window);
  guided: `[N]` bool, steps with a PRM gradient; scored: `[N]` bool, steps with a PRM
  value (guided, plus all others when `score_unguided_steps`).
  """
  t: np.ndarray
  dt: np.ndarray
  g: np.ndarray
  guide_coef: np.ndarray
  guided: np.ndarray
  scored: np.ndarray
  t_model: np.ndarray


def grid_arrays(cfg: SamplerConfig) -> GridArrays:
  """All per-step constants of `cfg` (see `GridArrays`)."""
  t64 = time_grid(cfg)
  g64 = diffusion_coefficients(t64, cfg.schedule, cfg.eta)
  coef = guidance_coefficients(cfg, t64, g64)
  t = t64.astype(np.float32)
  guided = guidance_mask(cfg)
  scored = guided | np.full_like(guided, bool(cfg.score_unguided_steps))
  t_model = (t[:-1].copy() if cfg.timesteps == "continuous"
             else model_times(t64, cfg.timesteps).astype(np.float32))
  return GridArrays(t=t, dt=(t[:-1] - t[1:]).astype(np.float32), g=g64.astype(np.float32),
                    guide_coef=coef.astype(np.float32), guided=guided, scored=scored,
                    t_model=t_model)
