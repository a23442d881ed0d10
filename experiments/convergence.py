r"""Convergence study: Euphonium against DanceGRPO, Flow-GRPO, Flow-GRPO-Fast and MixGRPO at a
budget where the baseline plateaus, with ablations, distillation measured and PRM quality.

  python experiments/convergence.py                      # the whole study, all parts
  python experiments/convergence.py --parts methods      # one part (methods, ablations,
                                                         #   distill, prm), resumable
  python experiments/convergence.py --analyse            # tables and plot from finished runs
  python experiments/convergence.py --quick              # five methods, 1 seed, short
  python experiments/convergence.py --prompts 8 --eval_every 5 --jobs 2   # the settings in use

Every run is `python -m euphonium_jax.main` on one of the method configs
(configs/euphonium.py, dance_grpo.py, flow_grpo.py, flow_grpo_fast.py, mix_grpo.py) with
overrides, in its own workdir under `--workdir`; a finished run is skipped and an interrupted
one resumes (the grpo stage's own checkpoints), so the study resumes run by run; a run finished
at fewer iterations than `--iterations` is extended from its last checkpoint. A finished run
also leaves a record, `--records`/<run>.json (its settings and its grpo metrics rows, ~25 KB;
committed to the repository): the analysis reads the records, and a run whose record is there
is skipped even when its workdir is gone, so the study continues across machines and sessions
whose workdirs do not survive (a record of a shorter budget without its checkpoints is rerun
from the start; a record made with other settings stops the study, naming the file and the
settings). All runs
share the base model, the prompts of iteration i (a function of (seed, i)) and the budget;
evaluation is the stage's: Euler ODE on held-out prompts, no reward model, the same prompts and
noise at every evaluation of every run. Euphonium's runs (and the distillation runs) also
evaluate the guided SDE sampler and the unguided SDE sampler on the same prompts and noise
(`eval.sde`): the gap between them is what distillation should close.

Parts:
  timing     each method alone on the machine (seed 0, `--timing_iterations` iterations): the
             iteration times the wall-time speed-ups use (runs side by side, `--jobs` > 1,
             share the machine and time each other);
  methods    the five methods at `--seeds` seeds;
  ablations  Euphonium's ablations at `--ablation_seeds` seeds (paired with Euphonium's seeds);
  distill    a guidance-strength probe (beta 0.1 to 0.001 at iteration 0: is there a gap
             between the guided and the unguided sampler at any strength?), then explicit
             distillation at `DISTILL_BETA` (0.001: at Euphonium's 0.5 the gap is ~1e-4):
             `distill_off` (no explicit distillation: the reference), `grpo.distill_coef` x
             `grpo.kl_coef` at seed 0 and frozen teachers, then the best cell (highest final
             ODE reward) and `distill_off` at `--ablation_seeds` seeds, paired;
  prm        PRMs trained on 1/4 and 1/2 of configs/prm.py's rollouts (the prm stage, its
             report's Spearman), Euphonium with each at `--ablation_seeds` seeds.

Analysis (`analyse`): three thresholds, each with a percentile bootstrap over seeds (every
method's seeds resampled with replacement, thresholds and curves recomputed): the paper's (the
baseline's plateau reward: DanceGRPO's seed-mean curve averaged over its last three
evaluations), the baseline's final mean, and 90% of the baseline's gain from its start to its
plateau (on a flat curve the first two sit where a small change of the threshold moves the
baseline's crossing by tens of iterations; the third sits where its curve still rises). Steps to a threshold on the seed-mean curve
(linear interpolation between evaluations; never = not reached); speed-up =
steps(DanceGRPO) / steps(method), in wall time times the ratio of median seconds per
iteration (rollout + update, measured in the same study). Whether DanceGRPO has flattened:
its last three seed-mean evaluations within one standard error (over seeds) of each other.
Ablations: paired differences against Euphonium, seed by seed (same seed = same training
prompts and noise), mean and standard error over seeds. Writes `--out`.md and `--out`.png.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import json
import os
import platform
import queue
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("timing", "methods", "ablations", "distill", "prm")
BASELINE = "dance_grpo"
# The first study's budget (10 iterations, where DanceGRPO still rose and Euphonium reached its
# final reward 4.55x sooner): the early table's threshold is DanceGRPO's reward there.
EARLY_AT = 10
SDE_EVAL = {"eval.sde": ("guided", "unguided")}
TRAIN_REWARD = "reward/shapes_fidelity"  # the embedded world's pixel (outcome) reward

METHODS = {
    "euphonium": ("configs/euphonium.py", SDE_EVAL),
    "dance_grpo": ("configs/dance_grpo.py", {}),
    "flow_grpo": ("configs/flow_grpo.py", {}),
    "flow_grpo_fast": ("configs/flow_grpo_fast.py", {}),  # SDE on 2 random steps, ODE elsewhere
    "mix_grpo": ("configs/mix_grpo.py", {}),  # a sliding 4-step SDE window, ODE elsewhere
}
# Ablations of Euphonium (configs/euphonium.py: PRM-guided constant-noise SDE, theory guidance
# with beta 0.5 on steps 8-15, outcome + process advantage with the process reward = change of
# the PRM score across the step, no distillation).
ABLATIONS = {
    "guidance_off_dual": ("configs/euphonium.py", {"sampling.guidance.mode": "off",
                                                   "sampling.score_unguided_steps": True}),
    "guided_outcome_only": ("configs/euphonium.py", {"grpo.advantage_mode": "none"}),
    # The memoryless schedule with the theory strength: the exact tilt exp(R / beta).
    "memoryless_theory": ("configs/euphonium.py", {"sampling.schedule": "memoryless"}),
    "process_pre": ("configs/euphonium.py", {"grpo.process_source": "pre"}),
    "process_post": ("configs/euphonium.py", {"grpo.process_source": "post"}),
    # configs/euphonium_reference.py's sampler, rewards and advantages at Euphonium's batch
    # (16 prompts x 8, one optimiser step of 128) and learning rate (the reference's 1e-6 does
    # not move the small network): guidance 0.01 dt grad R (beta 3.125) on steps 12-15,
    # the pre-step process reward with coefficient 1, the pixel reward with weight 2 plus the
    # PRM of the final latent with weight 1, ratio clip 1e-4, advantage clip 5, 60% of the
    # transitions, the last step's clean estimate scored.
    "reference": ("configs/euphonium.py", {
        "sampling.guidance.mode": "beta", "sampling.guidance.beta": 3.125,
        "sampling.guidance.start": 12, "grpo.process_source": "pre", "grpo.process_coef": 1.0,
        "grpo.rewards": (("shapes_fidelity", 2.0), ("prm_final", 1.0)),
        "grpo.clip_range": 1e-4, "grpo.adv_clip": 5.0, "grpo.timestep_fraction": 0.6,
        "grpo.score": "x0_hat"}),
}
# Explicit distillation runs at a stronger guidance than Euphonium's: at its beta 0.5 the guided
# and unguided samplers differ by ~1e-4 in reward (the probe below, and every evaluation of
# Euphonium seed 0), so there is nothing to distil; at beta 0.001 (500x the shift) the guided
# sampler earns +0.045 at iteration 0 (2 prompt-SEs). The distill part's runs use it, and its
# reference is the same run without explicit distillation (`distill_off`).
DISTILL_BETA = 0.001
DISTILL_GUIDANCE = dict(SDE_EVAL, **{"sampling.guidance.beta": DISTILL_BETA})
DISTILL_COEFS = (0.1, 0.3, 1.0)
KL_COEFS = (0.01, 0.1, 1.0)
# A frozen teacher instead of the on-policy target (no KL): the initial model's guided kernel
# (never refreshed) and a snapshot refreshed every 5 iterations.
DISTILL_FROZEN = {
    "distill_frozen_never": {"grpo.distill_coef": 0.3, "grpo.kl_coef": 0.0,
                             "grpo.distill_teacher": "frozen", "grpo.teacher_refresh_every": 0},
    "distill_frozen_every5": {"grpo.distill_coef": 0.3, "grpo.kl_coef": 0.0,
                              "grpo.distill_teacher": "frozen", "grpo.teacher_refresh_every": 5},
}
# Guidance strength probe (distill part): does any strength give the guided sampler a reward
# the unguided one lacks (a gap for distillation to close)? Euphonium's sampler at iteration 0
# (the base model) with beta 0.5 (Euphonium's own: its runs' first evaluation) down to 0.001
# (500x the shift); one iteration each, its evaluation at iteration 0 is the probe.
GUIDANCE_BETAS = (0.1, 0.02, 0.005, 0.001)
PRM_FRACTIONS = {"prm_quarter": 4, "prm_half": 2}  # name -> 1 / fraction of the rollouts
# Every distillation run's name, in the report's order.
DISTILL_RUNS = (["distill_off"] + [f"distill_d{d}_k{k}" for d in DISTILL_COEFS for k in KL_COEFS]
                + list(DISTILL_FROZEN) + ["distill_best"])


def _flag(key, value) -> str:
  # ml_collections parses a string override raw (no quotes) and other types as literals.
  return f"--config.{key}={value}" if isinstance(value, str) else f"--config.{key}={value!r}"


_CORES = queue.Queue()  # free core sets, one per concurrent run (`--jobs`)


def _env(args) -> dict:
  """The runs' environment: JAX's persistent compilation cache shared by every run of the
  study (the seeds of a method compile the same programs: ~75 s a run saved on 2 cores)."""
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", args.compilation_cache
                 or os.path.join(args.workdir, "jax_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  return env


def _call(cmd: list[str], log_path: str, what: str, args, alone: bool = False) -> None:
  """Runs `cmd` to the end; with `--jobs` > 1 and not `alone`, pinned to a free core set."""
  t0 = time.time()
  cores = _CORES.get() if args.jobs > 1 and not alone else None
  where = f" [cores {sorted(cores)}]" if cores else ""
  print(f"[study] {what}{where}: {' '.join(cmd[3:])}", flush=True)
  try:
    with open(log_path, "a") as log:
      rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=_env(args),
                           preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
  finally:
    if cores:
      _CORES.put(cores)
  if rc != 0:
    raise RuntimeError(f"[study] {what} failed (exit {rc}); see {log_path}")
  print(f"[study] {what}: finished in {time.time() - t0:.0f} s", flush=True)


def _settings(config: str, over: dict, args) -> dict:
  """What makes two runs the same run, but for the budget: the config and its overrides
  (paths under `--workdir` written relative to it, so a record matches on another machine)."""
  flags = sorted(_flag(k, v).replace(args.workdir.rstrip("/") + "/", "$WORKDIR/")
                 for k, v in over.items() if k != "grpo.iterations")
  return {"config": config, "overrides": flags}


def record_path(workdir: str, args) -> str:
  return os.path.join(args.records, os.path.basename(workdir) + ".json")


def _sig(v):
  return float(f"{v:.7g}") if isinstance(v, float) else v


def _grpo_rows(workdir: str) -> list[dict]:
  """The grpo stage's rows of `workdir`'s metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if r.get("stage") == "grpo"]


def save_record(workdir: str, settings: dict, args) -> None:
  """The finished run in `workdir` -> its record: settings, budget, machine and the grpo
  stage's metrics rows (float32 precision; the wall-clock stamp dropped). Written atomically."""
  with open(os.path.join(workdir, "grpo", "final", "info.json")) as f:
    iterations = int(json.load(f)["iterations"])
  rows = [{k: _sig(v) for k, v in r.items() if k not in ("time", "stage")}
          for r in _grpo_rows(workdir)]
  rec = dict(settings, iterations=iterations, machine=f"{_cpu_model()}, {os.cpu_count()} cores",
             date=time.strftime("%Y-%m-%d"), jobs=args.jobs, rows=rows)
  path = record_path(workdir, args)
  os.makedirs(args.records, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(rec, f, separators=(",", ":"))
    f.write("\n")
  os.replace(path + ".tmp", path)


def load_record(workdir: str, args, settings: dict | None = None) -> dict | None:
  """The record of the run of `workdir`, if any; with `settings`, one made with other
  settings is an error naming the file and what differs."""
  path = record_path(workdir, args)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    rec = json.load(f)
  if settings is not None:
    for key in ("config", "overrides"):
      if rec.get(key) != settings[key]:
        mine, theirs = settings[key], rec.get(key)
        if isinstance(mine, list):
          mine = sorted(set(mine) - set(theirs or ()))
          theirs = sorted(set(theirs or ()) - set(settings[key]))
        raise SystemExit(f"[study] {path}: made with {key} {theirs}, this study asks for "
                         f"{mine}; use another --records folder (or delete the record to "
                         "rerun it)")
  return rec


def _run_grpo(config: str, workdir: str, over: dict, what: str, args, alone: bool = False) -> None:
  """One grpo-stage run of `config` with `over` (and the study's batch, `--prompts`), unless
  it has finished already (in `workdir`, or as a record). A run finished at fewer iterations
  than `over` asks for is extended: its final model moves to `final_<iterations>` and the
  stage resumes from its last checkpoint (the learning rate is constant after warm-up, so the
  extended run is the run of the larger budget from the start)."""
  over = dict(over)
  if args.prompts:
    over.update({"grpo.prompts_per_iteration": args.prompts,
                 "grpo.samples_per_update": args.prompts * 8})
  settings = _settings(config, over, args)
  want = over.get("grpo.iterations")
  final = os.path.join(workdir, "grpo", "final")
  rec = load_record(workdir, args, settings)
  if os.path.exists(os.path.join(final, "DONE")):
    with open(os.path.join(final, "info.json")) as f:
      done = int(json.load(f)["iterations"])
    if rec is None or rec["iterations"] != done:
      save_record(workdir, settings, args)
    if want is None or done >= want or getattr(args, "analyse", False):
      return
    os.replace(final, f"{final}_{done}")
  elif rec is not None:
    if want is None or rec["iterations"] >= want:
      return
    if not os.path.isdir(os.path.join(workdir, "grpo")):
      print(f"[study] {what}: its record has {rec['iterations']} iterations and its "
            f"checkpoints are not here: rerunning it from the start to {want}", flush=True)
  if getattr(args, "analyse", False):  # --analyse records finished runs and runs nothing
    return
  cmd = [sys.executable, "-m", "euphonium_jax.main", "--config",
         os.path.join(REPO, config), "--workdir", workdir] + [_flag(k, v) for k, v in over.items()]
  _call(cmd, workdir + ".log", what, args, alone)
  save_record(workdir, settings, args)


def run_one(name: str, config: str, overrides: dict, seed: int, args) -> str:
  """`overrides` win over the study's settings (the parts after `methods` set their own
  `grpo.iterations`)."""
  workdir = os.path.join(args.workdir, f"{name}_seed{seed}")
  _run_grpo(config, workdir, dict({
      "seed": seed, "grpo.iterations": args.iterations, "grpo.eval_every": args.eval_every,
      "eval.num_prompts": args.eval_prompts, "grpo.ckpt_every": args.eval_every,
      "stages": ("grpo",)}, **overrides), f"{name} seed {seed}", args)
  return workdir


def run_many(runs: list[tuple], args, fatal=lambda name: True) -> None:
  """(name, config, overrides, seed) runs, `--jobs` at a time, each pinned to its own share of
  the cores (one process per core computes more per second than one process on all of them:
  1.2x on 2 AMD cores for DanceGRPO's iteration); the first failure stops the study (unless
  `fatal(name)` is false: that run is reported and left out)."""
  def one(r):
    try:
      run_one(*r, args)
    except RuntimeError as e:
      if fatal(r[0]):
        raise
      print(f"{e}: left out", flush=True)

  if args.jobs <= 1:
    for r in runs:
      one(r)
    return
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    futures = [pool.submit(one, r) for r in runs]
    for f in concurrent.futures.as_completed(futures):
      f.result()


def run_timing(args) -> None:
  """Each method alone on every core (never beside another run), `--timing_iterations`
  iterations at the study's batch: the iteration times the wall-time speed-ups use."""
  for name, (config, over) in METHODS.items():
    _run_grpo(config, os.path.join(args.workdir, f"timing_{name}"), dict(over, **{
        "seed": 0, "grpo.iterations": args.timing_iterations,
        "grpo.eval_every": args.timing_iterations, "eval.num_prompts": 8, "eval.sde": (),
        "stages": ("grpo",)}), f"timing {name}", args, alone=True)


def train_prm(name: str, fraction: int, args) -> str:
  """The prm stage (configs/prm.py) on 1 / `fraction` of its training prompts -> its dir."""
  workdir = os.path.join(args.workdir, name)
  final = os.path.join(workdir, "prm", "final")
  if not os.path.exists(os.path.join(final, "DONE")):
    sys.path.insert(0, REPO)
    from euphonium_jax import config as config_lib
    n = config_lib.from_file(os.path.join(REPO, "configs", "prm.py")).prm.data.num_prompts
    cmd = [sys.executable, "-m", "euphonium_jax.main", "--config",
           os.path.join(REPO, "configs", "prm.py"), "--workdir", workdir,
           _flag("prm.data.num_prompts", n // fraction)]
    _call(cmd, workdir + ".log", f"PRM on 1/{fraction} of the data", args, alone=True)
  # its report (the Spearman the analysis shows) outlives the workdir beside the run records
  os.makedirs(args.records, exist_ok=True)
  with open(os.path.join(workdir, "prm", "report.json")) as f:
    rep = json.load(f)
  with open(_prm_report_record(name, args), "w") as f:
    json.dump(rep, f)
  return final


def _prm_report_record(name: str, args) -> str:
  return os.path.join(args.records, f"{name}_prm_report.json")


def prm_quality(name: str, args) -> dict | None:
  """Spearman(R_phi(x_t, t), final reward) per t bucket from a prm stage's report.json (the
  shipped PRM's, or the copy of a trained one's kept beside the records); None if untrained."""
  path = (os.path.join(REPO, "assets", "embedded_prm_report.json") if name == "shipped"
          else _prm_report_record(name, args))
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_run(workdir: str, args) -> dict | None:
  """A finished run's curves: from its record under `--records` if there is one, else from
  `workdir`'s metrics if it has finished there; None if neither."""
  rec = load_record(workdir, args)
  machine = f"{_cpu_model()}, {os.cpu_count()} cores"
  if rec is not None:
    rows, machine = rec["rows"], f"{rec['machine']} ({rec['date']})"
  elif os.path.exists(os.path.join(workdir, "grpo", "final", "DONE")):
    rows = _grpo_rows(workdir)
  else:
    return None
  evals = [r for r in rows if "eval_reward" in r]
  last = {}
  for r in evals:  # a resumed run may repeat an evaluation: keep the last of each step
    last[r["step"]] = r
  evals = [last[s] for s in sorted(last)]
  train = [r for r in rows if "update_seconds" in r]
  out = {"steps": np.array([r["step"] for r in evals], float),
         "reward": np.array([r["eval_reward"] for r in evals], float),
         "stderr": np.array([r["eval_stderr"] for r in evals], float),
         "seconds_per_iteration": float(np.median(
             [r["rollout_seconds"] + r.get("reward_seconds", 0.0) + r["update_seconds"]
              for r in train])), "machine": machine}
  for kind in ("sde_guided", "sde_unguided"):
    if all(f"eval_reward_{kind}" in r for r in evals):
      out[kind] = np.array([r[f"eval_reward_{kind}"] for r in evals], float)
  # Training signals per iteration: the pixel reward of the rollouts and the mean PRM score
  # on the scored steps (the process reward; absent when no step is scored).
  for key, name in ((TRAIN_REWARD, "train_reward"), ("process_reward", "process_reward")):
    if train and all(key in r for r in train):
      out[name] = np.array([r[key] for r in train], float)
  return out


def steps_to(steps: np.ndarray, reward: np.ndarray, threshold: float) -> float:
  """First (interpolated) step at which a reward curve reaches `threshold`; inf if never."""
  for i in range(len(reward)):
    if reward[i] >= threshold:
      if i == 0:
        return float(steps[0])
      frac = (threshold - reward[i - 1]) / (reward[i] - reward[i - 1])
      return float(steps[i - 1] + frac * (steps[i] - steps[i - 1]))
  return float("inf")


def plateau_threshold(base: np.ndarray) -> float:
  """The paper's threshold: the baseline's seed-mean curve averaged over its last three
  evaluations (its plateau reward). `base` is [seeds, evaluations]."""
  return float(base.mean(0)[-3:].mean())


def final_threshold(base: np.ndarray) -> float:
  """The baseline's mean final evaluation reward."""
  return float(base[:, -1].mean())


def gain90_threshold(base: np.ndarray) -> float:
  """90% of the baseline's gain from its start to its plateau: start + 0.9 (plateau - start).
  On a plateaued curve the plateau and final thresholds are crossed where the curve is flat,
  so one seed more or less moves the baseline's steps to them by tens of iterations; this one
  is crossed where the curve still rises."""
  return float(base[:, 0].mean() + 0.9 * (plateau_threshold(base) - base[:, 0].mean()))


def speedup(curves: np.ndarray, base: np.ndarray, steps: np.ndarray, threshold_fn
            ) -> tuple[float, float, float]:
  """(steps of the baseline, steps of the method, ratio) on the seed-mean curves at
  `threshold_fn(base)`; `curves` and `base` are [seeds, evaluations]. A method that never
  reaches the threshold gives ratio 0; a baseline that never does (possible for the plateau
  threshold) gives inf; reaching it at step 0 is inf too."""
  threshold = threshold_fn(base)
  sb = steps_to(steps, base.mean(0), threshold)
  # a method's budget may be shorter than the baseline's: its evaluations are a prefix
  sm = steps_to(steps[:curves.shape[1]], curves.mean(0), threshold)
  if np.isinf(sm):
    return sb, sm, 0.0
  return sb, sm, (np.inf if sm == 0 else sb / sm)


def bootstrap_speedup(curves, base, steps, threshold_fn, n: int = 10000, seed: int = 0):
  """Percentile 95% interval of `speedup`, resampling each side's seeds with replacement ->
  (low, high, fraction of resamples in which the method never reached the threshold)."""
  rng = np.random.default_rng(seed)
  ratios = np.array([
      speedup(curves[rng.integers(0, len(curves), len(curves))],
              base[rng.integers(0, len(base), len(base))], steps, threshold_fn)[2]
      for _ in range(n)])
  # a resample in which both sides reach the threshold at step 0 has ratio inf: the percentile
  # is then the nearest resample's (interpolating towards inf is undefined)
  method = "nearest" if np.isinf(ratios).any() else "linear"
  return (float(np.percentile(ratios, 2.5, method=method)),
          float(np.percentile(ratios, 97.5, method=method)), float(np.mean(ratios == 0)))


def paired(ablation: list[dict], reference: list[dict], key: str = "reward", at=-1):
  """Seed-by-seed differences (ablation - reference) at evaluation `at` (or the mean over
  evaluations, at=None) over the seeds both have -> (mean, SE over seeds, n). Runs are matched
  by their "seed" where they carry one (the study's do), else by position."""
  if all("seed" in r for r in ablation + reference):
    by_seed = {r["seed"]: r for r in reference}
    pairs = [(a, by_seed[a["seed"]]) for a in ablation if a["seed"] in by_seed]
  else:
    pairs = list(zip(ablation, reference))
  if not pairs:
    return float("nan"), float("nan"), 0
  # the evaluations both have: a shorter budget's evaluations are a prefix of a longer one's
  m = min(len(ablation[0][key]), len(reference[0][key]))
  pick = (lambda r: r[key][:m][at]) if at is not None else (lambda r: r[key][:m].mean())
  d = np.array([pick(a) - pick(r) for a, r in pairs])
  return float(d.mean()), _se(d), len(pairs)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _curves(rs: list[dict], key: str = "reward") -> np.ndarray:
  return np.stack([r[key] for r in rs])


def _se(x: np.ndarray) -> float:
  x = np.asarray(x, float)
  return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def _steps_txt(x: float) -> str:
  return "never" if np.isinf(x) else f"{x:.1f}"


def _pm(mean: float, se: float) -> str:
  return f"{mean:+.4f} +- {se:.4f}" if np.isfinite(se) else f"{mean:+.4f} (1 seed)"


def _peak(curve: np.ndarray, steps: np.ndarray) -> str:
  """A curve's highest evaluation and the iteration of it."""
  return f"{curve.max():.4f} ({int(steps[int(curve.argmax())])})"


def _gap(r: dict, i: int) -> float:
  """Run `r`'s guided minus unguided SDE reward at evaluation `i`."""
  return r["sde_guided"][i] - r["sde_unguided"][i]


def _sampler_lines(rs: list[dict]) -> list[str]:
  """A table of the guided SDE, unguided SDE and ODE rewards of runs `rs` at every evaluation
  (mean +- SE over seeds) and the gap guided - unguided paired per seed."""
  lines = ["| iteration | guided SDE | unguided SDE | ODE | gap guided - unguided |",
           "|---|---|---|---|---|"]
  g, u, o = (_curves(rs, k) for k in ("sde_guided", "sde_unguided", "reward"))
  for j, s in enumerate(rs[0]["steps"]):
    cell = lambda a: (f"{a[:, j].mean():.4f} +- {_se(a[:, j]):.4f}" if len(a) > 1
                      else f"{a[0, j]:.4f}")
    gap = g[:, j] - u[:, j]
    lines.append(f"| {int(s)} | {cell(g)} | {cell(u)} | {cell(o)} | "
                 f"{_pm(gap.mean(), _se(gap))} |")
  return lines + [""]


def _cut_to_baseline(runs: dict[str, list[dict]]) -> tuple[dict, str]:
  """DanceGRPO's seeds at different budgets (a study in progress): every run cut to the
  shortest seed's evaluations -> (runs, a sentence saying so, or "")."""
  base = runs[BASELINE]
  n_base = min(len(r["steps"]) for r in base)
  if all(len(r["steps"]) == n_base for r in base):
    return runs, ""
  note = (f" Its seeds' budgets differ ({', '.join(str(int(r['steps'][-1])) for r in base)}"
          f" iterations): all are analysed to the shortest, {int(base[0]['steps'][n_base - 1])}"
          " (and so is every other run).")
  keys = ("steps", "reward", "stderr", "sde_guided", "sde_unguided")
  return {n: [dict(r, **{k: r[k][:n_base] for k in keys if k in r}) for r in rs]
          for n, rs in runs.items()}, note


def _early_lines(runs, base, steps, abl) -> list[str]:
  """Which run is faster early: steps to DanceGRPO's seed-mean reward at iteration
  `EARLY_AT` for every method and ablation, with the bootstrap over seeds, and each seed-mean
  curve's peak."""
  i = int(np.flatnonzero(steps == EARLY_AT)[0])
  fn = lambda b: float(b.mean(0)[i])
  lines = [f"## Early speed-up (the first study's budget: {EARLY_AT} iterations)\n",
           f"Threshold = DanceGRPO's seed-mean reward at iteration {EARLY_AT} = "
           f"{fn(base):.4f}; steps to it on the seed-mean curves, speed-up = DanceGRPO's "
           "steps / the run's (95% percentile bootstrap over both sides' seeds); peak = the "
           "seed-mean curve's highest evaluation.\n",
           f"| run | seeds | reward at {EARLY_AT} (mean +- SE) | steps to threshold | "
           "speed-up in steps (95% CI) | never reached in | peak (iteration) | final |",
           "|---|---|---|---|---|---|---|---|"]
  for name in [n for n in METHODS if n in runs] + abl:
    c = _curves(runs[name])
    sb, sm, ratio = speedup(c, base, steps, fn)
    if name == BASELINE:
      sp, nv = "(the baseline)", ""
    elif len(c) > 1 and len(base) > 1:
      lo, hi, never = bootstrap_speedup(c, base, steps, fn)
      sp, nv = f"{ratio:.2f} ({lo:.2f}-{hi:.2f})", f"{never:.0%}"
    else:
      sp, nv = f"{ratio:.2f} (1 seed)", ""
    mc = c.mean(0)
    at = f"{mc[i]:.4f} +- {_se(c[:, i]):.4f}" if len(c) > 1 else f"{mc[i]:.4f}"
    lines.append(f"| {name} | {len(c)} | {at} | "
                 f"{_steps_txt(sm)} | {sp} | {nv} | "
                 f"{_peak(mc, steps)} | {mc[-1]:.4f} |")
  return lines + [""]


def analyse(runs: dict[str, list[dict]], args, command: str, prm_info: dict,
            timing: dict[str, float] | None = None, probes: dict | None = None) -> str:
  """The report's text. `timing`: method -> median seconds per iteration of its timing run
  (alone on the machine); it replaces the runs' own (possibly run side by side) medians.
  `probes`: guidance beta -> the run of the guidance probe (its iteration-0 evaluation)."""
  if BASELINE not in runs:
    return "No finished DanceGRPO run yet: nothing to analyse.\n"
  runs, cut_note = _cut_to_baseline(runs)
  steps = runs[BASELINE][0]["steps"]
  for name, rs in runs.items():
    for r in rs:  # the methods share the budget; the other parts may stop earlier
      want = steps if name == BASELINE else steps[:len(r["steps"])]
      if not np.array_equal(r["steps"], want):
        raise ValueError(f"{name}: evaluations at {r['steps']}, expected {want}")
  base = _curves(runs[BASELINE])
  thresholds = {"plateau": (plateau_threshold, plateau_threshold(base)),
                "final": (final_threshold, final_threshold(base)),
                "90% of gain": (gain90_threshold, gain90_threshold(base))}
  start = float(base[0, 0])
  spi = {k: float(np.median([r["seconds_per_iteration"] for r in v])) for k, v in runs.items()}
  timed_alone = bool(timing) and all(k in timing for k in METHODS if k in runs)
  if timed_alone:
    spi.update({k: timing[k] for k in METHODS if k in runs})
  mean_b = base.mean(0)
  se_b = base.std(0, ddof=1) / np.sqrt(len(base)) if len(base) > 1 else runs[BASELINE][0][
      "stderr"]
  last3 = mean_b[-3:]
  flat = float(last3.max() - last3.min()) <= float(se_b[-3:].min())
  # a second reading of the plateau, less at the mercy of one evaluation's noise: the slope
  # of each seed's curve over the last third of the budget (least squares), over seeds
  tail = steps >= steps[-1] * 2 / 3
  slopes = np.array([np.polyfit(steps[tail], c[tail], 1)[0] for c in base]) * 10
  slope_txt = (f" Slope over iterations {int(steps[tail][0])}-{int(steps[-1])} (each seed's "
               f"least-squares line, per 10 iterations): {_pm(slopes.mean(), _se(slopes))}"
               + (f" over {len(slopes)} seeds" if len(slopes) > 1 else "") + ".")
  budgets = ", ".join(f"{n} {int(rs[0]['steps'][-1])}" for n, rs in runs.items()
                      if n in METHODS)
  lines = [
      "# Convergence study on the embedded world\n",
      f"Command: `{command}`  ",
      f"Analysed on {_cpu_model()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; "
      "the runs were made on "
      + "; ".join(sorted({r["machine"] for rs in runs.values() for r in rs if "machine" in r}))
      + f" (records: `{os.path.relpath(getattr(args, 'records', '.'), REPO)}`).  ",
      f"Every run: the grpo stage from the shipped base model "
      f"and PRM; evaluation at iteration 0 and every {int(steps[1] - steps[0])} on "
      f"{args.eval_prompts} held-out prompts (Euler ODE, 30 steps, no reward model; the same "
      "prompts and noise for every run, so every curve starts at the same value)"
      + (f"; training batch {args.prompts} prompts x 8 samples, one optimiser step per "
         "iteration" if args.prompts else "; the configs' training batch")
      + (f"; {args.jobs} runs at a time, each on its own core(s)" if args.jobs > 1 else "")
      + f"; budgets (iterations) {budgets}.  ",
      ("Seconds per iteration (rollout + rewards + update, median): from each method's timing "
       f"run (seed 0, {args.timing_iterations} iterations, alone on the machine)."
       if timed_alone else "Seconds per iteration (rollout + rewards + update, median): "
       "from the runs themselves.") + "\n",
      f"Baseline (DanceGRPO, {len(base)} seeds): start {start:.4f}; its last three seed-mean "
      f"evaluations {', '.join(f'{x:.4f}' for x in last3)} (SE over "
      f"{'seeds' if len(base) > 1 else 'prompts, 1 seed'} "
      f"{', '.join(f'{x:.4f}' for x in se_b[-3:])}): "
      + ("flattened (spread within one SE)." if flat else
         "NOT flattened by this criterion (spread larger than one SE).")
      + slope_txt + cut_note,
      f"Thresholds: plateau (the paper's: mean of those three) = "
      f"{thresholds['plateau'][1]:.4f}; final (the baseline's final mean) = "
      f"{thresholds['final'][1]:.4f}; 90% of gain (start + 0.9 x (plateau - start)) = "
      f"{thresholds['90% of gain'][1]:.4f}."
      + ("" if min(v for _, v in thresholds.values()) > start else
         f" A threshold at or below the start ({start:.4f}): the baseline did not improve, so "
         "every run reaches it at iteration 0 and that threshold's speed-ups (inf) are "
         "undefined, not a result.") + "\n",
      "## Methods\n",
      "| run | seeds | iterations | final eval reward (mean +- SE over seeds) | "
      "gain over start | "
      "steps to plateau thr., seed-mean (per seed) | steps to final thr. (per seed) | "
      "steps to 90% of gain (per seed) | s / iteration |",
      "|---|---|---|---|---|---|---|---|---|"]

  def row(name, rs):
    c = _curves(rs)
    final = c[:, -1]
    cells = []
    for fn, thr in thresholds.values():
      st = steps[:c.shape[1]]
      per = ", ".join(_steps_txt(steps_to(st, x, thr)) for x in c)
      cells.append(f"{_steps_txt(steps_to(st, c.mean(0), thr))} ({per})")
    se = _se(final)
    se_txt = f"{se:.4f}" if np.isfinite(se) else f"{rs[0]['stderr'][-1]:.4f} (prompts)"
    return (f"| {name} | {len(rs)} | {int(rs[0]['steps'][-1])} | "
            f"{final.mean():.4f} +- {se_txt} | "
            f"{final.mean() - start:+.4f} | {' | '.join(cells)} | {spi[name]:.2f} |")

  for name in METHODS:
    if name in runs:
      lines.append(row(name, runs[name]))
  lines += ["", "Speed-up over DanceGRPO (steps to the threshold on the seed-mean curves; "
            "95% percentile bootstrap over seeds; wall = steps ratio x the ratio of median "
            "seconds per iteration):\n",
            "| method | threshold | DanceGRPO steps | method steps | speed-up in steps (95% CI) "
            "| never reached in | iteration time vs DanceGRPO | speed-up in wall time (95% CI) |",
            "|---|---|---|---|---|---|---|---|"]
  for name in METHODS:
    if name == BASELINE or name not in runs:
      continue
    c = _curves(runs[name])
    wall = spi[BASELINE] / spi[name]
    for tname, (fn, _) in thresholds.items():
      sb, sm, ratio = speedup(c, base, steps, fn)
      if len(c) > 1 and len(base) > 1:
        lo, hi, never = bootstrap_speedup(c, base, steps, fn)
        ci, ciw, nv = f" ({lo:.2f}-{hi:.2f})", f" ({lo * wall:.2f}-{hi * wall:.2f})", \
            f"{never:.0%}"
      else:
        ci = ciw = nv = " (1 seed)"
      budget = float(runs[name][0]["steps"][-1])
      # not reached within its budget B: a reach after B would be a speed-up below steps_b / B
      sm_txt = (f"never in {budget:.0f} (would be < {sb / budget:.2f}x)"
                if np.isinf(sm) and np.isfinite(sb) else _steps_txt(sm))
      lines.append(f"| {name} | {tname} | {_steps_txt(sb)} | {sm_txt} | "
                   f"{ratio:.2f}{ci} | {nv} | {1 / wall:.2f}x | {ratio * wall:.2f}{ciw} |")
  lines.append("")

  abl = [n for n in list(ABLATIONS) + list(PRM_FRACTIONS) if n in runs]
  ref = runs.get("euphonium", [])
  if abl and ref:
    lines += ["## Ablations (paired with Euphonium seed by seed)\n",
              "Difference = ablation - Euphonium for the same seed (same training prompts and "
              "noise, same evaluation prompts and noise); mean +- SE over seeds, which includes "
              "training noise.\n",
              "An ablation's budget may be shorter than the methods' (`--ablation_iterations`):"
              " it is compared with Euphonium's evaluation at the same iteration, and its "
              "mean over evaluations with Euphonium's over the same evaluations.\n",
              "| ablation | seeds | iterations | final eval reward | final minus Euphonium "
              "(same iteration) | mean over evaluations minus Euphonium's | steps to plateau "
              "thr. (seed-mean) | s / iteration |",
              "|---|---|---|---|---|---|---|---|"]
    for name in abl:
      rs = runs[name]
      c, s_abl = _curves(rs), rs[0]["steps"]
      d_final = paired(rs, ref)
      d_auc = paired(rs, ref, at=None)
      lines.append(f"| {name} | {len(rs)} | {int(s_abl[-1])} | {c[:, -1].mean():.4f} | "
                   f"{_pm(*d_final[:2])} | {_pm(*d_auc[:2])} | "
                   f"{_steps_txt(steps_to(s_abl, c.mean(0), thresholds['plateau'][1]))} | "
                   f"{spi[name]:.2f} |")
    lines.append(f"| euphonium | {len(ref)} | {int(ref[0]['steps'][-1])} | "
                 f"{_curves(ref)[:, -1].mean():.4f} | | | "
                 f"{_steps_txt(steps_to(ref[0]['steps'], _curves(ref).mean(0), thresholds['plateau'][1]))}"
                 f" | {spi['euphonium']:.2f} |")
    lines.append("")

  if EARLY_AT in steps:
    lines += _early_lines(runs, base, steps, abl)
  sig = [n for n in list(METHODS) + abl + DISTILL_RUNS if n in runs
         and all("train_reward" in r for r in runs[n])]
  if sig:
    lines += ["## Training signals\n",
              "The rollouts' own rewards during training, seed-mean (+- SE over seeds) over the "
              "first and the last 5 iterations: the pixel reward of the training samples and, "
              "where steps are scored, the process reward (the mean PRM score on the scored "
              "steps). A PRM score that rises while the pixel reward falls is the PRM being "
              "over-optimised.\n",
              "| run | seeds | pixel reward, first 5 | last 5 | PRM score, first 5 | last 5 |",
              "|---|---|---|---|---|---|"]
    for name in sig:
      rs = runs[name]
      cells = []
      for key in ("train_reward", "process_reward"):
        if all(key in r for r in rs):
          for part in (slice(0, 5), slice(-5, None)):
            x = np.array([r[key][part].mean() for r in rs])
            cells.append(f"{x.mean():.4f} +- {_se(x):.4f}" if len(x) > 1 else f"{x[0]:.4f}")
        else:
          cells += ["", ""]
      lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    lines.append("")

  if ref and "sde_guided" in ref[0]:
    lines += ["## Distillation: the guided sampler against the network's own samplers\n",
              "Euphonium's runs, at every evaluation, on the same prompts and noise: the "
              "guided SDE (the training sampler with PRM guidance), the unguided SDE (the same "
              "SDE, guidance off: what the network does alone) and the ODE. Mean over seeds "
              "(+- SE over seeds); gap = guided - unguided, paired per seed.\n"]
    lines += _sampler_lines(ref)
    if probes:
      r0 = ref[0]
      lines += ["Guidance strength at iteration 0 (the base model, seed 0; Euphonium's sampler "
                "and PRM, the theory guidance mean += g^2 dt grad R / beta on steps 8-15): is "
                "there a strength at which the guided sampler earns a reward the unguided one "
                "does not? The unguided SDE is the same sampler in every row (same weights, "
                "prompts and noise); a reward's standard error over the prompts is ~0.02, the "
                "gap's smaller (the two share their noise).\n",
                "| beta | shift vs Euphonium's | guided SDE | unguided SDE | gap |",
                "|---|---|---|---|---|",
                f"| 0.5 (Euphonium) | 1x | {r0['sde_guided'][0]:.4f} | "
                f"{r0['sde_unguided'][0]:.4f} | {_gap(r0, 0):+.4f} |"]
      for b, r in sorted(probes.items(), reverse=True):
        lines.append(f"| {b:g} | {0.5 / b:g}x | {r['sde_guided'][0]:.4f} | "
                     f"{r['sde_unguided'][0]:.4f} | "
                     f"{_gap(r, 0):+.4f} |")
      lines.append("")
  off = runs.get("distill_off")
  if off:
    lines += [f"### Explicit distillation at guidance beta {DISTILL_BETA:g}\n",
              f"Euphonium with beta {DISTILL_BETA:g} ({0.5 / DISTILL_BETA:g}x its guidance "
              "shift, where the guided sampler earns a reward the unguided one does not), "
              "without explicit distillation (`distill_off`): its samplers over training.\n"]
    lines += _sampler_lines(off)
  sweep = {k: v for k, v in runs.items()
           if k.startswith("distill_") and k not in ("distill_off", "distill_best")}
  if sweep:
    j = len(next(iter(sweep.values()))[0]["steps"]) - 1
    lines += [f"The sweep (`grpo.distill_coef` x `grpo.kl_coef`, seed 0, beta "
              f"{DISTILL_BETA:g}), final evaluation (iteration {int(steps[j])}); `distill_off` "
              "(the same, no explicit distillation, no KL) and Euphonium seed 0 (beta 0.5) at "
              "the same iteration for comparison:\n",
              "| run | distill_coef | kl_coef | ODE | unguided SDE | guided SDE | gap |",
              "|---|---|---|---|---|---|---|"]
    row = lambda name, d, k, r, i: (
        f"| {name} | {d} | {k} | {r['reward'][i]:.4f} | {r['sde_unguided'][i]:.4f} | "
        f"{r['sde_guided'][i]:.4f} | {_gap(r, i):+.4f} |")
    for name, rs in [("euphonium", ref), ("distill_off", off)]:
      if rs and "sde_guided" in rs[0] and len(rs[0]["steps"]) > j:
        lines.append(row(f"{name} seed 0", 0, 0, rs[0], j))
    for name, rs in sweep.items():
      if name in DISTILL_FROZEN:
        o = DISTILL_FROZEN[name]
        d = o["grpo.distill_coef"]
        every = o["grpo.teacher_refresh_every"]
        k = f"0 (frozen teacher, {f'refreshed every {every}' if every else 'never refreshed'})"
      else:
        d, k = name[len("distill_d"):].split("_k")
      lines.append(row(name, d, k, rs[0], -1))
    lines.append("")
    # the gap over training, every run of the sweep (seed 0) beside distill_off's
    gaps = [(n, rs[0]) for n, rs in [("distill_off", off)] + list(sweep.items())
            if rs and "sde_guided" in rs[0]]
    cols = [j for j, s in enumerate(gaps[0][1]["steps"]) if int(s) % 10 == 0] if gaps else []
    if cols:
      lines += ["The gap guided - unguided SDE over training (seed 0), and the ODE reward "
                "beside it (gap / ODE):\n",
                "| run | " + " | ".join(f"{int(gaps[0][1]['steps'][j])}" for j in cols) + " |",
                "|---|" + "---|" * len(cols)]
      for n, r in gaps:
        lines.append(f"| {n} | " + " | ".join(
            f"{_gap(r, j):+.3f} / {r['reward'][j]:.3f}"
            if j < len(r["steps"]) else "" for j in cols) + " |")
      lines.append("")
  best = runs.get("distill_best")
  if best and off:
    lines += [f"The best cell ({best[0].get('cell', '?')}, highest final ODE reward at seed 0)"
              f" against `distill_off`, paired seed by seed (mean +- SE over seeds):\n",
              "| measure | seeds | best cell | distill_off | best minus distill_off |",
              "|---|---|---|---|---|"]
    for label, key, at in [("final ODE reward", "reward", -1),
                           ("final unguided SDE reward", "sde_unguided", -1),
                           ("final guided SDE reward", "sde_guided", -1),
                           ("ODE reward, mean over evaluations", "reward", None)]:
      pick = (lambda r: r[key][at]) if at is not None else (lambda r: r[key].mean())
      mean, se, n = paired(best, off, key, at)
      lines.append(f"| {label} | {n} | {np.mean([pick(r) for r in best]):.4f} | "
                   f"{np.mean([pick(r) for r in off]):.4f} | {_pm(mean, se)} |")
    gb = np.array([_gap(r, -1) for r in best])
    go = np.array([_gap(r, -1) for r in off])
    lines += [f"| final gap guided - unguided | {len(gb)} / {len(go)} | {_pm(gb.mean(), _se(gb))} | "
              f"{_pm(go.mean(), _se(go))} | |", ""]
    if "sde_guided" in best[0]:
      lines += [f"The best cell's samplers over training ({len(best)} seed{'s' * (len(best) > 1)}):\n"]
      lines += _sampler_lines(best)

  if prm_info:
    lines += ["## PRM quality against speed-up\n",
              "Euphonium with each PRM (the shipped one: the methods' runs), every PRM at the "
              "shortest budget among them. Speed-up = DanceGRPO's steps / the run's steps to "
              "the threshold on the seed-mean curves; the peak is the seed-mean curve's "
              "highest evaluation; the PRM score is the training rollouts' (last 5 "
              "iterations, mean over seeds).\n",
              "| PRM | training rollouts | Spearman, t <= 0.5 buckets (mean) | all buckets | "
              "guidance check z | Euphonium seeds | iterations | peak eval reward (iteration) "
              "| mean over evaluations | final eval reward | speed-up, plateau thr. | "
              "speed-up, 90% of gain thr. | training PRM score, last 5 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    # every PRM at the shortest budget among them (the shipped PRM's runs are the methods')
    prm_runs = {n: runs.get(n if n != "shipped" else "euphonium") for n in prm_info}
    m = min([len(rs[0]["steps"]) for rs in prm_runs.values() if rs] or [len(steps)])

    def prm_speedup(c, thr):
      ratio = speedup(c, base, steps, thresholds[thr][0])[2]
      return "never" if ratio == 0 else f"{ratio:.2f}x"

    for name, info in prm_info.items():
      rs = prm_runs[name]
      if not rs:
        continue
      c = _curves(rs)[:, :m]
      mc = c.mean(0)
      score = ([r["process_reward"][-5:].mean() for r in rs]
               if all("process_reward" in r for r in rs) else [])
      lines.append(f"| {name} | {info['prompts']} | {info['spearman_low_t']:.3f} | "
                   f"{info['spearman_all']:.3f} | {info['guidance_z']:.1f} | {len(rs)} | "
                   f"{int(steps[m - 1])} | {_peak(mc, steps)} | "
                   f"{mc.mean():.4f} | {c[:, -1].mean():.4f} | {prm_speedup(c, 'plateau')} | "
                   f"{prm_speedup(c, '90% of gain')} | "
                   + (f"{np.mean(score):.4f}" if score else "") + " |")
    lines.append("")
  return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict]], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  if BASELINE in runs:
    runs = _cut_to_baseline(runs)[0]
  # (curves, title, run): the runs' ODE reward, or (run given) that run's three samplers
  panels = [([n for n in METHODS if n in runs],
             "methods (band: +- 1 SE over seeds; the prompts' SE for one seed)", None)]
  abl = [n for n in list(ABLATIONS) + list(PRM_FRACTIONS) if n in runs]
  if abl and "euphonium" in runs:
    panels.append((["euphonium"] + abl, "ablations of Euphonium", None))
  for run, title in [("euphonium", "Euphonium's samplers"),
                     ("distill_off", f"beta {DISTILL_BETA:g}, no explicit distillation"),
                     ("distill_best", f"beta {DISTILL_BETA:g}, the best distillation cell")]:
    if run in runs and "sde_guided" in runs[run][0]:
      panels.append((["sde_guided", "sde_unguided", "reward"], title, run))
  cols = min(3, len(panels))
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False,
                           sharey=True)
  for ax in axes.flat[len(panels):]:
    ax.axis("off")
  for ax, (names, title, run) in zip(axes.flat, panels):
    for name in names:
      rs, k = (runs[run], name) if run else (runs[name], "reward")
      label = name if not run else {"sde_guided": "guided SDE", "sde_unguided": "unguided SDE",
                                    "reward": "ODE"}[name]
      s = rs[0]["steps"]
      r = _curves(rs, k)
      m = r.mean(0)
      se = r.std(0, ddof=1) / np.sqrt(len(rs)) if len(rs) > 1 else rs[0]["stderr"]
      line, = ax.plot(s, m, "-" if name in METHODS or run else "--", marker="o",
                      markersize=3, label=f"{label} (n={len(rs)})")
      ax.fill_between(s, m - se, m + se, color=line.get_color(), alpha=0.15)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("iteration (one optimiser step each)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in axes[:, 0]:
    ax.set_ylabel("held-out reward (no reward model)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _core_sets(jobs: int) -> list[set[int]]:
  """This process's cores split into `jobs` disjoint sets (round robin)."""
  cores = sorted(os.sched_getaffinity(0))
  if jobs > len(cores):
    raise SystemExit(f"--jobs {jobs}: more than the {len(cores)} cores this process may use")
  return [set(cores[i::jobs]) for i in range(jobs)]


def plan(args) -> list[tuple]:
  """(part, name, config, overrides, seed) of every run, seed-major within a part, so that a
  study stopped part-way has every method at the same number of seeds. The parts after
  `methods` run `--ablation_iterations` iterations."""
  out = []
  short = {"grpo.iterations": args.ablation_iterations}
  if "methods" in args.parts:
    base = {"grpo.iterations": args.baseline_iterations}
    out += [("methods", n, c, dict(o, **base) if n == BASELINE else o, s)
            for s in range(args.seeds) for n, (c, o) in METHODS.items()]
  if "ablations" in args.parts:
    out += [("ablations", n, c, dict(o, **short), s) for s in range(args.ablation_seeds)
            for n, (c, o) in ABLATIONS.items()]
  if "distill" in args.parts:
    out += [("probe", f"guidance_beta{b}", "configs/euphonium.py",
             dict(SDE_EVAL, **{"sampling.guidance.beta": b, "grpo.iterations": 1,
                               "grpo.eval_every": 1, "grpo.ckpt_every": 1}), 0)
            for b in GUIDANCE_BETAS]
    out += [("distill", "distill_off", "configs/euphonium.py", dict(DISTILL_GUIDANCE, **short),
             0)]
    out += [("distill", f"distill_d{d}_k{k}", "configs/euphonium.py",
             dict(DISTILL_GUIDANCE, **short, **{"grpo.distill_coef": d, "grpo.kl_coef": k}), 0)
            for d in DISTILL_COEFS for k in KL_COEFS]
    out += [("distill", n, "configs/euphonium.py", dict(DISTILL_GUIDANCE, **short, **o), 0)
            for n, o in DISTILL_FROZEN.items()]
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="/tmp/euph_convergence")
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "convergence"))
  p.add_argument("--records", default="",
                 help="the finished runs' records (read by the analysis; a recorded run is "
                      "not rerun); default experiments/results/convergence_runs "
                      "(convergence_quick_runs with --quick)")
  p.add_argument("--parts", default=",".join(PARTS),
                 help=f"comma-separated parts to run, of {', '.join(PARTS)}")
  p.add_argument("--analyse", action="store_true",
                 help="run nothing: tables and plot from the records (finished runs in "
                      "--workdir that have none are recorded first)")
  p.add_argument("--runs", default="",
                 help="comma-separated patterns (fnmatch) of the runs to do, by workdir name "
                      "(e.g. 'guidance_*,mix_grpo_seed1'): the rest of the parts' plan is "
                      "skipped (to fit a session's time); default: every run")
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--ablation_seeds", type=int, default=3)
  p.add_argument("--iterations", type=int, default=50,
                 help="the methods' budget (DanceGRPO still rises at 30 on 8 prompts x 8)")
  p.add_argument("--baseline_iterations", type=int, default=120,
                 help="DanceGRPO's budget in the methods part (0 = --iterations): the "
                      "thresholds are its plateau, and on 8 prompts x 8 its 3-seed mean still "
                      "rises at 80 iterations (0.577, 0.589, 0.599 at 70-80); a method that has not reached a threshold within "
                      "its own budget counts as never reaching it")
  p.add_argument("--ablation_iterations", type=int, default=0,
                 help="the budget of the ablations, distill and prm parts; 0 = --iterations "
                      "(Euphonium's reward falls after iteration 20-30, so a shorter budget "
                      "misses it; each run is paired with Euphonium's evaluations up to its "
                      "own last one)")
  p.add_argument("--reading", default="",
                 help="a Markdown file of the written reading of the results, put into the "
                      "report under '## Reading' before its tables")
  p.add_argument("--eval_every", type=int, default=3)
  p.add_argument("--eval_prompts", type=int, default=128)
  p.add_argument("--prompts", type=int, default=0,
                 help="grpo.prompts_per_iteration (and samples_per_update = prompts x 8) for "
                      "every run; 0 = the configs' own")
  p.add_argument("--jobs", type=int, default=1,
                 help="runs at a time, each pinned to its own share of the cores (the timing "
                      "part and PRM training always run alone)")
  p.add_argument("--timing_iterations", type=int, default=5)
  p.add_argument("--compilation_cache", default="",
                 help="JAX's persistent compilation cache for the runs (default: under "
                      "--workdir; JAX_COMPILATION_CACHE_DIR in the environment wins)")
  p.add_argument("--quick", action="store_true",
                 help="the five methods only, 1 seed, 6 iterations of 8 prompts x 8, "
                      "evaluation every 3 on 64 prompts, 2 runs at a time")
  args = p.parse_args()
  if args.quick:
    args.seeds, args.iterations, args.eval_every, args.eval_prompts = 1, 6, 3, 64
    args.ablation_iterations = args.baseline_iterations = 6
    args.prompts = args.prompts or 8
    args.jobs = max(args.jobs, min(2, len(os.sched_getaffinity(0))))
    args.parts = "methods"
    if args.out.endswith("convergence"):
      args.out += "_quick"
  args.ablation_iterations = args.ablation_iterations or args.iterations
  args.baseline_iterations = args.baseline_iterations or args.iterations
  args.records = args.records or os.path.join(
      REPO, "experiments", "results", "convergence_quick_runs" if args.quick else
      "convergence_runs")
  args.parts = tuple(x for x in args.parts.split(",") if x)
  for part in args.parts:
    if part not in PARTS:
      p.error(f"--parts: {part!r} is not one of {', '.join(PARTS)}")
  os.makedirs(args.workdir, exist_ok=True)
  command = "python experiments/convergence.py " + " ".join(sys.argv[1:])
  runs: dict[str, list[dict]] = {}

  def add(name, seed):
    r = read_run(os.path.join(args.workdir, f"{name}_seed{seed}"), args)
    if r is not None:
      runs.setdefault(name, []).append(dict(r, seed=seed))

  for c in _core_sets(args.jobs):
    _CORES.put(c)
  if "timing" in args.parts:
    run_timing(args)
  work = plan(args)  # with --analyse: finished workdirs recorded, nothing run
  wanted = lambda name, seed: not args.runs or any(
      fnmatch.fnmatch(f"{name}_seed{seed}", q) for q in args.runs.split(","))
  work = [w for w in work if wanted(w[1], w[4])]
  # A guidance probe that fails (a strength too large) is reported and left out, not fatal.
  run_many([(name, config, over, seed) for part, name, config, over, seed in work], args,
           fatal=lambda name: not name.startswith("guidance_beta"))
  # Distillation's best cell (highest final ODE reward at seed 0) and its reference at more
  # seeds (their seed 0 is the sweep's own run).
  sweep = {f"distill_d{d}_k{k}": (d, k) for d in DISTILL_COEFS for k in KL_COEFS}
  finals = {n: read_run(os.path.join(args.workdir, f"{n}_seed0"), args) for n in sweep}
  best = max(finals, key=lambda n: finals[n]["reward"][-1]) if all(finals.values()) else None
  if "distill" in args.parts and not args.analyse and best:
    d, k = sweep[best]
    short = dict(DISTILL_GUIDANCE, **{"grpo.iterations": args.ablation_iterations})
    more = range(1, args.ablation_seeds)
    run_many([("distill_best", "configs/euphonium.py",
               dict(short, **{"grpo.distill_coef": d, "grpo.kl_coef": k}), s)
              for s in more if wanted("distill_best", s)]
             + [("distill_off", "configs/euphonium.py", short, s)
                for s in more if wanted("distill_off", s)], args)
  prm_info = {}
  if "prm" in args.parts:
    for name, frac in PRM_FRACTIONS.items():
      if not args.analyse:
        prm = os.path.join(args.workdir, name, "prm", "final")
        todo = [s for s in range(args.ablation_seeds) if wanted(name, s)
                and (load_record(os.path.join(args.workdir, f"{name}_seed{s}"), args) or
                    {"iterations": -1})["iterations"] < args.ablation_iterations]
        if todo or (prm_quality(name, args) is None and any(
            wanted(name, s) for s in range(args.ablation_seeds))):  # train it only if needed
          prm = train_prm(name, frac, args)
        run_many([(name, "configs/euphonium.py",
                   {"init.prm": prm, "grpo.iterations": args.ablation_iterations}, s)
                  for s in todo], args)

  # Read every finished run in the workdir (parts run earlier included).
  names = list(METHODS) + list(ABLATIONS) + DISTILL_RUNS + list(PRM_FRACTIONS)
  for name in names:
    for s in range(max(args.seeds, args.ablation_seeds)):
      add(name, s)
  if best:  # the best cell's seed 0 is the sweep's run of it
    runs["distill_best"] = [dict(finals[best], seed=0, cell=best)] + runs.get("distill_best", [])
  for name, frac in [("shipped", 1)] + list(PRM_FRACTIONS.items()):
    rep = prm_quality(name, args)
    if rep is not None:
      prm_info[name] = _spearman_summary(rep, frac)
  timing = {}
  for name in METHODS:
    r = read_run(os.path.join(args.workdir, f"timing_{name}"), args)
    if r is not None:
      timing[name] = r["seconds_per_iteration"]
  probes = {}
  for b in GUIDANCE_BETAS:
    r = read_run(os.path.join(args.workdir, f"guidance_beta{b}_seed0"), args)
    if r is not None:
      probes[b] = r
  text = analyse(runs, args, command, prm_info, timing, probes)
  if args.reading:
    with open(args.reading) as f:
      reading = f.read().strip()
    head, sep, tables = text.partition("\n## ")
    text = f"{head}\n## Reading\n\n{reading}\n{sep}{tables}"
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".md", "w") as f:
    f.write(text + f"\n![curves]({os.path.basename(args.out)}.png)\n")
  if BASELINE in runs:
    plot(runs, args.out + ".png")
  print(text)


def _spearman_summary(rep: dict, fraction: int) -> dict:
  """The prm report's Spearman per t bucket -> mean over buckets with t <= 0.5 and overall."""
  rows = [(float(b["t_hi"]), float(b["spearman"])) for b in rep["correlation"]["per_bucket"]]
  return {"prompts": f"1/{fraction}" if fraction > 1 else "all",
          "guidance_z": float(rep["guidance_check"]["grad_minus_random"]["z"]),
          "spearman_low_t": float(np.mean([s for hi, s in rows if hi <= 0.5])),
          "spearman_all": float(np.mean([s for _, s in rows]))}


if __name__ == "__main__":
  main()
