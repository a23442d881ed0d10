"""End to end on the tiny config: every stage runs, writes its outputs, and resumes exactly."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from euphonium_jax import checkpoint, main, report
from conftest import tiny_world_config as tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tiny"))
  main.run(tiny_config(), workdir)
  return workdir


@pytest.mark.slow
def test_tiny_end_to_end_outputs(tiny_run):
  for stage in ("vae", "pretrain"):
    assert checkpoint.is_done(os.path.join(tiny_run, stage, "final"))
  info = checkpoint.read_info(os.path.join(tiny_run, "vae", "final"))
  assert np.isfinite(info["psnr_db"])
  rows = report.read_metrics(tiny_run)
  assert {r["stage"] for r in rows} >= {"vae", "pretrain"}
  assert all("step" in r for r in rows)
  sample = os.path.join(tiny_run, "sample")
  for name in ("videos.gif", "videos.mp4", "videos_frames.png", "summary.json"):
    assert os.path.getsize(os.path.join(sample, name)) > 0, name
  with open(os.path.join(sample, "summary.json")) as f:
    summary = json.load(f)
  assert summary["num_prompts"] == 8 and 0.0 <= summary["reward_mean"] <= 1.0
  assert os.listdir(os.path.join(tiny_run, "tensorboard", "pretrain"))
  grpo_dir = os.path.join(tiny_run, "grpo")
  assert checkpoint.is_done(os.path.join(grpo_dir, "final"))
  for name in ("curves.png", "eval/iter_00000.gif", "eval/iter_00002.mp4",
               "eval/iter_00002_frames.png"):
    assert os.path.getsize(os.path.join(grpo_dir, name)) > 0, name
  rows = report.read_metrics(tiny_run, "grpo")
  assert [r["step"] for r in rows] == [0, 1, 2]
  assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in rows[1:])
  assert summary["source"].endswith(os.path.join("grpo", "final"))  # sample follows grpo


@pytest.mark.slow
def test_finished_stages_are_skipped(tiny_run, capsys):
  main.run(tiny_config(), tiny_run)
  out = capsys.readouterr().out
  for stage in ("vae", "pretrain", "sample"):
    assert f"[{stage}] already finished" in out


@pytest.mark.slow
def test_pretrain_resume_is_exact(tiny_run, tmp_path):
  """6 steps straight == 3 steps, interruption (final output lost), resume to 6."""
  from euphonium_jax.stages import pretrain

  def run(workdir, steps):
    c = tiny_config()
    c.stages = ("pretrain",)
    c.init.vae = os.path.join(tiny_run, "vae", "final")
    c.pretrain.steps = steps
    c.pretrain.ckpt_every = 3
    c.pretrain.eval_every = 100
    main.run(c, workdir)
    return checkpoint.load_final(os.path.join(workdir, "pretrain", "final"))

  straight = run(str(tmp_path / "straight"), 6)
  resumed_dir = str(tmp_path / "resumed")
  run(resumed_dir, 3)
  shutil.rmtree(os.path.join(resumed_dir, "pretrain", "final"))  # as if stopped at step 3
  resumed = run(resumed_dir, 6)
  for a, b in zip(jax.tree.leaves(straight["model"]), jax.tree.leaves(resumed["model"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  losses = lambda d: [r["loss"] for r in report.read_metrics(d, "pretrain")
                      if "loss" in r and r["step"] == 6]
  assert losses(str(tmp_path / "straight")) == losses(resumed_dir)[-1:]


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
  """SIGTERM mid-stage: the loop saves a checkpoint at the current step and exits 0."""
  import signal
  import subprocess
  import sys
  import time

  workdir = tmp_path / "w"
  cmd = [sys.executable, "-m", "euphonium_jax.main", "--config",
         os.path.join(REPO, "configs", "tiny.py"), "--workdir", str(workdir),
         "--config.stages=('vae',)", "--config.vae_train.steps=100000",
         "--config.vae_train.log_every=1", "--config.vae_train.ckpt_every=100000"]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  deadline = time.time() + 240
  while not report.read_metrics(str(workdir), "vae") and time.time() < deadline:
    assert proc.poll() is None, proc.stdout.read()[-2000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-2000:]
  assert "[vae] SIGTERM: saved step" in out
  steps = os.listdir(os.path.join(workdir, "vae", "checkpoints"))
  assert steps and all(int(s) >= 1 for s in steps if s.isdigit())
  assert not checkpoint.is_done(os.path.join(workdir, "vae", "final"))


# ------------------------------------------------------------------------------- grpo


def grpo_config(tiny_run, **grpo):
  c = tiny_config()
  c.stages = ("grpo",)
  c.init.pretrain = os.path.join(tiny_run, "pretrain", "final")
  c.init.prm = os.path.join(tiny_run, "prm", "final")
  c.grpo.update(eval_every=0, **grpo)
  return c


def _is_timing(key):
  """Wall-clock metrics (`time`, every `*_seconds`) differ between any two runs."""
  return key == "time" or key.endswith("_seconds")


@pytest.mark.slow
def test_grpo_resume_is_exact(tiny_run, tmp_path):
  """6 iterations straight == 3, interruption (final output lost), resume to 6: identical
  parameters and identical training metrics (KL reference and distillation on)."""
  def run(workdir, iterations):
    c = grpo_config(tiny_run, iterations=iterations, ckpt_every=3, kl_coef=0.1,
                    distill_coef=0.5)
    main.run(c, workdir)
    return checkpoint.load_final(os.path.join(workdir, "grpo", "final"))

  straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
  straight = run(straight_dir, 6)
  run(resumed_dir, 3)
  shutil.rmtree(os.path.join(resumed_dir, "grpo", "final"))  # as if stopped at iteration 3
  resumed = run(resumed_dir, 6)
  leaves = jax.tree.leaves(straight["model"])
  assert leaves
  for a, b in zip(leaves, jax.tree.leaves(resumed["model"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  def train_rows(d):
    return {r["step"]: {k: v for k, v in r.items() if not _is_timing(k) and
                        not k.startswith("eval")} for r in report.read_metrics(d, "grpo")
            if r["step"] > 0}
  assert train_rows(straight_dir) == train_rows(resumed_dir)
  assert set(train_rows(straight_dir)) == {1, 2, 3, 4, 5, 6}
  assert train_rows(straight_dir)[6]["kl"] > 0


def _register_test_rewards():
  from euphonium_jax.rewards import registry

  @registry.register("test_nan_reward")
  def nan_reward(frames, prompts):
    return np.full((len(prompts),), np.nan, np.float32)

  @registry.register("test_broken_reward")
  def broken_reward(frames, prompts):
    raise ValueError("the judge is offline")


@pytest.mark.slow
def test_grpo_nonfinite_rewards_skip_then_stop(tiny_run, tmp_path):
  """Non-finite rewards skip the update and are counted; at grpo.max_nonfinite in a row the
  run stops with a message, the last good checkpoint untouched."""
  _register_test_rewards()
  c = grpo_config(tiny_run, iterations=5, ckpt_every=1, max_nonfinite=2,
                  rewards=(("test_nan_reward", 1.0),), advantage_mode="none")
  workdir = str(tmp_path / "w")
  with pytest.raises(FloatingPointError, match=r"2 non-finite updates in a row.*iteration 1"):
    main.run(c, workdir)
  rows = report.read_metrics(workdir, "grpo")
  assert rows[-1]["step"] == 1 and rows[-1]["skipped_iteration"] == 1
  assert rows[-1]["nonfinite_in_a_row"] == 1
  mgr = checkpoint.manager(os.path.join(workdir, "grpo", "checkpoints"))
  assert mgr.latest_step() == 1
  assert not checkpoint.is_done(os.path.join(workdir, "grpo", "final"))
  # The saved parameters are the pretrained ones: nothing non-finite reached them.
  saved = checkpoint.restore_latest(mgr, None)[1]["params"]
  base = checkpoint.load_final(c.init.pretrain)["model"]["params"]
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(base)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_grpo_failing_reward_names_it(tiny_run, tmp_path):
  _register_test_rewards()
  c = grpo_config(tiny_run, iterations=2, rewards=(("shapes_fidelity", 1.0),
                                                   ("test_broken_reward", 1.0)))
  with pytest.raises(RuntimeError, match="'test_broken_reward' raised ValueError: the judge"):
    main.run(c, str(tmp_path / "w"))


@pytest.mark.slow
def test_grpo_sigterm_saves_and_exits_cleanly(tiny_run, tmp_path):
  import signal
  import subprocess
  import sys
  import time

  workdir = tmp_path / "w"
  cmd = [sys.executable, "-m", "euphonium_jax.main", "--config",
         os.path.join(REPO, "configs", "tiny.py"), "--workdir", str(workdir),
         "--config.stages=('grpo',)", "--config.grpo.iterations=100000",
         f"--config.init.pretrain={os.path.join(tiny_run, 'pretrain', 'final')}",
         f"--config.init.prm={os.path.join(tiny_run, 'prm', 'final')}",
         "--config.grpo.eval_every=0", "--config.grpo.ckpt_every=100000"]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  deadline = time.time() + 240
  while not [r for r in report.read_metrics(str(workdir), "grpo") if r["step"] >= 1]:
    assert proc.poll() is None, proc.stdout.read()[-2000:]
    assert time.time() < deadline
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-2000:]
  assert "[grpo] SIGTERM: saved iteration" in out
  mgr = checkpoint.manager(os.path.join(workdir, "grpo", "checkpoints"))
  assert mgr.latest_step() >= 1
  assert not checkpoint.is_done(os.path.join(workdir, "grpo", "final"))
