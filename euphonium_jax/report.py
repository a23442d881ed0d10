"""Metrics (TensorBoard event files + `metrics.jsonl`), videos (GIF, MP4) and contact sheets.

Only process 0 writes. `metrics.jsonl` holds one JSON object per logged step with `stage` and
`step` keys, so any tool (or `json.loads` per line) can read a run.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np


class MetricWriter:
  """Writes scalars to TensorBoard (tensorboardX) and to WORKDIR/metrics.jsonl."""

  def __init__(self, workdir: str, stage: str):
    self.stage = stage
    self.active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", stage))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.active:
      return
    row = {"stage": self.stage, "step": int(step), "time": time.time()}
    for k, v in metrics.items():
      v = float(np.asarray(v))
      row[k] = v
      self._tb.add_scalar(f"{self.stage}/{k}", v, int(step))
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.active:
      self._tb.close()
      self._jsonl.close()


def read_metrics(workdir: str, stage: str | None = None) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if stage is None or r["stage"] == stage]


def _to_uint8(videos: np.ndarray) -> np.ndarray:
  return (np.clip(np.asarray(videos, np.float32), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def video_grid(videos: np.ndarray, cols: int | None = None, pad: int = 2,
               upscale: int = 4) -> np.ndarray:
  """[B, T, H, W, 3] in [0, 1] -> one uint8 video [T, rows*(H+pad), cols*(W+pad), 3]."""
  videos = _to_uint8(videos)
  b, t, h, w, _ = videos.shape
  cols = cols or int(np.ceil(np.sqrt(b)))
  rows = int(np.ceil(b / cols))
  hh, ww = h * upscale + pad, w * upscale + pad
  grid = np.full((t, rows * hh + pad, cols * ww + pad, 3), 255, np.uint8)
  big = videos.repeat(upscale, axis=2).repeat(upscale, axis=3)
  for i in range(b):
    r, c = divmod(i, cols)
    grid[:, pad + r * hh:pad + r * hh + h * upscale,
         pad + c * ww:pad + c * ww + w * upscale] = big[i]
  return grid


def write_videos(path_stem: str, videos: np.ndarray, fps: int = 4) -> list[str]:
  """Writes a grid of videos as `<stem>.gif` and `<stem>.mp4`; returns the paths."""
  import imageio.v2 as imageio

  if jax.process_index() != 0:
    return []
  os.makedirs(os.path.dirname(os.path.abspath(path_stem)), exist_ok=True)
  grid = video_grid(videos)
  gif = path_stem + ".gif"
  imageio.mimsave(gif, list(grid), duration=1000.0 / fps, loop=0)
  mp4 = path_stem + ".mp4"
  # Even sizes for yuv420p; libx264 through imageio-ffmpeg's bundled ffmpeg binary.
  h, w = grid.shape[1] // 2 * 2, grid.shape[2] // 2 * 2
  with imageio.get_writer(mp4, fps=fps, codec="libx264", quality=8,
                          macro_block_size=1, ffmpeg_log_level="error") as writer:
    for frame in grid[:, :h, :w]:
      writer.append_data(frame)
  return [gif, mp4]


def contact_sheet(path: str, videos: np.ndarray, captions: Sequence[str] | None = None,
                  scores: Sequence[float] | None = None, upscale: int = 3) -> str:
  """A PNG with one row per video and one column per frame, captions (and scores) beside."""
  from PIL import Image, ImageDraw

  if jax.process_index() != 0:
    return path
  videos = _to_uint8(videos)
  b, t, h, w, _ = videos.shape
  hh, ww, pad, text_w = h * upscale, w * upscale, 2, 230
  sheet = Image.new("RGB", (text_w + t * (ww + pad) + pad, b * (hh + pad) + pad), "white")
  draw = ImageDraw.Draw(sheet)
  for i in range(b):
    y = pad + i * (hh + pad)
    label = captions[i] if captions is not None else f"#{i}"
    if scores is not None:
      label += f"  r={scores[i]:.2f}"
    draw.text((4, y + hh // 2 - 6), label, fill="black")
    for j in range(t):
      frame = Image.fromarray(videos[i, j]).resize((ww, hh), Image.NEAREST)
      sheet.paste(frame, (text_w + pad + j * (ww + pad), y))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  sheet.save(path)
  return path


def plot_curves(path: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                xlabel: str = "step", ylabel: str = "reward", title: str = "") -> str:
  """A PNG line plot of named (x, y) series."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for name, (x, y) in series.items():
    ax.plot(x, y, label=name, marker="o", markersize=3)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
