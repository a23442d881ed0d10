r"""Iteration time of a small grpo run with slow remote rewards, before and after the overlap.

  python experiments/bench_remote_reward.py --sleep 0.5 --iterations 6 \
      > experiments/results/bench_remote_reward_cpu.txt

Two reward servers (`python -m euphonium_jax.rewards.serve --sleep S`: each scored request
waits S seconds, a slow judge) serve jpeg_compressibility as `remote_a` and `remote_b`; the
grpo stage trains on both, a batch of 8 videos per iteration sent in requests of
`batch_size` 4. The networks are assets/embedded's (configs/tiny.py's sizes need their own
pretraining), with configs/tiny.py's grpo sizes: 2 prompts x group 4, 4 sampler steps.

Variants:
- local: jpeg_compressibility in the process (no server), the floor;
- before: the requests of a batch one after another (`max_in_flight = 1`), the two rewards
  one after another (`score_rewards(..., concurrent=False)`): 2 rewards x 2 chunks x S;
- after, 1 worker: both rewards at once (threads), 2 chunks of each in flight; each server
  scores one request at a time (`--workers 1`), so its chunks queue: 2 x S;
- after, 2 workers: the servers score two requests at once: S.

Iteration time is the wall time between consecutive metric rows (the first iteration, which
compiles, and the last, which evaluates, are left out); `reward_seconds` is the stage's own
timing of `score_rewards`. A persistent compilation cache keeps later variants from
recompiling the same programs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from euphonium_jax import config as config_lib  # noqa: E402
from euphonium_jax import main, report  # noqa: E402
from euphonium_jax.rewards import registry  # noqa: E402
from euphonium_jax.stages import grpo as grpo_stage  # noqa: E402


@contextlib.contextmanager
def servers(n: int, sleep: float, workers: int):
  procs = [subprocess.Popen(
      [sys.executable, "-m", "euphonium_jax.rewards.serve", "--reward", "jpeg_compressibility",
       "--port", "0", "--sleep", str(sleep), "--workers", str(workers)],
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu")) for _ in range(n)]
  try:
    yield [re.search(r"http://\S+", p.stdout.readline()).group(0) for p in procs]
  finally:
    for p in procs:
      p.kill()
      p.wait()


def config(iterations: int):
  c = config_lib.get_default_config()
  c.stages = ("grpo",)
  c.init.pretrain = os.path.join(REPO, "assets", "embedded")
  c = config_lib.as_baseline(c, "dance_grpo")
  c.eval.update(num_prompts=8, num_steps=4, num_videos=4)
  c.sampling.update(num_steps=4, group_size=4)
  c.grpo.update(iterations=iterations, prompts_per_iteration=2, samples_per_update=8,
                lr=1e-4, eval_every=0, ckpt_every=1000)
  return c


def run(c, concurrent: bool) -> dict:
  workdir = tempfile.mkdtemp(prefix="bench_remote_")
  original = grpo_stage.score_rewards
  grpo_stage.score_rewards = functools.partial(original, concurrent=concurrent)
  try:
    with contextlib.redirect_stdout(sys.stderr):  # the stage's prints: stdout keeps the table
      main.run(c, workdir)
  finally:
    grpo_stage.score_rewards = original
  rows = [r for r in report.read_metrics(workdir, "grpo") if r["step"] > 0]
  # Row i is written when iteration i ends: the differences are iterations 2 .. N (the
  # first, which compiles, has no row before it); the last one also evaluates: left out.
  wall = np.diff([r["time"] for r in rows])[:-1]
  keep = rows[1:-1]
  return {"iteration_s": float(np.median(wall)),
          "reward_s": float(np.median([r["reward_seconds"] for r in keep])),
          "rollout_s": float(np.median([r["rollout_seconds"] for r in keep])),
          "update_s": float(np.median([r["update_seconds"] for r in keep]))}


def main_(argv=None) -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--sleep", type=float, default=0.5)
  p.add_argument("--iterations", type=int, default=5)
  p.add_argument("--batch_size", type=int, default=4)
  args = p.parse_args(argv)
  if args.iterations < 3:
    p.error("--iterations must be >= 3 (the first compiles, the last evaluates)")
  cache = os.path.join(tempfile.gettempdir(), "euphonium_bench_jax_cache")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

  results = []
  c = config(args.iterations)
  c.grpo.rewards = (("jpeg_compressibility", 1.0),)
  results.append(("local jpeg_compressibility (no server)", run(c, True)))
  for label, in_flight, concurrent, workers in (
      ("before: sequential requests, rewards one by one", 1, False, 1),
      ("after: rewards concurrent, 2 in flight, server 1 worker", 2, True, 1),
      ("after: rewards concurrent, 2 in flight, server 2 workers", 2, True, 2)):
    with servers(2, args.sleep, workers) as urls:
      c = config(args.iterations)
      c.grpo.rewards = (("remote_a", 1.0), ("remote_b", 1.0))
      for name, url in zip(("remote_a", "remote_b"), urls):
        c.rewards[name] = registry.settings("remote", url=url, batch_size=args.batch_size,
                                            max_in_flight=in_flight)
      results.append((label, run(c, concurrent)))

  print(f"# grpo iteration time with 2 remote rewards, server sleep {args.sleep} s per request, "
        f"8 videos per iteration in requests of {args.batch_size} "
        f"({jax.devices()[0].platform}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')})")
  print(f"# medians over iterations 2 .. {args.iterations - 1} of {args.iterations}")
  print(f"{'variant':60s} {'iteration s':>12s} {'reward s':>9s} {'rollout s':>10s} "
        f"{'update s':>9s}")
  for label, r in results:
    print(f"{label:60s} {r['iteration_s']:12.3f} {r['reward_s']:9.3f} {r['rollout_s']:10.3f} "
          f"{r['update_s']:9.3f}")


if __name__ == "__main__":
  main_()
