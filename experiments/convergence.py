r"""Convergence study: Euphonium against DanceGRPO, Flow-GRPO, Flow-GRPO-Fast and MixGRPO, with
ablations.

  python experiments/convergence.py                  # the full study (87 min on 2 CPU cores)
  python experiments/convergence.py --quick          # the five methods, 1 seed

Every run is `python -m euphonium_jax.main` on one of the method configs
(configs/euphonium.py, dance_grpo.py, flow_grpo.py, flow_grpo_fast.py, mix_grpo.py) with overrides, in its own workdir under
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
    "flow_grpo_fast": ("configs/flow_grpo_fast.py", {}),  # SDE on 2 random steps, ODE elsewhere
    "mix_grpo": ("configs/mix_grpo.py", {}),  # a sliding 4-step SDE window, ODE elsewhere
}
# Ablations of Euphonium (configs/euphonium.py: PRM-guided constant-noise SDE, outcome + process
# advantage with the process reward = change of the PRM score across the step, no distillation).
ABLATIONS = {
    "guidance_off_dual": ("configs/euphonium.py", {"sampling.guidance.mode": "off",
                                                   "sampling.score_unguided_steps": True}),
    "guided_outcome_only": ("configs/euphonium.py", {"grpo.advantage_mode": "none"}),
    "memoryless": ("configs/euphonium.py", {"sampling.schedule": "memoryless"}),
    "distill_on": ("configs/euphonium.py", {"grpo.distill_coef": 1.0, "grpo.kl_coef": 1.0}),
    "process_pre": ("configs/euphonium.py", {"grpo.process_source": "pre"}),
    "process_post": ("configs/euphonium.py", {"grpo.process_source": "post"}),
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


def steps_to(steps: np.ndarray, reward: np.ndarray, threshold: float) -> float:
  """First (interpolated) step at which a reward curve reaches `threshold`; inf if never."""
  for i in range(len(reward)):
    if reward[i] >= threshold:
      if i == 0:
        return float(steps[0])
      frac = (threshold - reward[i - 1]) / (reward[i] - reward[i - 1])
      return float(steps[i - 1] + frac * (steps[i] - steps[i - 1]))
  return float("inf")


def speedup(euph: np.ndarray, dance: np.ndarray, steps: np.ndarray) -> tuple[float, float, float]:
  """(steps of DanceGRPO, steps of Euphonium, ratio) on the seed-mean curves.

  `euph` and `dance` are [seeds, evaluations]. The threshold is DanceGRPO's mean final
  reward, so DanceGRPO's mean curve reaches it at the last evaluation at the latest. Euphonium
  never reaching it gives ratio 0; reaching it at the first evaluation gives inf.
  """
  threshold = dance[:, -1].mean()
  sd = steps_to(steps, dance.mean(0), threshold)
  se = steps_to(steps, euph.mean(0), threshold)
  ratio = 0.0 if np.isinf(se) else (np.inf if se == 0 else sd / se)
  return sd, se, ratio


def bootstrap_speedup(euph, dance, steps, n: int = 10000, seed: int = 0):
  """Percentile 95% interval of `speedup`, resampling each method's seeds with replacement."""
  rng = np.random.default_rng(seed)
  ratios = np.array([
      speedup(euph[rng.integers(0, len(euph), len(euph))],
              dance[rng.integers(0, len(dance), len(dance))], steps)[2] for _ in range(n)])
  return (float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5)),
          float(np.mean(ratios == 0)))


def _cpu_model() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _curves(rs: list[dict]) -> np.ndarray:
  return np.stack([r["reward"] for r in rs])


def _se(x: np.ndarray) -> float:
  return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def analyse(runs: dict[str, list[dict]], args, command: str) -> str:
  steps = runs["dance_grpo"][0]["steps"]
  for name, rs in runs.items():
    for r in rs:
      if not np.array_equal(r["steps"], steps):
        raise ValueError(f"{name}: evaluations at {r['steps']}, expected {steps}")
  dance = _curves(runs["dance_grpo"])
  threshold = float(dance[:, -1].mean())
  start = float(dance[0, 0])
  spi = {k: float(np.median([r["seconds_per_iteration"] for r in v])) for k, v in runs.items()}
  lines = [
      "# Convergence study on the embedded world\n",
      f"Command: `{command}`  ",
      f"Machine: {_cpu_model()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}.  ",
      f"Every run: {args.iterations} iterations of the grpo stage from the shipped base model "
      f"and PRM; evaluation at iteration 0 and every {args.eval_every} on {args.eval_prompts} "
      "held-out prompts (Euler ODE, 30 steps, no reward model; the same prompts and noise for "
      "every run, so every curve starts at the same value).\n",
      f"Threshold = DanceGRPO's mean final evaluation reward = {threshold:.4f} "
      f"(start {start:.4f}).\n",
      "| run | seeds | final eval reward (mean +- SE over seeds) | gain over start | "
      "steps to threshold, seed-mean curve (per seed) | s / iteration |",
      "|---|---|---|---|---|---|"]
  for name, rs in runs.items():
    c = _curves(rs)
    final = c[:, -1]
    per_seed = [steps_to(steps, x, threshold) for x in c]
    fmt = ", ".join("never" if np.isinf(x) else f"{x:.1f}" for x in per_seed)
    mean_steps = steps_to(steps, c.mean(0), threshold)
    ms = "never" if np.isinf(mean_steps) else f"{mean_steps:.1f}"
    se = _se(final)
    se_txt = f"{se:.4f}" if np.isfinite(se) else f"{rs[0]['stderr'][-1]:.4f} (prompts)"
    lines.append(f"| {name} | {len(rs)} | {final.mean():.4f} +- {se_txt} | "
                 f"{final.mean() - start:+.4f} | {ms} ({fmt}) | {spi[name]:.2f} |")
  lines.append("")
  lines.append("The +- of a single-seed row is the standard error over evaluation prompts, "
               "which does not include training noise (seed-to-seed spread of the methods above "
               "is the yardstick for those rows).\n")
  euph = _curves(runs["euphonium"])
  sd, se_, ratio = speedup(euph, dance, steps)
  wall = spi["dance_grpo"] / spi["euphonium"]
  if len(euph) > 1 and len(dance) > 1:
    lo, hi, never = bootstrap_speedup(euph, dance, steps)
    ci = (f" (95% bootstrap interval over seeds {lo:.2f}-{hi:.2f}; in {never:.0%} of the "
          "resamples Euphonium's mean curve never reached the threshold, counted as 0)")
    ci_wall = f" (interval {lo * wall:.2f}-{hi * wall:.2f})"
  else:
    ci = ci_wall = " (one seed: no interval)"
  if np.isinf(se_):
    lines.append(f"Speed-up: Euphonium's seed-mean curve never reached the threshold "
                 f"(DanceGRPO's reached it at step {sd:.1f}).")
  else:
    lines.append(f"Speed-up of Euphonium over DanceGRPO in steps: {sd:.1f} / {se_:.1f} = "
                 f"{ratio:.2f}{ci}.  ")
    lines.append(f"In wall time: {ratio * wall:.2f}{ci_wall}; Euphonium's iteration costs "
                 f"{1 / wall:.2f}x DanceGRPO's (PRM guidance in the rollout).")
  return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict]], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  has_ablations = any(n not in METHODS for n in runs)
  fig, axes = plt.subplots(1, 2 if has_ablations else 1, figsize=(12 if has_ablations else 7, 4.5),
                           squeeze=False, sharey=True)
  panels = [(axes[0, 0], [n for n in runs if n in METHODS], "methods (band: +- 1 SE over seeds)")]
  if has_ablations:
    panels.append((axes[0, 1], ["euphonium"] + [n for n in runs if n not in METHODS],
                   "ablations of Euphonium (1 seed: band = SE over prompts)"))
  for ax, names, title in panels:
    for name in names:
      rs = runs[name]
      s = rs[0]["steps"]
      r = _curves(rs)
      m = r.mean(0)
      se = r.std(0, ddof=1) / np.sqrt(len(rs)) if len(rs) > 1 else rs[0]["stderr"]
      style = "-" if name in METHODS else "--"
      line, = ax.plot(s, m, style, marker="o", markersize=3, label=f"{name} (n={len(rs)})")
      ax.fill_between(s, m - se, m + se, color=line.get_color(), alpha=0.15)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("iteration (one optimiser step each)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  axes[0, 0].set_ylabel("held-out reward (ODE, no reward model)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="/tmp/euph_convergence")
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "convergence"))
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--ablation_seeds", type=int, default=1)
  p.add_argument("--iterations", type=int, default=10)
  p.add_argument("--eval_every", type=int, default=2)
  p.add_argument("--eval_prompts", type=int, default=128)
  p.add_argument("--prompts", type=int, default=0,
                 help="grpo.prompts_per_iteration (and samples_per_update = prompts x 8) for "
                      "every run; 0 = the configs' own")
  p.add_argument("--quick", action="store_true",
                 help="the five methods only, 1 seed, 6 iterations, evaluation every 3 on 64 "
                      "prompts (~10 minutes on 2 cores)")
  p.add_argument("--no_ablations", action="store_true")
  args = p.parse_args()
  if args.quick:
    args.seeds, args.iterations, args.eval_every, args.eval_prompts = 1, 6, 3, 64
    args.no_ablations = True
    if args.out.endswith("convergence"):
      args.out += "_quick"
  os.makedirs(args.workdir, exist_ok=True)
  command = "python experiments/convergence.py " + " ".join(sys.argv[1:])
  # Seed-major, so that a study stopped part-way has every method at the same number of seeds.
  plan = [(n, c, o, s) for s in range(args.seeds) for n, (c, o) in METHODS.items()]
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
