"""The embedded video world: one coloured shape moving in a straight line, with its caption.

Clips are procedural and deterministic by key, rendered in jax.numpy (jit-able, batched,
antialiased edges): `float32 [n, T, H, W, 3]` in [0, 1]. A clip's caption is exactly
`"a {colour} {shape} moving {direction}"`; its attributes are int32 `(colour, shape,
direction)` indices into `COLOURS`, `SHAPES`, `DIRECTIONS`.

Each clip draws an object half-extent (4-7 px at 32 px), a steady speed (1-2.5 px/frame,
lowered when needed so the whole path fits), a start position that keeps the object inside
the frame for every frame, and a dark static background with a faint texture.

Rendering goes through explicit per-frame geometry (`clip_params` then `render`), so that
corruptions (`data/corrupt.py`) can edit the geometry and render again.
"""

from __future__ import annotations

import functools
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

COLOURS = ("red", "green", "blue", "yellow")
# RGB in [0, 1], one row per colour (tuples: module constants stay immutable).
PALETTE = ((0.90, 0.15, 0.15), (0.15, 0.80, 0.20), (0.20, 0.35, 0.95), (0.95, 0.85, 0.15))
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
# Unit velocity (dx, dy) in image coordinates: x grows to the right, y grows downwards.
DIRECTION_VECTORS = ((-1.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0))
SPLITS = ("train", "heldout", "all")

# (colour, shape, direction) triples never seen in pretraining. Each colour, shape and
# direction, and each (colour, shape) pair, still appears in the training split.
HELDOUT_COMBOS = (
    (0, 0, 0),  # red circle left
    (1, 1, 1),  # green square right
    (2, 2, 2),  # blue triangle up
    (3, 0, 3),  # yellow circle down
    (0, 1, 2),  # red square up
    (1, 2, 3),  # green triangle down
    (2, 0, 1),  # blue circle right
    (3, 2, 0),  # yellow triangle left
)

# Geometry at the reference size of 32 px; everything scales with size / 32.
HALF_RANGE = (4.0, 7.0)  # Object half-extent (radius / half-side), px.
SPEED_RANGE = (1.0, 2.5)  # px / frame.
MARGIN = 0.5  # px kept between the object's extent and the frame border.
BACKGROUND_RANGE = (0.04, 0.10)  # Grey level of the background.
TEXTURE_AMPLITUDE = 0.015  # Std of the static texture.


def palette() -> np.ndarray:
  """float32 [4, 3]: RGB of each colour of `COLOURS` (a fresh copy)."""
  return np.asarray(PALETTE, np.float32)


def vocabulary() -> list[str]:
  """Every word a caption can contain, in a fixed order."""
  return ["a", "moving", *COLOURS, *SHAPES, *DIRECTIONS]


def combos(split: str = "all") -> np.ndarray:
  """int32 [K, 3]: the (colour, shape, direction) triples of a split ("train", "heldout", "all")."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  every = list(itertools.product(range(len(COLOURS)), range(len(SHAPES)), range(len(DIRECTIONS))))
  if split == "all":
    keep = every
  elif split == "heldout":
    keep = list(HELDOUT_COMBOS)
  else:
    held = set(HELDOUT_COMBOS)
    keep = [c for c in every if c not in held]
  return np.asarray(keep, np.int32).reshape(-1, 3)


@functools.partial(jax.jit, static_argnames=("n", "split"))
def sample_attrs(key: jax.Array, n: int, split: str = "train") -> jax.Array:
  """int32 [n, 3]: attributes drawn uniformly from the combos of `split`."""
  table = jnp.asarray(combos(split))
  return table[jax.random.randint(key, (n,), 0, table.shape[0])]


def _check_geometry(frames: int, size: int) -> None:
  if not isinstance(frames, (int, np.integer)) or frames < 2:
    raise ValueError(f"frames must be an int >= 2, got {frames!r}")
  if not isinstance(size, (int, np.integer)) or size < 16:
    raise ValueError(f"size must be an int >= 16, got {size!r}")


def _background(key: jax.Array, n: int, size: int) -> jax.Array:
  """float32 [n, H, W, 3]: dark grey level plus a faint static texture (coarse + fine)."""
  k_level, k_tint, k_coarse, k_fine = jax.random.split(key, 4)
  level = jax.random.uniform(k_level, (n, 1, 1, 1), minval=BACKGROUND_RANGE[0],
                             maxval=BACKGROUND_RANGE[1])
  tint = jax.random.uniform(k_tint, (n, 1, 1, 3), minval=-0.01, maxval=0.01)
  coarse = jax.random.normal(k_coarse, (n, 8, 8, 1))
  coarse = jax.image.resize(coarse, (n, size, size, 1), "linear")
  fine = jax.random.normal(k_fine, (n, size, size, 1))
  texture = TEXTURE_AMPLITUDE * (0.8 * coarse + 0.6 * fine)
  return jnp.clip(level + tint + texture, 0.0, 1.0) * jnp.ones((1, 1, 1, 3))


@functools.partial(jax.jit, static_argnames=("frames", "size"))
def clip_params(key: jax.Array, attrs: jax.Array, frames: int = 8, size: int = 32) -> dict:
  """Per-frame geometry of the clips of `attrs` (int32 [n, 3]).

  Returns a dict of arrays: `shape` int32 [n], `colour` [n, 3], `centre` [n, T, 2] (x, y in
  px), `half` [n, T, 2] (half-width, half-height in px), `soft` [n, T] (edge width in px),
  `background` [n, H, W, 3].
  """
  _check_geometry(frames, size)
  attrs = jnp.asarray(attrs, jnp.int32)
  n = attrs.shape[0]
  scale = size / 32.0
  k_half, k_speed, k_along, k_perp, k_bg = jax.random.split(key, 5)
  half = jax.random.uniform(k_half, (n,), minval=HALF_RANGE[0] * scale,
                            maxval=HALF_RANGE[1] * scale)
  speed = jax.random.uniform(k_speed, (n,), minval=SPEED_RANGE[0] * scale,
                             maxval=SPEED_RANGE[1] * scale)
  lo = half + MARGIN  # Lowest centre coordinate that keeps the object inside.
  room = size - 2.0 * lo  # Span of centre positions inside the frame.
  speed = jnp.minimum(speed, room / (frames - 1))
  travel = speed * (frames - 1)
  u_along = jax.random.uniform(k_along, (n,))
  u_perp = jax.random.uniform(k_perp, (n,))
  velocity = jnp.asarray(DIRECTION_VECTORS, jnp.float32)[attrs[:, 2]]  # [n, 2]
  sign = velocity.sum(-1)
  free = room - travel
  along0 = jnp.where(sign > 0, lo + u_along * free, size - lo - u_along * free)
  t = jnp.arange(frames, dtype=jnp.float32)
  along = along0[:, None] + (sign * speed)[:, None] * t  # [n, T]
  perp = jnp.broadcast_to((lo + u_perp * room)[:, None], along.shape)
  horizontal = (velocity[:, 0] != 0)[:, None]
  centre = jnp.stack([jnp.where(horizontal, along, perp), jnp.where(horizontal, perp, along)], -1)
  return dict(
      shape=attrs[:, 1],
      colour=jnp.asarray(PALETTE, jnp.float32)[attrs[:, 0]],
      centre=centre,
      half=jnp.broadcast_to(half[:, None, None], (n, frames, 2)),
      soft=jnp.ones((n, frames), jnp.float32),
      background=_background(k_bg, n, size),
  )


@jax.jit
def render(params: dict) -> jax.Array:
  """float32 [n, T, H, W, 3] in [0, 1]: the clips described by `clip_params`-style geometry.

  Edges are antialiased with a linear ramp of width `soft` px over a signed distance.
  Unit shapes span [-1, 1]^2: circle, square, and a triangle with its apex up.
  """
  size = params["background"].shape[1]
  coords = jnp.arange(size, dtype=jnp.float32) + 0.5  # Pixel centres.
  cx, cy = params["centre"][..., 0], params["centre"][..., 1]  # [n, T]
  hx, hy = params["half"][..., 0], params["half"][..., 1]
  qx = (coords[None, None, None, :] - cx[..., None, None]) / hx[..., None, None]  # [n, T, 1, W]
  qy = (coords[None, None, :, None] - cy[..., None, None]) / hy[..., None, None]  # [n, T, H, 1]
  circle = jnp.sqrt(qx**2 + qy**2) - 1.0
  square = jnp.maximum(jnp.abs(qx), jnp.abs(qy)) - 1.0
  inv5 = 1.0 / np.sqrt(5.0)
  triangle = jnp.maximum(jnp.maximum(qy - 1.0, (-2.0 * qx - qy - 1.0) * inv5),
                         (2.0 * qx - qy - 1.0) * inv5)
  shape = params["shape"][:, None, None, None]
  sdf = jnp.where(shape == 0, circle, jnp.where(shape == 1, square, triangle))
  sdf = sdf * jnp.minimum(hx, hy)[..., None, None]  # Unit distances -> px.
  alpha = jnp.clip(0.5 - sdf / params["soft"][..., None, None], 0.0, 1.0)[..., None]
  colour = params["colour"][:, None, None, None, :]
  background = params["background"][:, None]
  return (background * (1.0 - alpha) + colour * alpha).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("frames", "size"))
def sample_clips(key: jax.Array, attrs: jax.Array, frames: int = 8, size: int = 32) -> jax.Array:
  """float32 [n, frames, size, size, 3] in [0, 1]: one random clip per row of `attrs`."""
  return render(clip_params(key, attrs, frames, size))


@functools.partial(jax.jit, static_argnames=("n", "split", "frames", "size"))
def sample_batch(key: jax.Array, n: int, split: str = "train", frames: int = 8,
                 size: int = 32) -> tuple[jax.Array, jax.Array]:
  """(frames float32 [n, T, H, W, 3], attrs int32 [n, 3]) from the combos of `split`."""
  k_attrs, k_clips = jax.random.split(key)
  attrs = sample_attrs(k_attrs, n, split)
  return sample_clips(k_clips, attrs, frames, size), attrs


def captions(attrs) -> list[str]:
  """Host: the caption of each row of `attrs` (int [n, 3])."""
  return [f"a {COLOURS[c]} {SHAPES[s]} moving {DIRECTIONS[d]}"
          for c, s, d in np.asarray(attrs).reshape(-1, 3).tolist()]


def parse_captions(texts: Sequence[str]) -> np.ndarray:
  """Host: int32 [n, 3] attributes of captions "a {colour} {shape} moving {direction}"."""
  rows = []
  for text in texts:
    words = str(text).split()
    if (len(words) != 5 or words[0] != "a" or words[3] != "moving" or words[1] not in COLOURS
        or words[2] not in SHAPES or words[4] not in DIRECTIONS):
      raise ValueError(
          f"cannot parse caption {text!r}: expected 'a <colour> <shape> moving <direction>' "
          f"with colour in {COLOURS}, shape in {SHAPES}, direction in {DIRECTIONS}")
    rows.append((COLOURS.index(words[1]), SHAPES.index(words[2]), DIRECTIONS.index(words[4])))
  return np.asarray(rows, np.int32).reshape(-1, 3)
