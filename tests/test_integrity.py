"""Nothing silently wrong (issue 13): finite updates and saves, verified checkpoints, one run
per workdir, clean metrics and the provenance of every run. Unit tests on tiny pytrees."""

import json
import os
import signal
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from euphonium_jax import checkpoint, main, report, training, workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_params():
  return {"w": jnp.arange(6.0).reshape(2, 3) / 10, "b": jnp.ones((3,))}


# ----------------------------------------------------------------- 1. guarded updates


@pytest.mark.parametrize("kwargs", [dict(b1=1.0), dict(b2=1.0), dict(lr=float("inf"))])
def test_update_that_makes_nonfinite_params_is_skipped(kwargs):
  """Finite loss and gradients, but the optimiser itself yields NaN/inf: nothing changes."""
  tx = training.optimizer(**{**dict(lr=1e-2, warmup_steps=0, weight_decay=0.0,
                                    grad_clip=0.0), **kwargs})
  params = tiny_params()
  opt = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  new_p, new_o, ok = jax.jit(training.guarded_update, static_argnums=0)(
      tx, grads, jnp.float32(1.0), params, opt)
  assert not bool(ok)
  for a, b in zip(jax.tree.leaves((params, opt)), jax.tree.leaves((new_p, new_o))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_guarded_update_applies_a_finite_step_and_skips_a_corrupt_moment():
  tx = training.optimizer(1e-2, 0, 0.0, 0.0)
  params, grads = tiny_params(), jax.tree.map(jnp.ones_like, tiny_params())
  opt = tx.init(params)
  new_p, _, ok = training.guarded_update(tx, grads, jnp.float32(1.0), params, opt)
  want = optax.apply_updates(params, tx.update(grads, opt, params)[0])
  assert bool(ok)
  np.testing.assert_array_equal(np.asarray(new_p["w"]), np.asarray(want["w"]))
  bad_opt = jax.tree.map(lambda x: x.at[0].set(jnp.nan) if x.ndim == 1 else x, opt)
  same, _, ok = training.guarded_update(tx, grads, jnp.float32(1.0), params, bad_opt)
  assert not bool(ok)
  np.testing.assert_array_equal(np.asarray(same["b"]), np.asarray(params["b"]))


def test_guard_is_inside_the_step_no_host_callback():
  tx = training.optimizer(1e-2, 0, 0.0, 1.0)
  params = tiny_params()
  hlo = jax.jit(training.guarded_update, static_argnums=0).lower(
      tx, params, jnp.float32(0.0), params, tx.init(params)).as_text()
  assert "is_finite" in hlo and "callback" not in hlo.lower()


def tiny_state(seed=0, n=96):
  rng = np.random.default_rng(seed)
  return {"params": {"w": jnp.asarray(rng.normal(size=(n, n)), jnp.float32),
                     "b": jnp.asarray(rng.normal(size=(n,)), jnp.float32)},
          "step": jnp.asarray(seed, jnp.int32)}


def test_save_refuses_nonfinite_state(tmp_path):
  mgr = checkpoint.manager(str(tmp_path / "ck"))
  state = tiny_state()
  state["params"]["b"] = state["params"]["b"].at[3].set(jnp.inf)
  with pytest.raises(FloatingPointError, match=r"step 1 .*\['params'\]\['b'\]"):
    checkpoint.save(mgr, 1, state)
  assert mgr.latest_step() is None
  with pytest.raises(FloatingPointError, match=r"final arrays.*\['b'\]"):
    checkpoint.save_final(str(tmp_path / "final"), state["params"], {})
  assert not checkpoint.is_done(str(tmp_path / "final"))


# ---------------------------------------------------------------- 2. checkpoint digests


def _saved(tmp_path, steps=(1, 2, 3)):
  mgr = checkpoint.manager(str(tmp_path / "stage" / "checkpoints"))
  for s in steps:
    checkpoint.save(mgr, s, tiny_state(s))
  return mgr


def _largest_data_file(mgr, step):
  files = [os.path.join(r, n) for r, _, ns in os.walk(checkpoint.step_dir(mgr, step))
           for n in ns if "ocdbt.process" in r]
  return max(files, key=os.path.getsize)


def _corrupt(path):
  with open(path, "r+b") as f:
    f.seek(min(512, os.path.getsize(path) - 4096))
    f.write(np.random.default_rng(0).bytes(4096))


def _damage(kind, path):
  if kind == "corrupt":
    _corrupt(path)
  elif kind == "truncate":
    os.truncate(path, os.path.getsize(path) // 2)
  else:
    os.remove(path)


@pytest.mark.parametrize("kind,says", [("corrupt", "sha256 mismatch"),
                                       ("truncate", "truncated"), ("delete", "is missing")])
def test_damaged_checkpoint_is_named_and_previous_used(tmp_path, capsys, kind, says):
  mgr = _saved(tmp_path)
  bad = _largest_data_file(mgr, 3)
  assert os.path.getsize(bad) > 4096 + 512  # the array's data, not metadata
  _damage(kind, bad)
  assert training.last_good_checkpoint(mgr) == 2
  abstract = checkpoint.abstract_like(tiny_state())
  step, state = checkpoint.restore_latest(mgr, abstract)
  out = capsys.readouterr().out
  assert step == 2 and os.path.basename(bad) in out and says in out and "using step 2" in out
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]),
                                np.asarray(tiny_state(2)["params"]["w"]))
  assert mgr.all_steps() == [2]
  assert os.listdir(tmp_path / "stage" / "damaged_checkpoints")[0].startswith("3-")
  checkpoint.save(mgr, 3, tiny_state(3))  # the step can be saved again
  assert checkpoint.restore_latest(mgr, abstract)[0] == 3


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
  mgr = _saved(tmp_path, steps=(1, 2))
  _corrupt(_largest_data_file(mgr, 2))
  os.remove(os.path.join(checkpoint.step_dir(mgr, 1), checkpoint.INTEGRITY))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"no intact checkpoint.*step 2: .*\(sha256 mismatch\); step 1: "
                           r"integrity.json is missing"):
    checkpoint.restore_latest(mgr, checkpoint.abstract_like(tiny_state()))
  assert training.last_good_checkpoint(mgr) is None
  assert mgr.all_steps() == [1, 2]  # nothing moved: the user decides


def test_resume_with_another_state_layout_names_the_setting(tmp_path):
  """Item 8: kl_coef switched 0 -> 0.01 (the state gains 'ref'), EMA switched off (it loses
  'ema'), a parameter of another shape: one CheckpointError naming arrays and settings."""
  from euphonium_jax.stages import grpo as grpo_stage
  mgr = _saved(tmp_path, steps=(1,))
  with_ref = {**tiny_state(), "ref": tiny_state()["params"]}
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"lacks: 2 under 'ref'.*grpo.kl_coef > 0.*new workdir"):
    checkpoint.restore_latest(mgr, checkpoint.abstract_like(with_ref),
                              grpo_stage.LAYOUT_HINTS)
  grown = tiny_state()
  grown["params"]["b"] = jnp.zeros((5,))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"\['params'\]\['b'\] was saved as float32\(96,\), this run builds "
                           r"float32\(5,\)"):
    checkpoint.restore_latest(mgr, checkpoint.abstract_like(grown), grpo_stage.LAYOUT_HINTS)
  mgr2 = checkpoint.manager(str(tmp_path / "other" / "checkpoints"))
  checkpoint.save(mgr2, 1, {**tiny_state(), "ema": tiny_state()["params"]})
  with pytest.raises(checkpoint.CheckpointError, match=r"does not build: 2 under 'ema'.*"
                                                       r"grpo.ema_decay > 0"):
    checkpoint.restore_latest(mgr2, checkpoint.abstract_like(tiny_state()),
                              grpo_stage.LAYOUT_HINTS)
  step, state = checkpoint.restore_latest(mgr, checkpoint.abstract_like(tiny_state()))
  assert step == 1 and int(state["step"]) == 1


def test_digest_survives_restore_and_later_saves(tmp_path):
  mgr = _saved(tmp_path, steps=(1, 2))
  checkpoint.restore_latest(mgr, None)
  checkpoint.save(mgr, 3, tiny_state(3))
  assert checkpoint.verify(checkpoint.step_dir(mgr, 2)) is None
  assert checkpoint.verify(checkpoint.step_dir(mgr, 3)) is None


def test_final_arrays_are_verified(tmp_path):
  final = str(tmp_path / "final")
  checkpoint.save_final(final, tiny_state()["params"], {"a": 1}, config_json='{"seed": 7}')
  with open(os.path.join(final, "config.json")) as f:
    assert json.load(f) == {"seed": 7}
  np.testing.assert_array_equal(checkpoint.load_final(final)["w"],
                                np.asarray(tiny_state()["params"]["w"]))
  files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(final, "arrays"))
           for n in ns if "ocdbt.process" in r]
  _corrupt(max(files, key=os.path.getsize))
  with pytest.raises(checkpoint.CheckpointError, match=r"arrays is damaged: .*sha256"):
    checkpoint.load_final(final)


# ---------------------------------------------------------------------- 3. workdir lock


def test_second_run_is_refused_naming_the_first(tmp_path):
  d = str(tmp_path)
  with workdir.lock(d):
    with pytest.raises(workdir.WorkdirInUse,
                       match=rf"in use by another run: pid {os.getpid()} on .*, started 20"):
      workdir.acquire(d)
    c = main.config_lib.from_file(os.path.join(REPO, "configs", "tiny.py"))
    with pytest.raises(workdir.WorkdirInUse):
      main.run(c, d)
  workdir.acquire(d).release()  # released: free again


def test_killed_holder_does_not_block(tmp_path):
  d = str(tmp_path)
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from euphonium_jax import workdir; "
       "workdir.acquire(sys.argv[1]); print('held', flush=True); time.sleep(60)", d],
      stdout=subprocess.PIPE, text=True, cwd=REPO)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir.WorkdirInUse, match=f"pid {holder.pid} "):
      workdir.acquire(d)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  workdir.acquire(d).release()


def test_lock_without_flock_uses_the_record(tmp_path, monkeypatch):
  """A filesystem without flock: a dead holder on this host is stale, a live one blocks, the
  same run id shares."""
  def no_flock(fd, op):
    raise OSError(38, "Function not implemented")
  monkeypatch.setattr(workdir.fcntl, "flock", no_flock)
  d = str(tmp_path)
  path = os.path.join(d, workdir.LOCK)
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  with open(path, "w") as f:
    json.dump({"pid": int(dead), "host": workdir.socket.gethostname()}, f)
  held = workdir.acquire(d)  # stale
  with pytest.raises(workdir.WorkdirInUse, match=f"pid {os.getpid()}"):
    workdir.acquire(d)
  with open(path, "w") as f:
    json.dump({"pid": 1, "host": "node-7", "run_id": "job-42"}, f)
  monkeypatch.setenv("EUPHONIUM_RUN_ID", "job-42")
  workdir.acquire(d).release()  # the same multi-host run
  held.release()


# ---------------------------------------------------------------------- 5. metrics.jsonl


def test_torn_last_line_is_dropped_with_a_warning(tmp_path):
  d = str(tmp_path)
  path = os.path.join(d, "metrics.jsonl")
  with open(path, "w") as f:
    f.write(json.dumps({"stage": "s", "step": 1, "loss": 0.5}) + "\n" + '{"stage": "s", "st')
  with pytest.warns(UserWarning, match="metrics.jsonl: dropping a torn last line"):
    assert [r["step"] for r in report.read_metrics(d)] == [1]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    w = report.MetricWriter(d, "s")
  w.write(2, {"loss": 0.25})
  w.close()
  with open(path) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]


def test_resumed_run_leaves_each_row_once(tmp_path):
  """An interrupted run logged steps 1..5 (checkpoint at 2); the resumed run logs 3..5 again:
  each step once, the newer values; another stage's rows untouched."""
  d = str(tmp_path)
  w = report.MetricWriter(d, "s")
  other = report.MetricWriter(d, "t")
  for step in range(1, 6):
    w.write(step, {"loss": step})
    other.write(step, {"x": step})
  w.write(5, {"eval": 1.0})
  w.close()
  other.close()
  w = report.MetricWriter(d, "s")
  for step in (3, 4):
    w.write(step, {"loss": 10 * step})
  w.close()
  rows = report.read_metrics(d, "s")
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1), (2, 2), (3, 30), (4, 40)]
  assert [r["step"] for r in report.read_metrics(d, "t")] == [1, 2, 3, 4, 5]
  w = report.MetricWriter(d, "s", resume_step=2)  # explicit: rows past 2 go at once
  w.close()
  assert [r["step"] for r in report.read_metrics(d, "s")] == [1, 2]


def test_nonfinite_values_are_valid_json(tmp_path):
  d = str(tmp_path)
  w = report.MetricWriter(d, "s")
  w.write(1, {"loss": float("nan"), "grad_norm": np.float32(np.inf), "lr": 0.1})
  w.close()

  def strict(c):
    raise ValueError(c)
  with open(os.path.join(d, "metrics.jsonl")) as f:
    row = json.loads(f.readline(), parse_constant=strict)
  assert row["loss"] is None and row["nonfinite_values"] == {"loss": "nan", "grad_norm": "inf"}
  back = report.read_metrics(d, "s")[0]
  assert np.isnan(back["loss"]) and back["grad_norm"] == np.inf and back["lr"] == 0.1


# ------------------------------------------------------------------------ 9. provenance


def test_rerun_that_skips_everything_keeps_config_and_records_the_run(tmp_path):
  d = str(tmp_path)
  c = main.config_lib.from_file(os.path.join(REPO, "configs", "tiny.py"))
  c.stages = ("sample",)
  c.init.pretrain = os.path.join(REPO, "assets", "embedded")
  os.makedirs(os.path.join(d, "sample"))
  with open(os.path.join(d, "sample", checkpoint.DONE), "w") as f:
    f.write("done\n")
  with open(os.path.join(d, "config.json"), "w") as f:
    f.write('{"written_by": "the run that made the outputs"}')
  main.run(c, d)
  main.run(c, d)
  with open(os.path.join(d, "config.json")) as f:
    assert json.load(f) == {"written_by": "the run that made the outputs"}
  runs = workdir.read_runs(d)
  assert len(runs) == 2 and runs[-1]["stages_skipped"] == ["sample"]
  assert runs[-1]["stages_run"] == [] and runs[-1]["config"]["seed"] == c.seed
  workdir.record_run(d, c.to_json_best_effort(), ["grpo"])  # a run that trains: the latest
  with open(os.path.join(d, "config.json")) as f:
    assert json.load(f)["seed"] == c.seed
