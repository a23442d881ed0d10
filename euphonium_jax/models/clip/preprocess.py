"""``CLIPImageProcessor`` on the device: frames [N, H, W, 3] in [0, 1] -> pixels [N, S, S, 3].

What the reference does to an RGB image (uint8) and what is done here, step by step:
  resize       shortest side to ``size['shortest_edge']``, the other ``int(short * long /
               short_side)`` (transformers' ``get_resize_output_image_size``), with PIL's
               resampling filter (``resample``: 3 bicubic, 2 bilinear). PIL resamples an
               8-bit image in two separable passes, horizontal then vertical, each a kernel
               widened by the scale when downsampling (antialias), weights normalised over the
               in-bounds taps, and each pass rounded to uint8. Here: ``jax.image.resize``
               (Keys cubic a = -0.5 as PIL, antialias, half-pixel centres), width then height,
               with the same rounding to 8 bits after each pass (``match_uint8=True``), so the
               only difference left is PIL's fixed-point weights (22 fractional bits): rare
               one-level rounding flips (on uniform-noise images, the worst case: at most 1
               level, on 0.01-0.13% of the values; tests/test_clip.py pins it).
               ``match_uint8=False`` skips the rounding but still clips each pass to [0, 255]
               as PIL does (at most 1.1 levels away, on about 20% of the values).
  centre crop  top = (h - crop_h) // 2, left = (w - crop_w) // 2 (transformers' integer rule)
  rescale      * rescale_factor (1/255 on uint8)
  normalise    (x - image_mean) / image_std per channel
Frames come in as float [0, 1]; with ``match_uint8`` they are first rounded to the uint8 a
user would hand the processor (round(255 x)).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

METHODS = {3: 'bicubic', 2: 'linear'}  # PIL resample codes this module reproduces


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
  """The fields of a ``preprocessor_config.json`` this module uses."""
  shortest_edge: int = 224
  crop: tuple[int, int] = (224, 224)  # (height, width)
  mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
  std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
  resample: int = 3
  rescale_factor: float = 1 / 255
  do_resize: bool = True
  do_center_crop: bool = True
  do_rescale: bool = True
  do_normalize: bool = True

  def __post_init__(self):
    if self.resample not in METHODS:
      raise ValueError(f'preprocessor resample={self.resample} is not supported; allowed: '
                       f'{sorted(METHODS)} (PIL bicubic, bilinear)')

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> 'ImageProcessing':
    size = config.get('size', 224)
    if isinstance(size, Mapping):
      if 'shortest_edge' not in size:
        raise ValueError(f'preprocessor size={size}: only {{"shortest_edge": n}} is supported')
      size = size['shortest_edge']
    crop = config.get('crop_size', size)
    crop = (crop['height'], crop['width']) if isinstance(crop, Mapping) else (crop, crop)
    return cls(shortest_edge=int(size), crop=tuple(int(c) for c in crop),
               mean=tuple(config.get('image_mean', cls.mean)),
               std=tuple(config.get('image_std', cls.std)),
               resample=int(config.get('resample', 3)),
               rescale_factor=float(config.get('rescale_factor', 1 / 255)),
               do_resize=bool(config.get('do_resize', True)),
               do_center_crop=bool(config.get('do_center_crop', True)),
               do_rescale=bool(config.get('do_rescale', True)),
               do_normalize=bool(config.get('do_normalize', True)))


def resized_size(h: int, w: int, shortest_edge: int) -> tuple[int, int]:
  """transformers' ``get_resize_output_image_size(default_to_square=False)``."""
  short, long = (h, w) if h <= w else (w, h)
  new_short, new_long = shortest_edge, int(shortest_edge * long / short)
  return (new_short, new_long) if h <= w else (new_long, new_short)


def _resize_axis(x: jax.Array, axis: int, size: int, method: str, quantize: bool) -> jax.Array:
  if x.shape[axis] == size:
    return x  # PIL skips a pass that keeps the size
  shape = list(x.shape)
  shape[axis] = size
  y = jax.image.resize(x, tuple(shape), method=method, antialias=True)
  return jnp.clip(jnp.round(y) if quantize else y, 0, 255)  # PIL clips each pass to 8 bits


def center_crop(x: jax.Array, crop: tuple[int, int]) -> jax.Array:
  """[N, H, W, C] -> [N, ch, cw, C]; H >= ch and W >= cw (transformers pads smaller images;
  that case is refused here)."""
  h, w = x.shape[1:3]
  ch, cw = crop
  if h < ch or w < cw:
    raise ValueError(f'{h}x{w} is smaller than the crop {ch}x{cw}')
  top, left = (h - ch) // 2, (w - cw) // 2
  return x[:, top:top + ch, left:left + cw]


def preprocess(frames: jax.Array, proc: ImageProcessing, match_uint8: bool = True
               ) -> jax.Array:
  """frames [N, H, W, 3] float in [0, 1] -> normalised pixels [N, crop_h, crop_w, 3] float32."""
  x = jnp.clip(frames.astype(jnp.float32), 0.0, 1.0) * 255.0
  if match_uint8:
    x = jnp.round(x)
  if proc.do_resize:
    h, w = resized_size(x.shape[1], x.shape[2], proc.shortest_edge)
    method = METHODS[proc.resample]
    x = _resize_axis(x, 2, w, method, match_uint8)  # PIL: horizontal pass first
    x = _resize_axis(x, 1, h, method, match_uint8)
  if proc.do_center_crop:
    x = center_crop(x, proc.crop)
  if proc.do_rescale:
    x = x * proc.rescale_factor
  if proc.do_normalize:
    x = (x - jnp.asarray(proc.mean, jnp.float32)) / jnp.asarray(proc.std, jnp.float32)
  return x
