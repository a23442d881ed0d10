"""Graded corruptions of world clips: the failure modes a reward must punish, at a strength.

Geometry corruptions edit `world.clip_params` output and are rendered with `world.render`;
pixel corruptions act on frames `[n, T, H, W, 3]`. Strength 0 is the clean clip; larger is
worse. Used by the reward tests and by reward benchmarks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from euphonium_jax.data import world


def recolour(params: dict, attrs: jax.Array, strength: float) -> dict:
  """Blend the object's colour towards another palette colour (strength 1: fully another)."""
  other = (jnp.asarray(attrs)[:, 0] + 2) % len(world.COLOURS)  # red<->blue, green<->yellow.
  target = jnp.asarray(world.PALETTE, jnp.float32)[other]
  return {**params, "colour": (1.0 - strength) * params["colour"] + strength * target}


def melt(params: dict, strength: float) -> dict:
  """The object sags over the clip: wider, flatter, blurrier; its bottom edge stays put.

  At frame t the progress is `p = strength * t / (T - 1)`: half-width x (1 + 0.8 p),
  half-height x (1 - 0.5 p), edge width 1 + 3 p px.
  """
  frames = params["centre"].shape[1]
  p = strength * jnp.arange(frames, dtype=jnp.float32) / (frames - 1)  # [T]
  hx, hy = params["half"][..., 0], params["half"][..., 1]
  new_hy = hy * (1.0 - 0.5 * p)
  centre = params["centre"].at[..., 1].add(hy - new_hy)  # Keep the bottom edge fixed.
  half = jnp.stack([hx * (1.0 + 0.8 * p), new_hy], -1)
  return {**params, "centre": centre, "half": half, "soft": params["soft"] * (1.0 + 3.0 * p)}


def jitter(key: jax.Array, params: dict, pixels: float) -> dict:
  """Random per-frame offsets of the object, uniform in [-pixels, pixels] on each axis."""
  offsets = jax.random.uniform(key, params["centre"].shape, minval=-pixels, maxval=pixels)
  return {**params, "centre": params["centre"] + offsets}


def turn(params: dict, degrees: float) -> dict:
  """Rotate the object's path about its midpoint (180: the opposite direction), kept in frame."""
  size = params["background"].shape[1]
  centre = params["centre"]
  mid = 0.5 * (centre[:, :1] + centre[:, -1:])
  a = np.deg2rad(degrees)
  rotation = jnp.asarray([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], jnp.float32)
  rotated = mid + jnp.einsum("ij,ntj->nti", rotation, centre - mid)
  lo = params["half"] + world.MARGIN
  return {**params, "centre": jnp.clip(rotated, lo, size - lo)}


def flip_direction(attrs) -> jax.Array:
  """Attributes with the opposite direction (left<->right, up<->down)."""
  attrs = jnp.asarray(attrs, jnp.int32)
  return attrs.at[:, 2].set(attrs[:, 2] ^ 1)


def other_shape(attrs, step: int = 1) -> jax.Array:
  """Attributes with another shape (circle -> square -> triangle -> circle for step 1)."""
  attrs = jnp.asarray(attrs, jnp.int32)
  return attrs.at[:, 1].set((attrs[:, 1] + step) % len(world.SHAPES))


def freeze(frames: jax.Array, fraction: float) -> jax.Array:
  """The object stops early: the last `fraction` of the steps repeat a frame (1: all frame 0)."""
  t = frames.shape[1]
  last = int(round((1.0 - fraction) * (t - 1)))
  index = np.minimum(np.arange(t), last)
  return frames[:, index]


def add_noise(key: jax.Array, frames: jax.Array, amplitude: float) -> jax.Array:
  """Gaussian pixel noise of std `amplitude`, clipped to [0, 1]."""
  return jnp.clip(frames + amplitude * jax.random.normal(key, frames.shape), 0.0, 1.0)


def add_blob(key: jax.Array, frames: jax.Array, half: float) -> jax.Array:
  """A second, static grey square of half-side `half` px at a random place in every frame."""
  n, _, size = frames.shape[:3]
  centre = jax.random.uniform(key, (n, 1, 1, 1, 2), minval=half, maxval=size - half)
  coords = jnp.arange(size, dtype=jnp.float32) + 0.5
  inside_x = jnp.abs(coords[None, None, None, :] - centre[..., 0]) < half
  inside_y = jnp.abs(coords[None, None, :, None] - centre[..., 1]) < half
  mask = (inside_x & inside_y)[..., None]
  return jnp.where(mask, 0.6, frames)
