"""The rollout: N SDE steps in one `lax.scan`, guidance by the PRM gradient inside the body.

`make_rollout(velocity_fn, prm_fn, cfg)` returns a pure function

  rollout(params, prm_params, key, cond, latent_shape, x_init=None, noise=None) -> Rollout

to be jitted with `latent_shape` static: `jax.jit(rollout, static_argnames='latent_shape')`.
The whole guided rollout is one compiled program (no host round trips between steps).

`x_init` `[B, ...]` replaces the initial noise when given (e.g. to reuse a stored one), and
`noise` `[B, N, ...]` the per-step standard normals (step i draws `noise[:, i]`): together
they replay another implementation's trajectory exactly. The networks of step i are evaluated
at `t_model_i` (`GridArrays.t_model`: t_i, or Wan's truncated integer timestep); the SDE step,
its log-prob and `x0_hat` use t_i.

Randomness. `key` is split into an initial-noise key and a step key; step i draws its
noise from `fold_in(step_key, i)`. Noise is drawn for the whole (global) batch from one
key; with JAX's partitionable threefry (the default) each device computes exactly its
slice of that global draw, so under `jit` over a batch sharded across devices and hosts
every sample gets different noise and the result does not depend on the sharding. The
key must therefore be the same on every process (it is a replicated input): do NOT fold
`jax.process_index()` into it for a global-batch rollout. When each process instead
samples its own local batch (no global array), call `local_key(key)` first, which folds in
the process index. With `share_noise_in_group`, consecutive groups of `group_size` samples
share one initial noise (the GRPO group of one prompt); step noise is never shared.

SDE windows (`sampling.window`, `windows.py`). With `window.mode != 'off'` step i of sample b
is an SDE step only inside its window `[s_b, s_b + size)` and an ODE step (g = 0, log-prob 0,
no guidance) elsewhere; `window_start` `[B]` int32 gives s (traced: one compiled program for
every position; default `window_starts(cfg, key, 0, B)`), and `Rollout.sde_mask` records it.
Guidance acts on guided steps inside the window only; PRM values are still recorded on every
scored step. With `window.branch` the ODE prefix of a group (whose samples share one initial
noise, hence one prefix) is computed once, on the group's first sample (every leaf of `cond`
must be batch-first), and only the steps from the window on run for all G samples.

PRM. `prm_fn(prm_params, x, t, cond) -> [B]`. Samples are independent, so the per-sample
gradient is `grad_x sum_b R_b`: `jax.value_and_grad(..., has_aux=True)` of the sum returns
it together with the per-sample values, which are recorded as the process rewards of the
guided steps. With guidance off and `score_unguided_steps` False there are no PRM calls.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from euphonium_jax.sampling.config import SamplerConfig
from euphonium_jax.sampling.schedules import grid_arrays, time_grid
from euphonium_jax.sampling.step import sde_step, x0_hat as _x0_hat
from euphonium_jax.sampling.windows import dpm2_coefficients, window_mask, window_starts

VelocityFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]
PrmFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]


class Rollout(NamedTuple):
  """A batch of trajectories, batch-first.

  latents: `[B, N + 1, ...]` x_{t_0} (initial noise) ... x_{t_N}, float32.
  logprobs: `[B, N]` log pi of each drawn transition (float32).
  process_rewards: `[B, N]` PRM value at the pre-step latent (0 where not scored).
  x0_hat: `[B, ...]` clean estimate `x - t v` of the last step (what the ORM scores).
  timesteps: `[N + 1]` the grid.  key: the key the rollout used (its input).
  means_guided: `[B, N, ...]` the mean each sample was drawn from (guided where guided), and
  guidance: `[B, N, ...]` its guidance shift `mu^G - mu` (0 off the window); both only with
  `keep_means=True` (GRPO's distillation term and guided-mean log-probs), else None.
  sde_mask: `[B, N]` bool, the SDE steps of each sample (its window), only for a windowed
  sampler (`sampling.window.mode != 'off'`), else None: the other steps are ODE steps with
  log-prob 0, never trained.
  """
  latents: jax.Array
  logprobs: jax.Array
  process_rewards: jax.Array
  x0_hat: jax.Array
  timesteps: jax.Array
  key: jax.Array
  means_guided: Optional[jax.Array] = None
  guidance: Optional[jax.Array] = None
  sde_mask: Optional[jax.Array] = None


def local_key(key: jax.Array) -> jax.Array:
  """`fold_in(key, process_index)`: for per-process local batches only (see module doc)."""
  return jax.random.fold_in(key, jax.process_index())


def standard_normal(key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """N(0, I) float32 of `shape` `[B, ...]`, drawn as `[B, prod(...)]` and reshaped (the same
  numbers; XLA:CPU compiles the 2-D draw several times faster than a 5-D one)."""
  shape = tuple(shape)
  return jax.random.normal(key, (shape[0], math.prod(shape[1:])), jnp.float32).reshape(shape)


def initial_noise(key: jax.Array, latent_shape: Sequence[int], cfg: SamplerConfig) -> jax.Array:
  """Standard normal `[B, ...]` float32; shared within consecutive groups if configured."""
  b = latent_shape[0]
  if not cfg.share_noise_in_group or cfg.group_size == 1:
    return standard_normal(key, latent_shape)
  if b % cfg.group_size:
    raise ValueError(f"sampling.group_size = {cfg.group_size} must divide the batch size "
                     f"{b} when sampling.share_noise_in_group is True")
  n_groups = b // cfg.group_size
  z = standard_normal(key, (n_groups,) + tuple(latent_shape[1:]))
  return jnp.repeat(z, cfg.group_size, axis=0)


def normalize_grad(grad: jax.Array) -> jax.Array:
  """Per-sample unit root-mean-square over the latent dims (size-independent magnitude)."""
  flat = grad.reshape(grad.shape[0], -1)
  rms = jnp.sqrt(jnp.mean(flat * flat, axis=-1))
  return grad / (rms.reshape((-1,) + (1,) * (grad.ndim - 1)) + 1e-12)


def make_rollout(velocity_fn: VelocityFn, prm_fn: Optional[PrmFn], cfg: SamplerConfig,
                 batch_sharding: Optional[jax.sharding.Sharding] = None,
                 keep_means: bool = False):
  """Builds the pure rollout for `cfg` (see module doc). `batch_sharding`, if given, is
  applied to the latent carry with `with_sharding_constraint` (e.g.
  `NamedSharding(mesh, P('data'))` on a mesh with `AxisType.Auto` axes). `keep_means` also
  returns every step's guided mean and guidance shift (see `Rollout`)."""
  arrs = grid_arrays(cfg)
  n = cfg.num_steps
  use_grad = bool(arrs.guided.any())
  use_prm = bool(arrs.scored.any())
  if use_prm and prm_fn is None:
    raise ValueError(f"sampling.guidance.mode = {cfg.guidance.mode!r} / "
                     f"sampling.score_unguided_steps = {cfg.score_unguided_steps} need a PRM, "
                     "but prm_fn is None: pass one, or set guidance.mode = 'off' and "
                     "score_unguided_steps = False")
  # Branch per step: 0 = plain, 1 = PRM forward only, 2 = PRM value and gradient.
  branch = np.where(arrs.guided, 2, np.where(arrs.scored, 1, 0)).astype(np.int32)
  dpm2 = dpm2_coefficients(time_grid(cfg)) if cfg.windowed else None

  def constrain(x):
    return x if batch_sharding is None else jax.lax.with_sharding_constraint(x, batch_sharding)

  def rollout(params, prm_params, key, cond, latent_shape, x_init=None, noise=None,
              window_start=None) -> Rollout:
    latent_shape = tuple(latent_shape)
    b = latent_shape[0]
    k_init, k_steps = jax.random.split(key)
    x = initial_noise(k_init, latent_shape, cfg) if x_init is None else x_init
    x = constrain(x.astype(jnp.float32))
    if noise is not None and tuple(noise.shape) != (b, n) + latent_shape[1:]:
      raise ValueError(f"noise has shape {tuple(noise.shape)}; make_rollout needs [B, N, ...] = "
                       f"{(b, n) + latent_shape[1:]} (sampling.num_steps = {n})")

    def prm_branches(cond, rows):
      """[plain, PRM value, PRM value and gradient] for `rows` samples with text `cond`."""
      def prm_plain(x, t_b):
        return jnp.zeros_like(x), jnp.zeros((rows,), jnp.float32)

      def prm_value(x, t_b):
        r = prm_fn(prm_params, x, t_b, cond).astype(jnp.float32)
        return jnp.zeros_like(x), r

      def prm_value_and_grad(x, t_b):
        def total(y):
          r = prm_fn(prm_params, y, t_b, cond).astype(jnp.float32)
          return jnp.sum(r), r
        (_, r), grad = jax.value_and_grad(total, has_aux=True)(x)
        grad = grad.astype(jnp.float32)
        return (normalize_grad(grad) if cfg.guidance.normalize else grad), r

      return [prm_plain, prm_value] + ([prm_value_and_grad] if use_grad else [])

    def body(carry, inp):
      x, _ = carry
      i, t, t_next, g, coef, br, t_net, step_noise = inp
      t_b = jnp.full((b,), t_net, jnp.float32)  # the networks' time (t unless truncated)
      v = velocity_fn(params, x, t_b, cond)
      if use_prm:
        grad, r = jax.lax.switch(br, prm_branches(cond, b), x, t_b)
      else:
        grad, r = None, jnp.zeros((b,), jnp.float32)
      if step_noise is None:
        step_noise = standard_normal(jax.random.fold_in(k_steps, i), latent_shape)
      else:
        step_noise = constrain(step_noise)
      out = sde_step(x, v, t, t_next, g, step_noise,
                     guidance_grad=grad if use_grad else None,
                     guidance_coef=coef, logprob_mean=cfg.logprob_mean)
      x_new = constrain(out.sample)
      kept = (out.mean_guided, out.mean_guided - out.mean) if keep_means else ()
      return (x_new, _x0_hat(x, v, t)), (x_new, out.logprob, r, kept)

    def windowed_step(cond, rows, starts, carry, inp):
      """Step i for `rows` samples: the SDE for those whose window `[s, s + size)` holds i, the
      ODE for the others (g = 0: Euler, no guidance, log-prob 0; DPM-Solver++(2M) after the
      window with `ode_solver = 'dpm2'`)."""
      x, x0_prev = carry
      i, t, t_next, g, coef, br, t_net, step_noise, c2 = inp
      sde = (i >= starts) & (i < starts + cfg.window.size)
      t_b = jnp.full((rows,), t_net, jnp.float32)
      v = velocity_fn(params, x, t_b, cond)
      if use_prm:
        if use_grad:  # a guided step that no sample takes as an SDE step needs the value only
          br = jnp.where((br == 2) & ~jnp.any(sde), 1, br)
        grad, r = jax.lax.switch(br, prm_branches(cond, rows), x, t_b)
      else:
        grad, r = None, jnp.zeros((rows,), jnp.float32)
      full = rows == b
      if not full:  # a shared prefix: ODE steps only, no noise drawn
        step_noise = jnp.zeros_like(x)
      elif step_noise is None:
        step_noise = standard_normal(jax.random.fold_in(k_steps, i), latent_shape)
      else:
        step_noise = constrain(step_noise)
      out = sde_step(x, v, t, t_next, jnp.where(sde, g, 0.0), step_noise,
                     guidance_grad=grad if use_grad else None,
                     guidance_coef=jnp.where(sde, coef, 0.0), logprob_mean=cfg.logprob_mean)
      x0 = _x0_hat(x, v, t)
      x_new = out.sample
      if cfg.window.ode_solver == "dpm2":
        post = (i >= starts + cfg.window.size).reshape((rows,) + (1,) * (x.ndim - 1))
        x_new = jnp.where(post, x_new + c2 * (x0 - x0_prev), x_new)
      x_new = constrain(x_new) if full else x_new
      kept = (out.mean_guided, out.mean_guided - out.mean) if keep_means else ()
      return (x_new, x0), (x_new, out.logprob, r, kept)

    def scan_rows(cond, rows, starts, carry, xs, active=None):
      """`lax.scan` of `windowed_step`. With `active(i, starts) -> [rows]` only those samples
      take step i (the others keep their state) and a step that none takes is skipped."""
      def body(carry, inp):
        run = lambda c: windowed_step(cond, rows, starts, c, inp)
        if active is None:
          return run(carry)
        on = active(inp[0], starts)
        x = carry[0]
        zeros = jnp.zeros((rows,), jnp.float32)
        skip = lambda c: (c, (jnp.zeros_like(x), zeros, zeros,
                              (jnp.zeros_like(x),) * 2 if keep_means else ()))
        new, outs = jax.lax.cond(jnp.any(on), run, skip, carry)
        keep = lambda a, old: jnp.where(on.reshape((rows,) + (1,) * (a.ndim - 1)), a, old)
        return jax.tree.map(keep, new, carry), outs
      return jax.lax.scan(body, carry, xs)

    def windowed(x, starts, xs):
      """(x0_hat, per-step outputs `[N, B, ...]`) of a windowed rollout; with `branch`, each
      group's ODE prefix (steps before its window) runs once, on its first sample."""
      carry = (x, jnp.zeros_like(x))
      if not cfg.window.branch:
        (_, x0), outs = scan_rows(cond, b, starts, carry, xs)
        return x0, outs
      gs, (_, last) = cfg.group_size, cfg.window.bounds(n)  # a prefix has at most `last` steps
      prefix = None
      if last > 0:
        pick = lambda a: a[::gs]
        xs1 = tuple(None if a is None or k == 7 else a[:last] for k, a in enumerate(xs))
        c1, prefix = scan_rows(jax.tree.map(pick, cond), b // gs, starts[::gs],
                               jax.tree.map(pick, carry), xs1, active=lambda i, s: i < s)
        carry = jax.tree.map(lambda a: constrain(jnp.repeat(a, gs, axis=0)), c1)
      (_, x0), outs = scan_rows(cond, b, starts, carry, xs, active=lambda i, s: i >= s)
      if prefix is not None:
        in_prefix = jnp.arange(last, dtype=jnp.int32)[:, None] < starts[None, :]  # [last, B]

        def merge(full, pre):
          pre = jnp.repeat(pre, gs, axis=1)
          head = jnp.where(in_prefix.reshape(in_prefix.shape + (1,) * (pre.ndim - 2)), pre,
                           full[:last])
          return jnp.concatenate([head, full[last:]], axis=0)
        outs = jax.tree.map(merge, outs, prefix)
      return x0, outs

    steps_noise = None if noise is None else jnp.moveaxis(noise.astype(jnp.float32), 1, 0)
    xs = (jnp.arange(n, dtype=jnp.int32), jnp.asarray(arrs.t[:-1]), jnp.asarray(arrs.t[1:]),
          jnp.asarray(arrs.g), jnp.asarray(arrs.guide_coef), jnp.asarray(branch),
          jnp.asarray(arrs.t_model), steps_noise)
    sde_mask = None
    if not cfg.windowed:
      (_, x0), (samples, lps, rs, kept) = jax.lax.scan(body, (x, jnp.zeros_like(x)), xs)
    else:
      starts = (window_starts(cfg, key, 0, b) if window_start is None
                else jnp.asarray(window_start, jnp.int32).reshape(b))
      sde_mask = window_mask(cfg, starts)
      xs = xs + (jnp.asarray(dpm2, jnp.float32),)
      x0, (samples, lps, rs, kept) = windowed(x, starts, xs)
    latents = jnp.concatenate([x[None], samples], axis=0)
    kept = tuple(jnp.moveaxis(a, 0, 1) for a in kept) if keep_means else (None, None)
    return Rollout(latents=jnp.moveaxis(latents, 0, 1), logprobs=lps.T,
                   process_rewards=rs.T, x0_hat=x0, timesteps=jnp.asarray(arrs.t), key=key,
                   means_guided=kept[0], guidance=kept[1], sde_mask=sde_mask)

  return rollout
