"""Metrics (TensorBoard event files + `metrics.jsonl`), videos (GIF, MP4) and contact sheets.

Only process 0 writes. `metrics.jsonl` holds one JSON object per logged step with `stage` and
`step` keys, so any tool (or `json.loads` per line) can read a run. A non-finite value is
written as `null` and named, with its kind, in the row's `nonfinite_values` (e.g.
`{"loss": "nan"}`); `read_metrics` turns it back into a float. The file holds each logged
row once however often the stage was interrupted and resumed: a `MetricWriter` replaces the
rows an interrupted run wrote at the steps it writes again (see `MetricWriter.write`), and a
torn last line (a kill during a write) is dropped with a warning.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Any, Mapping, Sequence

import jax
import numpy as np

METRICS = "metrics.jsonl"
NONFINITE = "nonfinite_values"
_META = ("stage", "step", "time", NONFINITE)


def _parse_lines(path: str) -> tuple[list[tuple[str, dict]], int]:
  """[(line, row)] of the file's valid rows, and the byte length of its complete lines.

  A torn or unparseable line is dropped with a warning naming the file and the line.
  """
  with open(path, "rb") as f:
    data = f.read()
  complete = data.rfind(b"\n") + 1
  if complete < len(data):
    warnings.warn(f"{path}: dropping a torn last line ({len(data) - complete} bytes without "
                  "a newline: a run was killed while writing it)")
  rows = []
  for i, line in enumerate(data[:complete].decode("utf-8", "replace").splitlines()):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      if not isinstance(row, dict):
        raise ValueError("not an object")
    except ValueError as e:
      warnings.warn(f"{path}: dropping unreadable line {i + 1} ({e})")
      continue
    rows.append((line, row))
  return rows, complete


def _keys(row: Mapping[str, Any]) -> frozenset:
  return frozenset(k for k in row if k not in _META)


class MetricWriter:
  """Writes scalars to TensorBoard (tensorboardX) and to WORKDIR/metrics.jsonl.

  `resume_step`: the step the stage resumed from (0 for a fresh start); the stage's rows past
  it, written by an interrupted run, are removed at once. Without it the same happens lazily,
  row by row, in `write`.
  """

  def __init__(self, workdir: str, stage: str, resume_step: int | None = None):
    self.stage = stage
    self.active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    self._old: list[tuple[int, frozenset]] = []  # this stage's rows from earlier runs
    self.path = os.path.join(workdir, METRICS)
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", stage))
      if os.path.exists(self.path):
        rows, complete = _parse_lines(self.path)
        if complete < os.path.getsize(self.path):
          with open(self.path, "r+b") as f:  # the next row must not join the torn one
            f.truncate(complete)
        self._old = [(int(r["step"]), _keys(r)) for _, r in rows
                     if r.get("stage") == stage and "step" in r]
      self._jsonl = open(self.path, "a")
      if resume_step is not None:
        self._drop(lambda step, keys: step > resume_step)

  def _drop(self, stale) -> None:
    """Rewrites metrics.jsonl (atomically) without this stage's earlier rows `stale(step,
    keys)` selects."""
    if not any(stale(s, k) for s, k in self._old):
      return
    self._jsonl.close()
    rows, _ = _parse_lines(self.path)
    keep = [line for line, r in rows if not (
        r.get("stage") == self.stage and "step" in r and stale(int(r["step"]), _keys(r)))]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.write("".join(line + "\n" for line in keep))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)
    self._old = [(s, k) for s, k in self._old if not stale(s, k)]
    self._jsonl = open(self.path, "a")

  @property
  def _last_old(self) -> int:
    return max((s for s, _ in self._old), default=-1)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends one row. Rows of this stage that an earlier, interrupted run wrote past
    `step`, or at `step` with the same metric names, are removed first: a resumed run
    rewrites them (exact resume), so the file holds each once."""
    if not self.active:
      return
    step = int(step)
    row, bad = {"stage": self.stage, "step": step, "time": time.time()}, {}
    for k, v in metrics.items():
      v = float(np.asarray(v))
      self._tb.add_scalar(f"{self.stage}/{k}", v, step)
      if math.isfinite(v):
        row[k] = v
      else:
        row[k], bad[k] = None, repr(v)  # 'nan', 'inf' or '-inf'
    if bad:
      row[NONFINITE] = bad
    if self._old and step > self._last_old:
      self._old = []  # steps only grow: no earlier row can be rewritten any more
    if self._old:
      keys = _keys(row)
      self._drop(lambda s, k: s > step or (s == step and k == keys))
    self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.active:
      self._tb.close()
      self._jsonl.close()


def read_metrics(workdir: str, stage: str | None = None) -> list[dict[str, Any]]:
  """The rows of WORKDIR/metrics.jsonl (of `stage` when given); null values named in
  `nonfinite_values` come back as NaN or inf."""
  path = os.path.join(workdir, METRICS)
  if not os.path.exists(path):
    return []
  rows = [r for _, r in _parse_lines(path)[0]]
  for r in rows:
    for k, v in (r.get(NONFINITE) or {}).items():
      r[k] = float(v)
  return [r for r in rows if stage is None or r.get("stage") == stage]


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
