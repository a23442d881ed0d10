r"""Time per grpo iteration: Flow-GRPO-Fast and MixGRPO (SDE windows) against DanceGRPO, and
the same stage at an earlier commit (before / after a change to the loop).

  python experiments/bench_sde_windows.py --prompts 4 --iterations 5 --rounds 1
  python experiments/bench_sde_windows.py --methods dance_grpo@0f288a6 dance_grpo \
      --out experiments/results/iteration_before_after_cpu.txt

Runs the grpo stage (`python -m euphonium_jax.main`, the shipped base model) of each method's
config (configs/<method>.py) in turn (`--rounds` times, methods interleaved), `--prompts` x 8
rollouts and one optimiser step per iteration, and reports medians over iterations 2.. (the
first compiles): the stage's own rollout_seconds and update_seconds, and the iteration's wall
time (between consecutive rows of metrics.jsonl: prompts, text encoding, rollout, rewards,
advantages, updates and logging). `method@REV` runs that config from a temporary git worktree
of commit REV (its own package, imported first as `python -m` puts the working directory on
sys.path). Writes `--out`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("dance_grpo", "flow_grpo_fast", "mix_grpo")


def run(name: str, args, workdir: str, repo: str = REPO) -> list[dict]:
  cmd = [sys.executable, "-m", "euphonium_jax.main", "--config",
         os.path.join(repo, "configs", f"{name}.py"), "--workdir", workdir,
         "--config.stages=('grpo',)", f"--config.grpo.iterations={args.iterations}",
         f"--config.grpo.prompts_per_iteration={args.prompts}",
         f"--config.grpo.samples_per_update={args.prompts * 8}", "--config.grpo.eval_every=0",
         f"--config.grpo.ckpt_every={args.iterations}", "--config.eval.num_prompts=8",
         "--config.eval.num_steps=4"]
  subprocess.run(cmd, cwd=repo, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in rows if r.get("stage") == "grpo" and "update_seconds" in r]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--methods", nargs="+", default=list(METHODS),
                 help="configs/<method>.py names; method@REV runs it at git commit REV")
  p.add_argument("--prompts", type=int, default=4)
  p.add_argument("--iterations", type=int, default=5)
  p.add_argument("--rounds", type=int, default=1)
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "results",
                                               "sde_windows_cpu.txt"))
  args = p.parse_args()
  times = {m: {"rollout": [], "update": [], "iteration": []} for m in args.methods}
  load = [os.getloadavg()]
  with contextlib.ExitStack() as stack:
    repos = {m: worktree(stack, m.partition("@")[2]) for m in args.methods}
    for _ in range(args.rounds):
      for m in args.methods:
        with tempfile.TemporaryDirectory() as d:
          rows = run(m.partition("@")[0], args, d, repos[m])
        for prev, r in zip(rows[1:], rows[2:]):
          times[m]["iteration"].append(r["time"] - prev["time"])
        for r in rows[1:]:
          times[m]["rollout"].append(r["rollout_seconds"])
          times[m]["update"].append(r["update_seconds"])
        load.append(os.getloadavg())
  med = {m: {k: float(np.median(v)) for k, v in t.items()} for m, t in times.items()}
  base = med[args.methods[0]]["iteration"]
  lines = [f"Command: python experiments/bench_sde_windows.py {' '.join(sys.argv[1:])}",
           f"{args.prompts} prompts x 8 rollouts, 16 steps, one optimiser step per iteration; "
           f"medians of iterations 2..{args.iterations} (wall time: 3..{args.iterations}, "
           f"between rows) over {args.rounds} round(s), methods interleaved by run; "
           f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}); 1-min load "
           f"average during the runs {min(l[0] for l in load):.1f}-"
           f"{max(l[0] for l in load):.1f}.", "",
           "| method | trained transitions / sample | rollout s | update s | iteration s "
           f"(wall) | vs {args.methods[0]} |", "|---|---|---|---|---|---|"]
  trained = {"dance_grpo": "9 of 15 (fraction 0.6)", "flow_grpo_fast": "2 (window)",
             "mix_grpo": "4 (window)"}
  for m in args.methods:
    t = med[m]
    lines.append(f"| {m} | {trained.get(m.partition('@')[0], '')} | {t['rollout']:.2f} | "
                 f"{t['update']:.2f} | {t['iteration']:.2f} | {t['iteration'] / base:.2f}x |")
  text = "\n".join(lines) + "\n"
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  print(text)


def worktree(stack: contextlib.ExitStack, rev: str) -> str:
  """The repository itself (no `rev`), or a temporary worktree of commit `rev`, removed on exit."""
  if not rev:
    return REPO
  path = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_rev_",
                                                     ignore_cleanup_errors=True))
  subprocess.run(["git", "worktree", "add", "--detach", path, rev], cwd=REPO, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  stack.callback(subprocess.run, ["git", "worktree", "remove", "--force", path], cwd=REPO,
                 check=False)
  return path


if __name__ == "__main__":
  main()
