"""JPEG compressibility (DDPO's `jpeg_compressibility`): minus the JPEG size of each frame in kB,
averaged over frames. A verifiable pixel reward that needs no model and no prompt; it rewards
flat, simple images. Host computation with Pillow (quality 95, as DDPO).
"""

from __future__ import annotations

import io
from typing import Sequence

import jax
import numpy as np
from PIL import Image

from euphonium_jax.rewards.registry import register


def jpeg_kb(frame: np.ndarray, quality: int = 95) -> float:
  """Size in kB of one [H, W, 3] uint8 frame saved as JPEG."""
  buf = io.BytesIO()
  Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
  return buf.tell() / 1000.0


@register("jpeg_compressibility")
def jpeg_compressibility(frames: jax.Array, prompts: Sequence[str]) -> np.ndarray:
  """frames [B, T, H, W, 3] in [0, 1] -> float32 [B]: -mean over frames of the JPEG kB."""
  del prompts
  x = np.asarray(jax.device_get(frames), np.float32)
  x = (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
  return np.asarray([-np.mean([jpeg_kb(f) for f in video]) for video in x], np.float32)
