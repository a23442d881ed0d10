r"""Convergence study: Euphonium against DanceGRPO and Flow-GRPO, with ablations.

  python experiments/convergence.py                  # the full study (see --help for sizes)
  python experiments/convergence.py --quick          # a 15-minute version

Every run is `python -m euphonium_jax.main` on one of the method configs
(configs/euphonium.py, dance_grpo.py, flow_grpo.py) with overrides, in its own workdir under
`--workdir`; a finished run is skipped and an interrupted one resumes (the grpo stage's own
checkpoints), so the study is resumable run by run. All runs share the base model, the
prompts of iteration i (a function of (seed, i)) and the budget; evaluation is the stage's:
Euler ODE on held-out prompts, no reward model, the same prompts and noise at every
evaluation.

Analysis: the threshold is the DanceGRPO runs' mean final evaluation reward; each run's steps
to reach it (linear interpolation between evaluations; never = not reached); the speed-up
steps(DanceGRPO) / steps(Euphonium) with a bootstrap confidence interval over seeds; final
rewards with standard errors over seeds; wall time per iteration (guidance costs time), so
the speed-up in wall time too. Writes `--out`.md (table, command, machine) and `--out`.png
(mean curves with bands of one standard error over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = {
    "euphonium": ("configs/euphonium.py", {}),
    "dance_grpo": ("configs/dance_grpo.py", {}),
    "flow_grpo": ("configs/flow_grpo.py", {}),
}
# Ablations of Euphonium (configs/euphonium.py: guided, outcome + post-step process advantage).
ABLATIONS = {
    "guidance_off_dual": ("configs/euphonium.py", {"sampling.guidance.mode": "off",
                                                   "sampling.score_unguided_steps": True}),
    "guided_outcome_only": ("configs/euphonium.py", {"grpo.advantage_mode": "none"}),
    "memoryless": ("configs/euphonium.py", {"sampling.schedule": "memoryless"}),
    "distill_on": ("configs/euphonium.py", {"grpo.distill_coef": 1.0, "grpo.kl_coef": 1.0}),
    "process_pre": ("configs/euphonium.py", {"grpo.process_source": "pre"}),
    "process_delta": ("configs/euphonium.py", {"grpo.process_source": "delta"}),
}


def _flag(key, value) -> str:
  # ml_collections parses a string override raw (no quotes) and other types as literals.
  return f"--config.{key}={value}" if isinstance(value, str) else f"--config.{key}={value!r}"


def run_one(name: str, config: str, overrides: dict, seed: int, args) -> str:
  workdir = os.path.join(args.workdir, f"{name}_seed{seed}")
  if os.path.exists(os.path.join(workdir, "grpo", "final", "DONE")):
    print(f"[study] {name} seed {seed}: done, skipping", flush=True)
    return workdir
  over = dict(overrides)
  over.update({"seed": seed, "grpo.iterations": args.iterations,
               "grpo.eval_every": args.eval_every, "eval.num_prompts": args.eval_prompts,
               "stages": ("grpo",)})
  if args.prompts:
    over.update({"grpo.prompts_per_iteration": args.prompts,
                 "grpo.samples_per_update": args.prompts * 8})
  cmd = [sys.executable, "-m", "euphonium_jax.main", "--config",
         os.path.join(REPO, config), "--workdir", workdir] + [_flag(k, v) for k, v in over.items()]
  print(f"[study] {name} seed {seed}: {' '.join(cmd[3:])}", flush=True)
  t0 = time.time()
  with open(os.path.join(args.workdir, f"{name}_seed{seed}.log"), "w") as log:
    rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  if rc != 0:
    raise RuntimeError(f"[study] run {name} seed {seed} failed (exit {rc}); see its log in "
                       f"{args.workdir}")
  print(f"[study] {name} seed {seed}: finished in {time.time() - t0:.0f} s", flush=True)
  return workdir


def read_run(workdir: str) -> dict:
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  rows = [r for r in rows if r.get("stage") == "grpo"]
  evals = [(r["step"], r["eval_reward"], r["eval_stderr"]) for r in rows if "eval_reward" in r]
  train = [r for r in rows if "update_seconds" in r]
  per_iter = float(np.median([r["rollout_seconds"] + r["update_seconds"] for r in train]))
  return {"steps": np.array([e[0] for e in evals], float),
          "reward": np.array([e[1] for e in evals], float),
          "stderr": np.array([e[2] for e in evals], float), "seconds_per_iteration": per_iter}


def steps_to(run: dict, threshold: float) -> float:
  """First (interpolated) step at which the evaluation reward reaches `threshold`; inf if never."""
  s, r = run["steps"], run["reward"]
  for i in range(len(r)):
    if r[i] >= threshold:
      if i == 0:
        return float(s[0])
      frac = (threshold - r[i - 1]) / (r[i] - r[i - 1])
      return float(s[i - 1] + frac * (s[i] - s[i - 1]))
  return float("inf")


def bootstrap_ratio(a: np.ndarray, b: np.ndarray, n: int = 5000, seed: int = 0):
  """Percentile 95% interval of mean(a) / mean(b), resampling each over its seeds."""
  rng = np.random.default_rng(seed)
  ra = rng.choice(a, (n, len(a))).mean(1)
  rb = rng.choice(b, (n, len(b))).mean(1)
  ratio = ra / rb
  return float(np.percentile(ratio, 2.5)), float(np.percentile(ratio, 97.5))


def _cpu_model() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def analyse(runs: dict[str, list[dict]], args, command: str) -> str:
  dance_final = [r["reward"][-1] for r in runs["dance_grpo"]]
  threshold = float(np.mean(dance_final))
  lines = [f"# Convergence study on the embedded world\n",
           f"Command: `{command}`  ",
           f"Machine: {_cpu_model()}, {os.cpu_count()} cores, "
           f"{time.strftime('%Y-%m-%d')}; "
           f"{args.iterations} iterations per run, evaluation every {args.eval_every} on "
           f"{args.eval_prompts} held-out prompts (Euler ODE, 30 steps, no reward model).\n",
           f"Threshold = DanceGRPO's mean final evaluation reward = {threshold:.4f}.\n",
           "| run | seeds | eval reward at 0 | final eval reward (+- SE over seeds) | steps to "
           "threshold (per seed) | s / iteration |",
           "|---|---|---|---|---|---|"]
  steps = {}
  for name, rs in runs.items():
    final = np.array([r["reward"][-1] for r in rs])
    se = final.std(ddof=1) / np.sqrt(len(final)) if len(final) > 1 else rs[0]["stderr"][-1]
    st = [steps_to(r, threshold) for r in rs]
    steps[name] = np.array(st)
    lines.append(f"| {name} | {len(rs)} | {np.mean([r['reward'][0] for r in rs]):.4f} | "
                 f"{final.mean():.4f} +- {se:.4f} | "
                 f"{', '.join('never' if np.isinf(x) else f'{x:.1f}' for x in st)} | "
                 f"{np.mean([r['seconds_per_iteration'] for r in rs]):.2f} |")
  e, d = steps["euphonium"], steps["dance_grpo"]
  spi = {k: np.mean([r["seconds_per_iteration"] for r in v]) for k, v in runs.items()}
  lines.append("")
  if len(e) < 2 or len(d) < 2:
    lines.append("One seed per method: no confidence interval, and differences smaller than about "
                 "two evaluation standard errors (the +- column) are noise.")
  if np.isfinite(e).all() and np.isfinite(d).all() and e.mean() > 0:
    lo, hi = bootstrap_ratio(d, e)
    ratio = d.mean() / e.mean()
    wall = ratio * spi["dance_grpo"] / spi["euphonium"]
    lines.append(f"Speed-up of Euphonium over DanceGRPO in steps: {ratio:.2f} (95% bootstrap "
                 f"interval over seeds {lo:.2f}-{hi:.2f}); in wall time: {wall:.2f} "
                 f"(Euphonium's iteration costs {spi['euphonium'] / spi['dance_grpo']:.2f}x "
                 "DanceGRPO's).")
  else:
    fmt = lambda xs: ", ".join("never" if np.isinf(x) else f"{x:.1f}" for x in xs)
    lines.append(f"Speed-up not defined: steps to threshold Euphonium [{fmt(e)}], DanceGRPO "
                 f"[{fmt(d)}] (a run that never reaches the threshold has no step count; a run "
                 "whose first evaluation is already above it counts 0).")
  return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict]], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, rs in runs.items():
    s = rs[0]["steps"]
    r = np.stack([x["reward"] for x in rs])
    m = r.mean(0)
    se = r.std(0, ddof=1) / np.sqrt(len(rs)) if len(rs) > 1 else rs[0]["stderr"]
    style = "-" if name in METHODS else "--"
    line, = ax.plot(s, m, style, marker="o", markersize=3, label=f"{name} (n={len(rs)})")
    ax.fill_between(s, m - se, m + se, color=line.get_color(), alpha=0.15)
  ax.set_xlabel("iteration")
  ax.set_ylabel("held-out reward (ODE, no reward model)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="/tmp/euph_convergence")
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "convergence"))
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--ablation_seeds", type=int, default=1)
  p.add_argument("--iterations", type=int, default=40)
  p.add_argument("--eval_every", type=int, default=10)
  p.add_argument("--eval_prompts", type=int, default=64)
  p.add_argument("--prompts", type=int, default=0,
                 help="grpo.prompts_per_iteration (and samples_per_update = prompts x 8) for "
                      "every run; 0 = the configs' own")
  p.add_argument("--quick", action="store_true",
                 help="1 seed, 8 iterations, evaluation every 4 on 32 prompts, 4 prompts per "
                      "iteration (~12 minutes)")
  p.add_argument("--no_ablations", action="store_true")
  args = p.parse_args()
  if args.quick:
    args.seeds, args.ablation_seeds, args.iterations, args.eval_every, args.eval_prompts = (
        1, 1, 8, 4, 32)
    args.prompts = args.prompts or 4
    if args.out.endswith("convergence"):
      args.out += "_quick"
  os.makedirs(args.workdir, exist_ok=True)
  command = "python experiments/convergence.py " + " ".join(sys.argv[1:])
  plan = [(n, c, o, s) for n, (c, o) in METHODS.items() for s in range(args.seeds)]
  if not args.no_ablations:
    plan += [(n, c, o, s) for n, (c, o) in ABLATIONS.items() for s in range(args.ablation_seeds)]
  runs: dict[str, list[dict]] = {}
  for name, config, over, seed in plan:
    runs.setdefault(name, []).append(read_run(run_one(name, config, over, seed, args)))
  text = analyse(runs, args, command)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".md", "w") as f:
    f.write(text + f"\n![curves]({os.path.basename(args.out)}.png)\n")
  plot(runs, args.out + ".png")
  print(text)


if __name__ == "__main__":
  main()
