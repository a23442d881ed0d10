"""One step of the SDE sampler and the Gaussian log-prob of a transition (DESIGN.md section 3).

From `x = x_{t}` with velocity `v`, diffusion coefficient `g` and `dt = t - t_next`:

  drift  = v + (g^2 / (2 t)) (x + (1 - t) v)        # = v - (g^2 / 2) * score
  mean   = x - dt * drift                            # unguided mean
  mean_G = mean + c * grad R(x)                      # c = guidance coefficient (includes dt)
  x_next = mean_G + g sqrt(dt) xi,   xi ~ N(0, I)
  log pi = mean over latent dims of log N(x_next; mean (or mean_G), (g^2 dt) I)   (float32)

All arithmetic is float32. Times `t`, `t_next`, `g` and `c` are scalars or `[B]` arrays
(broadcast over the latent dims), so the GRPO update can evaluate a random step per sample.
With g = 0 (ODE) the std is 0 and the log-prob is defined as 0 (a deterministic kernel).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class StepOut(NamedTuple):
  """Everything about one step; arrays `[B, ...]` except `logprob` `[B]` and `std`
  (broadcastable to the latent: a scalar or `[B, 1, ...]`)."""
  mean: jax.Array
  mean_guided: jax.Array
  std: jax.Array
  sample: jax.Array
  logprob: jax.Array


def _per_sample(a, x: jax.Array) -> jax.Array:
  """Float32 scalar or `[B]` -> broadcastable against `x` `[B, ...]`."""
  a = jnp.asarray(a, jnp.float32)
  if a.ndim == 1:
    a = a.reshape(a.shape + (1,) * (x.ndim - 1))
  return a


def x0_hat(x: jax.Array, v: jax.Array, t) -> jax.Array:
  """Clean estimate `x - t v` `[B, ...]` (t scalar or `[B]`)."""
  x = x.astype(jnp.float32)
  return x - _per_sample(t, x) * v.astype(jnp.float32)


def step_mean(x: jax.Array, v: jax.Array, t, t_next, g) -> jax.Array:
  """Unguided mean `x - dt (v + g^2 / (2 t) (x + (1 - t) v))`, float32 `[B, ...]`."""
  x = x.astype(jnp.float32)
  v = v.astype(jnp.float32)
  t_, g_ = _per_sample(t, x), _per_sample(g, x)
  dt = t_ - _per_sample(t_next, x)
  drift = v + (g_ * g_ / (2.0 * t_)) * (x + (1.0 - t_) * v)
  return x - dt * drift


def step_std(x: jax.Array, t, t_next, g) -> jax.Array:
  """Transition std `g sqrt(dt)` (scalar or `[B, 1, ...]`)."""
  dt = _per_sample(t, x) - _per_sample(t_next, x)
  return _per_sample(g, x) * jnp.sqrt(dt)


def logprob(sample: jax.Array, mean: jax.Array, std) -> jax.Array:
  """Mean over latent dims of `log N(sample; mean, std^2)`, float32 `[B]`; 0 where std = 0."""
  sample = sample.astype(jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  pos = std > 0
  safe = jnp.where(pos, std, 1.0)
  z = (sample - mean.astype(jnp.float32)) / safe
  lp = jnp.where(pos, -0.5 * z * z - jnp.log(safe) - _HALF_LOG_2PI, 0.0)
  return jnp.mean(lp.reshape(lp.shape[0], -1), axis=-1)


def sde_step(x: jax.Array, v: jax.Array, t, t_next, g, noise: jax.Array,
             guidance_grad: Optional[jax.Array] = None, guidance_coef=0.0,
             logprob_mean: str = "unguided") -> StepOut:
  """One sampler step from `x` `[B, ...]` with velocity `v` and standard normal `noise`.

  `guidance_grad` is `grad_x R(x, t)` `[B, ...]` (None: unguided); `guidance_coef` c is its
  factor in the guided mean (scalar or `[B]`, dt included: see `schedules`). The log-prob
  of the drawn sample is taken under the unguided mean unless `logprob_mean='guided'`.
  """
  mean = step_mean(x, v, t, t_next, g)
  if guidance_grad is None:
    mean_g = mean
  else:
    mean_g = mean + _per_sample(guidance_coef, mean) * guidance_grad.astype(jnp.float32)
  std = step_std(mean, t, t_next, g)
  sample = mean_g + std * noise.astype(jnp.float32)
  lp = logprob(sample, mean_g if logprob_mean == "guided" else mean, std)
  return StepOut(mean=mean, mean_guided=mean_g, std=std, sample=sample, logprob=lp)


def step_logprob(x_k: jax.Array, x_next: jax.Array, v: jax.Array, t_k, t_next, g_k,
                 guidance_term: Optional[jax.Array] = None) -> jax.Array:
  """Log-prob `[B]` of a stored transition `x_k -> x_next` under velocity `v` (new params).

  `guidance_term` is the additive shift `c_k grad R(x_k)` `[B, ...]` when scoring under the
  guided mean (None: unguided mean, the default of the rollout). Uses the same float32
  arithmetic as `sde_step`, so at the rollout's parameters the ratio is 1.
  """
  mean = step_mean(x_k, v, t_k, t_next, g_k)
  if guidance_term is not None:
    mean = mean + guidance_term.astype(jnp.float32)
  return logprob(x_next, mean, step_std(mean, t_k, t_next, g_k))
