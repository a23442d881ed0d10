"""End to end on the tiny config: every stage runs, writes its outputs, and resumes exactly."""

import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest

from euphonium_jax import checkpoint, main, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs", "tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


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
