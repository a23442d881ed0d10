"""experiments/convergence.py's analysis on synthetic curves with known answers."""
import importlib.util
import json
import os
import shutil
import types

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "convergence", os.path.join(REPO, "experiments", "convergence.py"))
conv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(conv)

STEPS = np.arange(0, 31, 3, dtype=float)  # 11 evaluations


def run(curve, spi=10.0, **extra):
  curve = np.asarray(curve, float)
  return dict(steps=STEPS, reward=curve, stderr=np.full_like(curve, 0.01),
              seconds_per_iteration=spi, **extra)


def saturating(rate, top=0.5, start=0.4):
  return start + (top - start) * (1 - np.exp(-rate * STEPS))


def test_steps_to_interpolates_and_never():
  assert conv.steps_to(STEPS, STEPS / 30, 0.5) == pytest.approx(15.0)
  assert conv.steps_to(STEPS, STEPS / 30, 0.55) == pytest.approx(16.5)
  assert conv.steps_to(STEPS, STEPS / 30, 0.0) == 0.0
  assert np.isinf(conv.steps_to(STEPS, STEPS / 30, 2.0))


def test_thresholds_and_speedup_of_a_curve_twice_as_fast():
  base = np.stack([saturating(0.1) + e for e in (-0.002, 0.0, 0.002)])
  fast = np.stack([saturating(0.2) + e for e in (-0.002, 0.0, 0.002)])
  top = 0.4 + 0.1 * (1 - np.exp(-0.1 * STEPS))
  assert conv.final_threshold(base) == pytest.approx(top[-1])
  assert conv.plateau_threshold(base) == pytest.approx(top[-3:].mean())
  sb, sm, ratio = conv.speedup(fast, base, STEPS, conv.plateau_threshold)
  # the plateau threshold is below the final value, so the baseline reaches it before 30
  assert sb < 30 and ratio == pytest.approx(2.0, rel=0.06)
  lo, hi, never = conv.bootstrap_speedup(fast, base, STEPS, conv.plateau_threshold, n=500)
  assert lo <= ratio <= hi and never == 0.0
  slow = base - 0.05  # never reaches
  assert conv.speedup(slow, base, STEPS, conv.final_threshold)[2] == 0.0
  # 90% of the gain from the start (0.4) to the plateau; the exponential curve reaches it at
  # t = -ln(1 - 0.9 g) / rate (g = the plateau's share of the asymptote's gain): twice as fast
  g = (top[-3:].mean() - 0.4) / 0.1
  assert conv.gain90_threshold(base) == pytest.approx(0.4 + 0.9 * 0.1 * g)
  sb, sm, ratio = conv.speedup(fast, base, STEPS, conv.gain90_threshold)
  assert sb == pytest.approx(-np.log(1 - 0.9 * g) / 0.1, abs=0.5)
  assert ratio == pytest.approx(2.0, rel=0.06)


def test_paired_differences_are_seed_by_seed():
  ref = [run(saturating(0.1) + e) for e in (0.0, 0.03, -0.03)]
  abl = [run(r["reward"] - 0.01) for r in ref]  # 0.01 below its own seed, every seed
  mean, se, n = conv.paired(abl, ref)
  assert mean == pytest.approx(-0.01) and se == pytest.approx(0.0, abs=1e-12) and n == 3
  # unpaired, the seed spread (0.03) would swamp the difference; paired it does not
  assert conv.paired(abl, ref, at=None)[0] == pytest.approx(-0.01)
  # runs carrying their seed are matched by it, not by position (a seed missing in between)
  ref = [dict(r, seed=i) for i, r in enumerate(ref)]
  abl = [dict(abl[0], seed=0), dict(abl[2], seed=2)]
  assert conv.paired(abl, ref)[0] == pytest.approx(-0.01) and conv.paired(abl, ref)[2] == 2
  assert conv.paired(abl[::-1], ref)[1] == pytest.approx(0.0, abs=1e-12)


def test_analyse_writes_every_table():
  runs = {
      "euphonium": [run(saturating(0.3) + e, 12.0, sde_guided=saturating(0.3) + 0.05 + e,
                        sde_unguided=saturating(0.3) + 0.01 + e,
                        train_reward=0.4 + 0.01 * np.arange(30) + e,
                        process_reward=0.6 + 0.01 * np.arange(30))
                    for e in (-0.01, 0, 0.01)],
      "dance_grpo": [run(saturating(0.1) + e) for e in (-0.01, 0, 0.01)],
      "flow_grpo": [run(saturating(0.05) + e, 9.0) for e in (-0.01, 0, 0.01)],
      "guidance_off_dual": [run(saturating(0.3) - 0.02 + e, 11.0) for e in (-0.01, 0, 0.01)],
      "distill_d0.1_k0.1": [run(saturating(0.3), 13.0, sde_guided=saturating(0.3) + 0.03,
                                sde_unguided=saturating(0.3) + 0.02)],
  }
  args = types.SimpleNamespace(eval_prompts=128, prompts=8, jobs=2, timing_iterations=5)
  info = {"shipped": {"prompts": "all", "spearman_low_t": 0.65, "spearman_all": 0.66,
                      "guidance_z": 13.3}}
  text = conv.analyse(runs, args, "cmd", info)
  for needle in ("## Methods", "| euphonium | plateau |", "| euphonium | final |",
                 "| euphonium | 90% of gain |",
                 "| guidance_off_dual | 3 |", "-0.0200 +- 0.0000", "## Distillation",
                 "| 30 |", "+0.0400 +- 0.0000", "Slope over iterations 21-30", "| distill_d0.1_k0.1 | 0.1 | 0.1 |",
                 "## PRM quality", "| shipped | all | 0.650 |", "flattened",
                 # first 5 iterations 0.42, last 5 0.67 (SE 0.01 / sqrt 3); the PRM score
                 "| euphonium | 3 | 0.4200 +- 0.0058 | 0.6700 +- 0.0058 | 0.6200 +- 0.0000 | "
                 "0.8700 +- 0.0000 |"):
    assert needle in text, needle
  # wall-time speed-up = steps ratio x (10 s / 12 s)
  line = next(l for l in text.splitlines() if l.startswith("| euphonium | final |"))
  cells = [c.strip() for c in line.split("|")]
  steps_ratio = float(cells[5].split()[0])
  assert float(cells[8].split()[0]) == pytest.approx(steps_ratio * 10 / 12, abs=0.01)
  assert "from the runs themselves" in text and "2 runs at a time" in text
  # iteration times of timing runs (alone on the machine) replace the runs' own
  text = conv.analyse(runs, args, "cmd", info, timing={"euphonium": 6.0, "dance_grpo": 4.0,
                                                       "flow_grpo": 5.0})
  assert "from each method's timing run" in text and "undefined" not in text
  # a baseline that got worse: its thresholds lie below the start, the speed-ups are undefined
  worse = dict(runs, dance_grpo=[run(saturating(0.1)[::-1] - 0.2 + e) for e in (-0.01, 0, 0.01)])
  assert "did not improve" in conv.analyse(worse, args, "cmd", info)
  line = next(l for l in text.splitlines() if l.startswith("| euphonium | final |"))
  cells = [c.strip() for c in line.split("|")]
  assert float(cells[8].split()[0]) == pytest.approx(float(cells[5].split()[0]) * 4 / 6,
                                                     abs=0.01)


def _stage(cmd, calls):
  """The grpo stage's run, as the study sees it: a finished workdir at the asked budget."""
  calls.append(cmd)
  wd = __import__("pathlib").Path(cmd[cmd.index("--workdir") + 1])
  n = int(next(c for c in cmd if c.startswith("--config.grpo.iterations=")).split("=")[1])
  shutil.rmtree(wd / "grpo" / "final", ignore_errors=True)
  _finish(wd, n, {0: 0.42, n: 0.5})


def test_a_finished_run_is_skipped_or_extended(tmp_path, monkeypatch):
  final = tmp_path / "run" / "grpo" / "final"
  final.mkdir(parents=True)
  (final / "DONE").write_text("")
  (final / "info.json").write_text('{"iterations": 30}')
  calls = []
  monkeypatch.setattr(conv, "_call", lambda cmd, *a, **k: _stage(cmd, calls))
  args = types.SimpleNamespace(prompts=8, workdir=str(tmp_path), records=str(tmp_path / "rec"),
                               jobs=1)
  (tmp_path / "run" / "metrics.jsonl").write_text("")
  for n in (20, 30):  # the same or a smaller budget: finished, nothing runs
    conv._run_grpo("configs/euphonium.py", str(tmp_path / "run"), {"grpo.iterations": n}, "x",
                   args)
  assert calls == [] and (final / "DONE").exists()
  # a larger budget: the final model moves aside and the stage runs again (it resumes)
  conv._run_grpo("configs/euphonium.py", str(tmp_path / "run"), {"grpo.iterations": 50}, "x",
                 args)
  assert len(calls) == 1 and "--config.grpo.iterations=50" in calls[0]
  assert (final.parent / "final_30" / "DONE").exists()


def test_a_shorter_ablation_budget_is_paired_at_the_same_iteration():
  short = lambda r: dict(r, steps=r["steps"][:6], reward=r["reward"][:6],
                         stderr=r["stderr"][:6])  # 15 of the methods' 30 iterations
  eu = [run(saturating(0.3) + e, 12.0) for e in (-0.01, 0, 0.01)]
  runs = {"euphonium": eu, "dance_grpo": [run(saturating(0.1) + e) for e in (-0.01, 0, 0.01)],
          # 0.02 below Euphonium's seed at every evaluation, up to iteration 15
          "guidance_off_dual": [short(run(r["reward"] - 0.02, 11.0)) for r in eu],
          "prm_half": [short(run(r["reward"] + 0.01, 12.0)) for r in eu]}
  args = types.SimpleNamespace(eval_prompts=128, prompts=8, jobs=2, timing_iterations=5)
  info = {n: {"prompts": p, "spearman_low_t": 0.6, "spearman_all": 0.6, "guidance_z": 10.0}
          for n, p in (("shipped", "all"), ("prm_half", "1/2"))}
  text = conv.analyse(runs, args, "cmd", info)
  line = next(l for l in text.splitlines() if l.startswith("| guidance_off_dual |"))
  cells = [c.strip() for c in line.split("|")]
  assert cells[3] == "15" and cells[5] == cells[6] == "-0.0200 +- 0.0000"
  assert float(cells[4]) == pytest.approx(np.mean([r["reward"][5] for r in eu]) - 0.02, abs=1e-4)
  # the PRM rows share the shortest budget: the shipped PRM's runs are cut to 15 as well
  rows = [l for l in text.splitlines() if l.startswith(("| shipped | all", "| prm_half | 1/2"))]
  assert len(rows) == 2 and all(l.split("|")[7].strip() == "15" for l in rows)
  # peak (at its iteration) and mean of the seed-mean curve over the shared budget
  cells = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")] for l in rows}
  mean_eu = np.mean([r["reward"][:6] for r in eu], 0)
  peak = f"{mean_eu.max() + 0.01:.4f} ({int(STEPS[mean_eu.argmax()])})"
  assert cells["prm_half"][8] == peak
  assert float(cells["prm_half"][9]) == pytest.approx(mean_eu.mean() + 0.01, abs=1e-4)
  assert float(cells["shipped"][9]) == pytest.approx(mean_eu.mean(), abs=1e-4)
  # a method with a shorter budget than the baseline's: it has not reached the plateau
  # threshold (the baseline's curve reaches it after 15), so never within its budget
  cut = dict(runs, flow_grpo=[short(run(saturating(0.1) + e, 9.0)) for e in (-0.01, 0, 0.01)])
  text = conv.analyse(cut, args, "cmd", info)
  line = next(l for l in text.splitlines() if l.startswith("| flow_grpo | 3 |"))
  cells = [c.strip() for c in line.split("|")]
  assert cells[3] == "15" and cells[6].startswith("never")
  # the bound: a reach after its 15 iterations would be a speed-up below steps_b / 15
  line = next(l for l in text.splitlines() if l.startswith("| flow_grpo | plateau |"))
  sb = conv.steps_to(STEPS, np.mean([r["reward"] for r in runs["dance_grpo"]], 0),
                     conv.plateau_threshold(conv._curves(runs["dance_grpo"])))
  assert f"never in 15 (would be < {sb / 15:.2f}x)" in line and sb > 15
  # DanceGRPO's seeds at different budgets: analysed to the shortest, and said so
  mixed = dict(runs, dance_grpo=[short(runs["dance_grpo"][0])] + runs["dance_grpo"][1:])
  text = conv.analyse(mixed, args, "cmd", info)
  assert "budgets differ (15, 30, 30 iterations): all are analysed to the shortest, 15" in text
  assert "| dance_grpo | 3 | 15 |" in text and "| euphonium | 3 | 15 |" in text
  conv.plot(mixed, "/dev/null")
  # a method whose evaluations are not a prefix of the baseline's is refused
  bad = dict(runs, flow_grpo=[dict(run(saturating(0.1)), steps=STEPS + 1)])
  with pytest.raises(ValueError, match="flow_grpo"):
    conv.analyse(bad, args, "cmd", info)


def _finish(workdir, iterations, evals):
  """A finished grpo-stage workdir, as the stage leaves it: final/DONE, info, metrics rows."""
  final = workdir / "grpo" / "final"
  final.mkdir(parents=True)
  (final / "DONE").write_text("")
  (final / "info.json").write_text(f'{{"iterations": {iterations}}}')
  rows = [{"stage": "grpo", "step": i + 1, "time": 1.0, "rollout_seconds": 2.0,
           "update_seconds": 1.0, "reward/shapes_fidelity": 0.4 + 0.01 * i,
           "process_reward": 0.6 - 0.01 * i} for i in range(iterations)]
  for step, r in evals.items():
    row = {"stage": "grpo", "step": step, "eval_reward": r, "eval_stderr": 0.02}
    if step:
      rows[step - 1].update(row)
    else:
      rows.insert(0, row)
  rows.append({"stage": "prm", "step": 1, "loss": 3.0})  # another stage's row: not recorded
  (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_a_recorded_run_outlives_its_workdir(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(conv, "_call", lambda cmd, *a, **k: _stage(cmd, calls))
  args = types.SimpleNamespace(prompts=8, workdir=str(tmp_path / "w"), records=str(tmp_path / "rec"),
                               jobs=2)
  wd = tmp_path / "w" / "euphonium_seed0"
  over = {"seed": 0, "grpo.iterations": 10, "init.prm": str(tmp_path / "w" / "p" / "final")}
  _finish(wd, 10, {0: 0.42, 5: 0.45, 10: 0.4812345678})
  conv._run_grpo("configs/euphonium.py", str(wd), over, "x", args)  # finished: recorded only
  assert calls == []
  rec = json.loads((tmp_path / "rec" / "euphonium_seed0.json").read_text())
  assert rec["iterations"] == 10 and len(rec["rows"]) == 11
  assert "$WORKDIR/p/final" in " ".join(rec["overrides"])  # portable across machines
  assert all("time" not in r for r in rec["rows"])
  # the workdir is gone (a new machine, another workdir): the record stands for the run
  shutil.rmtree(tmp_path / "w")
  args.workdir = str(tmp_path / "w2")
  over["init.prm"] = str(tmp_path / "w2" / "p" / "final")
  conv._run_grpo("configs/euphonium.py", args.workdir + "/euphonium_seed0", over, "x", args)
  assert calls == []
  r = conv.read_run(args.workdir + "/euphonium_seed0", args)
  np.testing.assert_array_equal(r["steps"], [0, 5, 10])
  np.testing.assert_allclose(r["reward"], [0.42, 0.45, 0.4812346], atol=1e-9)
  np.testing.assert_allclose(r["train_reward"], 0.4 + 0.01 * np.arange(10), atol=1e-7)
  np.testing.assert_allclose(r["process_reward"], 0.6 - 0.01 * np.arange(10), atol=1e-7)
  assert r["seconds_per_iteration"] == 3.0 and "cores" in r["machine"]
  # other settings for the same run name: refused, naming the record and the difference
  with pytest.raises(SystemExit, match=r"euphonium_seed0.json.*seed=1"):
    conv._run_grpo("configs/euphonium.py", args.workdir + "/euphonium_seed0",
                   dict(over, seed=1), "x", args)
  # a larger budget with no checkpoints to extend: rerun from the start
  conv._run_grpo("configs/euphonium.py", args.workdir + "/euphonium_seed0",
                 dict(over, **{"grpo.iterations": 20}), "x", args)
  assert len(calls) == 1 and "--config.grpo.iterations=20" in calls[0]
  assert json.loads((tmp_path / "rec" / "euphonium_seed0.json").read_text())["iterations"] == 20


def test_the_guidance_probe_table():
  eu = [run(saturating(0.3), 12.0, sde_guided=saturating(0.3) + 0.001,
            sde_unguided=saturating(0.3))]
  probe = dict(steps=np.array([0.0, 1.0]), reward=np.array([0.4, 0.41]),
               stderr=np.array([0.02, 0.02]), seconds_per_iteration=12.0,
               sde_guided=np.array([0.45, 0.46]), sde_unguided=np.array([0.4, 0.41]))
  runs = {"euphonium": eu, "dance_grpo": [run(saturating(0.1))]}
  args = types.SimpleNamespace(eval_prompts=128, prompts=8, jobs=2, timing_iterations=5)
  text = conv.analyse(runs, args, "cmd", {}, None, {0.02: probe})
  assert "| 0.5 (Euphonium) | 1x | 0.4010 | 0.4000 | +0.0010 |" in text
  assert "| 0.02 | 25x | 0.4500 | 0.4000 | +0.0500 |" in text


def test_the_distillation_tables_pair_the_best_cell_with_its_reference(tmp_path):
  sde = lambda c, gap, e: dict(sde_guided=c + gap + e, sde_unguided=c + e)
  eu = [dict(run(saturating(0.3) + e, 12.0, **sde(saturating(0.3), 0.0, e)), seed=i)
        for i, e in enumerate((-0.01, 0, 0.01))]
  # reference: a gap of 0.04 that stays; best cell: ODE and unguided 0.03 above, gap 0.01
  off = [dict(run(saturating(0.2) + e, 12.0, **sde(saturating(0.2), 0.04, e)), seed=i)
         for i, e in enumerate((-0.01, 0, 0.01))]
  best = [dict(run(saturating(0.2) + 0.03 + e, 13.0, **sde(saturating(0.2) + 0.03, 0.01, e)),
               seed=i) for i, e in enumerate((-0.01, 0, 0.01))]
  best[0]["cell"] = "distill_d0.3_k0.1"
  runs = {"euphonium": eu, "dance_grpo": [run(saturating(0.1) + e) for e in (-0.01, 0, 0.01)],
          "distill_off": off, "distill_d0.3_k0.1": best[:1], "distill_best": best,
          "process_pre": [dict(r, seed=r["seed"]) for r in eu]}
  args = types.SimpleNamespace(eval_prompts=128, prompts=8, jobs=2, timing_iterations=5)
  text = conv.analyse(runs, args, "cmd", {})
  assert f"### Explicit distillation at guidance beta {conv.DISTILL_BETA:g}" in text
  assert "| distill_off seed 0 | 0 | 0 |" in text and "| distill_d0.3_k0.1 | 0.3 | 0.1 |" in text
  assert "The best cell (distill_d0.3_k0.1" in text
  for label in ("final ODE reward", "final unguided SDE reward"):
    line = next(l for l in text.splitlines() if l.startswith(f"| {label} |"))
    assert line.endswith("| +0.0300 +- 0.0000 |"), line
  line = next(l for l in text.splitlines() if l.startswith("| final gap guided - unguided |"))
  assert "+0.0100 +- 0.0000" in line and "+0.0400 +- 0.0000" in line
  # beta differs from Euphonium's: the best cell is not an ablation of Euphonium
  assert "| process_pre | 3 |" in text and "| distill_best |" not in text
  conv.plot(runs, str(tmp_path / "p.png"))  # five panels on two rows
  assert (tmp_path / "p.png").stat().st_size > 10_000


def test_the_baseline_slope_over_the_last_third():
  # 0.002 per iteration on iterations 21-30 (flat before), every seed: +0.0200 per 10
  runs = {"dance_grpo": [run(0.45 + e + 0.002 * np.maximum(STEPS - 21, 0))
                         for e in (-0.01, 0, 0.01)]}
  args = types.SimpleNamespace(eval_prompts=128, prompts=8, jobs=2, timing_iterations=5)
  text = conv.analyse(runs, args, "cmd", {})
  assert "(each seed's least-squares line, per 10 iterations): +0.0200 +- 0.0000 over 3 seeds" in text


def test_the_early_table_is_steps_to_the_baselines_reward_at_the_early_budget(monkeypatch):
  monkeypatch.setattr(conv, "EARLY_AT", 9)
  line = lambda slope, e=0.0: 0.4 + slope * STEPS + e
  runs = {"dance_grpo": [run(line(0.01, e)) for e in (-0.01, 0, 0.01)],
          "euphonium": [run(line(0.02, e)) for e in (-0.01, 0, 0.01)],  # twice as fast
          # rises 4x as fast, then falls: its peak is at 6
          "guidance_off_dual": [run(np.minimum(line(0.04), 0.64 - 0.02 * (STEPS - 6)) + e)
                                for e in (-0.01, 0.01)]}
  args = types.SimpleNamespace(eval_prompts=128, prompts=8, jobs=2, timing_iterations=5)
  text = conv.analyse(runs, args, "cmd", {})
  assert "DanceGRPO's seed-mean reward at iteration 9 = 0.4900" in text
  rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")]
          for l in text.split("## Early")[1].split("##")[0].splitlines() if l.startswith("| ")}
  assert rows["euphonium"][3] == "0.5800 +- 0.0058" and rows["euphonium"][4] == "4.5"
  assert rows["euphonium"][5].startswith("2.00 (") and rows["euphonium"][7] == "1.0000 (30)"
  assert rows["dance_grpo"][5] == "(the baseline)"
  assert rows["guidance_off_dual"][4] == "2.2" and rows["guidance_off_dual"][5].startswith("4.00")
  assert rows["guidance_off_dual"][7] == "0.6400 (6)"
