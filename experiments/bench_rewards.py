r"""Throughput of the on-device CLIP rewards in frames per second (the program the grpo stage
runs: frame selection, preprocessing, both towers, the score, one jitted call).

  python experiments/bench_rewards.py [--out experiments/results/bench_rewards_cpu.txt]

Models: the tiny random CLIP of `models/clip/tiny.py` (32 px, written by transformers into a
temporary folder) and a random-initialised ViT-L/14 at 224 px (openai/clip-vit-large-patch14's
sizes, built in JAX: nothing downloaded). Frames are already at the model's size (the resize
is then skipped as CLIPImageProcessor skips it) and every frame is scored (`frames='all'`).
Each row: compile time of the first call, then the median of `--repeats` timed calls.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from euphonium_jax.models.clip import loading, model as clip_model, preprocess, tiny  # noqa: E402
from euphonium_jax.rewards import clip as clip_rewards  # noqa: E402

VIT_L14 = clip_model.CLIPConfig(
    vision=clip_model.TowerConfig(hidden=1024, layers=24, heads=16, mlp=4096, image_size=224,
                                  patch_size=14),
    text=clip_model.TowerConfig(hidden=768, layers=12, heads=12, mlp=3072, vocab_size=49408,
                                max_positions=77),
    projection_dim=768)


def bench(reward, frames: np.ndarray, prompts, repeats: int) -> tuple[float, float]:
  x = jnp.asarray(frames)
  t0 = time.perf_counter()
  jax.block_until_ready(reward(x, prompts))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(reward(x, prompts))
    times.append(time.perf_counter() - t0)
  return compile_s, float(np.median(times))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default='')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args(argv)
  folder = tiny.write_tiny_clip(tempfile.mkdtemp(prefix='clip_tiny_'))
  tok = loading.load_tokenizer(folder)
  cases = [
      ('tiny CLIP (32 px)', loading.load_clip(folder),
       preprocess.ImageProcessing.from_hf(loading.preprocessor_config(folder)), (8, 8, 32)),
      ('ViT-L/14 random (224 px)', clip_model.random_clip(VIT_L14),
       preprocess.ImageProcessing(shortest_edge=224, crop=(224, 224)), (2, 4, 224)),
  ]
  lines = [f'# experiments/bench_rewards.py on {platform.processor() or platform.machine()}, '
           f'{os.cpu_count()} CPUs, jax {jax.__version__}, {jax.devices()[0].platform}; '
           f'frames=all, float32; median of {args.repeats}',
           f'{"model":<26} {"reward":<11} {"batch BxT":>9} {"compile s":>10} {"call s":>8} '
           f'{"frames/s":>9}']
  for name, model, proc, (b, t, size) in cases:
    frames = np.random.default_rng(0).uniform(size=(b, t, size, size, 3)).astype(np.float32)
    prompts = ['a red circle moving left'] * b
    for kind in ('clip_score', 'pickscore'):
      reward = clip_rewards.ClipReward(kind, model, proc, tok, frames='all')
      compile_s, call_s = bench(reward, frames, prompts, args.repeats)
      lines.append(f'{name:<26} {kind:<11} {f"{b}x{t}":>9} {compile_s:10.2f} {call_s:8.3f} '
                   f'{b * t / call_s:9.3g}')
      print(lines[-1], flush=True)
  text = '\n'.join(lines) + '\n'
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
