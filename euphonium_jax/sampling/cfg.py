"""Classifier-free guidance and the conditioning the sampler carries.

The conditioning `cond` that the rollout and the GRPO update hand to the velocity and the PRM
is a dict `{'text': text, 'negative': text}` of two text-encoder outputs of the same shapes,
one row per sample: the prompt and its negative prompt (the null prompt unless a prompt set
gives one per prompt, as Wan's pipeline does). `negative` may be absent when CFG is off.

`cfg_velocity(velocity, scale)` turns a network's velocity `(params, x, t, text)` into the
policy's `(params, x, t, cond)`: `v_neg + scale (v_text - v_neg)`, one batched network call of
2B samples; scale 1 is the plain velocity of the prompt. The PRM sees the prompt only
(`text_only`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def cfg_velocity(velocity: Callable, scale: float) -> Callable:
  """`(params, x, t, text) -> v` into `(params, x, t, cond) -> v` with CFG of `scale`."""
  scale = float(scale)
  if scale == 1.0:
    return lambda params, x, t, cond: velocity(params, x, t, cond["text"])

  def fn(params, x, t, cond):
    b = x.shape[0]
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond["text"], cond["negative"])
    v = velocity(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    return v[b:] + scale * (v[:b] - v[b:])
  return fn


def text_only(fn: Callable | None) -> Callable | None:
  """A PRM `(params, x, t, text)` as `(params, x, t, cond)`: it scores the prompt only."""
  if fn is None:
    return None
  return lambda params, x, t, cond: fn(params, x, t, cond["text"])


def make_cond(text: dict[str, Any], negative: dict[str, Any] | None = None) -> dict[str, Any]:
  """The sampler's conditioning from per-sample text (and negative-prompt) encodings."""
  return {"text": text} if negative is None else {"text": text, "negative": negative}


def broadcast_negative(text: dict[str, Any], null: dict[str, Any]) -> dict[str, Any]:
  """The conditioning with one null encoding `[1, ...]` as every sample's negative prompt."""
  b = jax.tree.leaves(text)[0].shape[0]
  neg = jax.tree.map(lambda a: jnp.broadcast_to(a[:1], (b,) + a.shape[1:]), null)
  return make_cond(text, neg)
