r"""Time per grpo iteration: Flow-GRPO-Fast and MixGRPO (SDE windows) against DanceGRPO.

  python experiments/bench_sde_windows.py --prompts 4 --iterations 5 --rounds 1

Runs the grpo stage (`python -m euphonium_jax.main`, the shipped base model) of
configs/dance_grpo.py, flow_grpo_fast.py and mix_grpo.py in turn (`--rounds` times, methods
interleaved), `--prompts` x 8 rollouts and one optimiser step per iteration, and reports the
median over iterations 2.. (the first compiles) of the stage's own rollout_seconds and
update_seconds. Writes `--out`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("dance_grpo", "flow_grpo_fast", "mix_grpo")


def run(name: str, args, workdir: str) -> list[dict]:
  cmd = [sys.executable, "-m", "euphonium_jax.main", "--config",
         os.path.join(REPO, "configs", f"{name}.py"), "--workdir", workdir,
         "--config.stages=('grpo',)", f"--config.grpo.iterations={args.iterations}",
         f"--config.grpo.prompts_per_iteration={args.prompts}",
         f"--config.grpo.samples_per_update={args.prompts * 8}", "--config.grpo.eval_every=0",
         f"--config.grpo.ckpt_every={args.iterations}", "--config.eval.num_prompts=8",
         "--config.eval.num_steps=4"]
  subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in rows if r.get("stage") == "grpo" and "update_seconds" in r]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--prompts", type=int, default=4)
  p.add_argument("--iterations", type=int, default=5)
  p.add_argument("--rounds", type=int, default=1)
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "results",
                                               "sde_windows_cpu.txt"))
  args = p.parse_args()
  times = {m: {"rollout": [], "update": []} for m in METHODS}
  load = [os.getloadavg()]
  for rnd in range(args.rounds):
    for m in METHODS:
      with tempfile.TemporaryDirectory() as d:
        for r in run(m, args, d)[1:]:
          times[m]["rollout"].append(r["rollout_seconds"])
          times[m]["update"].append(r["update_seconds"])
      load.append(os.getloadavg())
  base = np.median(times["dance_grpo"]["rollout"]) + np.median(times["dance_grpo"]["update"])
  lines = [f"Command: python experiments/bench_sde_windows.py {' '.join(sys.argv[1:])}",
           f"{args.prompts} prompts x 8 rollouts, 16 steps, one optimiser step per iteration; "
           f"medians of iterations 2..{args.iterations} over {args.rounds} round(s), methods "
           f"interleaved by run; {os.cpu_count()} cores; 1-min load average during the runs "
           f"{min(l[0] for l in load):.1f}-{max(l[0] for l in load):.1f}.", "",
           "| method | trained transitions / sample | rollout s | update s | iteration s | "
           "vs DanceGRPO |", "|---|---|---|---|---|---|"]
  trained = {"dance_grpo": "9 of 15 (fraction 0.6)", "flow_grpo_fast": "2 (window)",
             "mix_grpo": "4 (window)"}
  for m in METHODS:
    ro, up = np.median(times[m]["rollout"]), np.median(times[m]["update"])
    lines.append(f"| {m} | {trained[m]} | {ro:.2f} | {up:.2f} | {ro + up:.2f} | "
                 f"{(ro + up) / base:.2f}x |")
  text = "\n".join(lines) + "\n"
  with open(args.out, "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
