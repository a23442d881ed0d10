"""The real-model path end to end: a tiny random Wan2.1 diffusers folder (written by diffusers
and transformers) through the grpo stage with LoRA, and its adapters loaded back in diffusers."""
import glob
import json
import os

import diffusers
import numpy as np
import pytest
import torch
from flax import nnx

from euphonium_jax import checkpoint, main, report
from euphonium_jax import config as config_lib
from euphonium_jax.models.wan import tiny
from euphonium_jax.models.wan import transformer as wt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wan_tiny_config(path):
  c = config_lib.from_file(os.path.join(REPO, "configs", "wan_tiny.py"))
  c.wan.path = path
  return c


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return tiny.write_tiny_pipeline(str(tmp_path_factory.mktemp("wan_folder")))


@pytest.mark.slow
def test_wan_tiny_grpo_end_to_end(folder, tmp_path):
  workdir = str(tmp_path / "run")
  main.run(wan_tiny_config(folder), workdir)
  rows = [r for r in report.read_metrics(workdir, "grpo") if "update_seconds" in r]
  assert len(rows) == 2 and all(r["skipped"] == 0 for r in rows)
  assert all(r["grad_norm"] > 0 for r in rows)  # the pixel reward varies within groups
  assert rows[0]["kl"] < 1e-12 < 1e-9 < rows[1]["kl"]  # reference = the published model
  final = os.path.join(workdir, "grpo", "final")
  assert checkpoint.is_done(final)
  assert os.path.exists(os.path.join(workdir, "grpo", "eval", "iter_00002.mp4"))

  # The exported adapters, loaded by diffusers, give our trained network's output.
  adapters = checkpoint.load_final(final)["model"]["params"]
  b = adapters["blocks"]["attn1"]["lora"]["to_q"]["b"]
  assert np.abs(b).max() > 0  # B starts at zero: the updates moved it
  c = wan_tiny_config(folder)
  g, state, _ = wt.load_wan_transformer(
      os.path.join(folder, "transformer"), lora_rank=c.wan.lora_rank,
      lora_alpha=c.wan.lora_alpha, lora_targets=tuple(c.wan.lora_targets))
  g, _, frozen = nnx.split(nnx.merge(g, state), wt.LoRAParam, ...)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 3, 4, 4, 16)).astype(np.float32)
  text = rng.standard_normal((1, 5, 32)).astype(np.float32)
  t = np.array([0.6], np.float32)
  ours = np.asarray(nnx.merge(g, adapters, frozen)(x, t, {"tokens": text}))
  ref = diffusers.WanTransformer3DModel.from_pretrained(os.path.join(folder, "transformer"))
  ref.load_lora_adapter(os.path.join(final, "lora.safetensors"), prefix="transformer")
  with torch.no_grad():
    want = ref(torch.from_numpy(x).permute(0, 4, 1, 2, 3), timestep=torch.from_numpy(1000 * t),
               encoder_hidden_states=torch.from_numpy(text), return_dict=False)[0]
  want = want.permute(0, 2, 3, 4, 1).numpy()
  np.testing.assert_allclose(ours, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_wan_config_errors(folder, tmp_path):
  c = wan_tiny_config(str(tmp_path / "nowhere"))
  with pytest.raises(config_lib.ConfigError, match="wan.path"):
    config_lib.validate(c)
  c = wan_tiny_config(folder)
  c.sampling.preset = "euphonium"
  c.sampling.guidance.start = 3
  with pytest.raises(config_lib.ConfigError, match="needs a PRM"):  # no prm stage or path
    config_lib.validate(c)
  c.stages = ("prm", "grpo")
  c.prm.depth = 3  # the tiny transformer has 2 blocks
  with pytest.raises(config_lib.ConfigError, match=r"prm.depth = 3 .* in \[1, 2\]"):
    config_lib.validate(c)
  c = wan_tiny_config(folder)
  c.wan.frames = 8
  with pytest.raises(config_lib.ConfigError, match="wan.frames"):
    config_lib.validate(c)
  c = wan_tiny_config(folder)
  c.stages = ("grpo", "sample")
  with pytest.raises(config_lib.ConfigError, match="with model_family='wan' the stages"):
    config_lib.validate(c)
  config_lib.validate(wan_tiny_config(folder))  # and the tiny config itself is valid


def test_unipc_flow_grid_matches_diffusers():
  from diffusers import UniPCMultistepScheduler

  from euphonium_jax.sampling import schedules
  for n, shift in ((20, 3.0), (50, 5.0), (7, 1.0)):
    ref = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                  num_train_timesteps=1000, flow_shift=shift)
    ref.set_timesteps(n)
    np.testing.assert_allclose(schedules.unipc_flow_grid(n, shift), ref.sigmas.numpy(),
                               rtol=0, atol=1e-6)


def test_real_1_3b_config_validates_against_a_folder(folder):
  path = os.path.join(REPO, "configs", "wan2_1_t2v_1_3b.py")
  c = config_lib.from_file(path)
  with pytest.raises(config_lib.ConfigError, match="wan.path"):
    config_lib.validate(c, num_devices=8)  # no weights folder given
  c.wan.path = folder  # the tiny folder has the published layout
  config_lib.validate(c, num_devices=8)
  from euphonium_jax.sampling import config as sampling_config
  s = sampling_config.sampler_config_from(c.sampling)
  assert s.num_steps == 20 and c.eval.num_steps == 50 and c.grpo.cfg_scale == 4.5
  assert s.timesteps == "truncated" and s.grid[0] == pytest.approx(0.999999)
  for method in ("prm", "evaluate"):
    m = config_lib.from_file(path + ":" + method)
    m.wan.path, m.prm.depth = folder, 1
    config_lib.validate(m, num_devices=8)
  e = config_lib.from_file(path + ":euphonium")
  e.wan.path = folder
  with pytest.raises(config_lib.ConfigError, match="init.prm"):  # the PRM is given by path
    config_lib.validate(e, num_devices=8)
  e.init.prm = folder
  config_lib.validate(e, num_devices=8)
  assert sampling_config.sampler_config_from(e.sampling).guidance.start == 15


@pytest.mark.slow
def test_wan_tiny_prm_then_guided_grpo_then_evaluate(folder, tmp_path):
  """configs/wan_tiny.py:euphonium: a Wan PRM trained on the tiny Wan's rollouts of a prompt
  file, guided Euphonium GRPO with it (with CFG), then the evaluate stage on the test split."""
  c = config_lib.from_file(os.path.join(REPO, "configs", "wan_tiny.py:euphonium"))
  c.wan.path = folder
  workdir = str(tmp_path / "run")
  main.run(c, workdir)
  # The PRM: trained, reported, saved with the Wan PRM's layout (LoRA trunk + head).
  prm_final = os.path.join(workdir, "prm", "final")
  assert checkpoint.is_done(prm_final)
  saved = checkpoint.load_final(prm_final)["prm"]
  assert "queries" in saved["params"] and "blocks" in saved["rest"]
  # prm.states='renoised': the training cache keeps the clean estimates, not the trajectories.
  chunk = sorted(glob.glob(os.path.join(workdir, "prm", "cache", "train", "*.npz")))[0]
  with np.load(chunk) as z:
    assert "x0" in z and "latents" not in z and z["x0"].shape == (8, 3, 4, 4, 16)
  rep = json.load(open(os.path.join(workdir, "prm", "report.json")))
  assert rep["num_rollouts"] == 8 and len(rep["correlation"]["per_bucket"]) == 4
  # Guided GRPO: process rewards on the guided steps, both advantages, updates applied.
  rows = [r for r in report.read_metrics(workdir, "grpo") if "update_seconds" in r]
  assert len(rows) == 2 and all(r["skipped"] == 0 and r["grad_norm"] > 0 for r in rows)
  assert all(np.isfinite(r["process_reward"]) and r["process_reward"] != 0 for r in rows)
  # evaluate: the trained model on the same held-out prompts and noise as grpo's last eval.
  summary = json.load(open(os.path.join(workdir, "evaluate", "summary.json")))
  last = [r for r in report.read_metrics(workdir, "grpo") if "eval_reward" in r][-1]
  got = summary["rewards"]["jpeg_compressibility"]
  assert summary["model"].endswith(os.path.join("grpo", "final"))
  assert summary["num_prompts"] == 3  # the test split of 12 prompts at test_fraction 0.25
  np.testing.assert_allclose(got["mean"], last["eval_reward"], rtol=1e-5)
  lines = [json.loads(x) for x in open(os.path.join(workdir, "evaluate", "scores.jsonl"))]
  assert len(lines) == 3 and all(x["prompt"] for x in lines)
  np.testing.assert_allclose(np.mean([x["jpeg_compressibility"] for x in lines]), got["mean"],
                             rtol=1e-6)
