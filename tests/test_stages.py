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
