"""The evaluate stage on the embedded bundle (the Wan one runs in test_wan_grpo.py), and the
prompt-set checks that run before anything compiles."""
import json
import os

import numpy as np
import pytest

from euphonium_jax import config as config_lib
from euphonium_jax import main
from euphonium_jax.stages import evaluate


def eval_config(**over):
  c = config_lib.get_default_config()
  c.stages = ("evaluate",)
  c.init.pretrain = "assets/embedded"
  c.eval.update(num_prompts=8, num_steps=4, num_videos=4)
  c.evaluate.update(**over)
  return c


@pytest.mark.slow
def test_evaluate_base_model_on_world(tmp_path):
  workdir = str(tmp_path / "run")
  res = main.run(eval_config(rewards=("shapes_fidelity", "jpeg_compressibility")), workdir)
  del res
  out = os.path.join(workdir, "evaluate")
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["model"].startswith("base") and summary["num_prompts"] == 8
  lines = [json.loads(x) for x in open(os.path.join(out, "scores.jsonl"))]
  assert len(lines) == 8
  for name in ("shapes_fidelity", "jpeg_compressibility"):
    v = np.array([x[name] for x in lines])
    np.testing.assert_allclose(summary["rewards"][name]["mean"], v.mean(), rtol=1e-6)
    np.testing.assert_allclose(summary["rewards"][name]["stderr"],
                               v.std(ddof=1) / np.sqrt(8), rtol=1e-6)
  assert 0.0 < summary["rewards"]["shapes_fidelity"]["mean"] < 1.0
  for f in ("videos.gif", "videos_frames.png"):
    assert os.path.getsize(os.path.join(out, f)) > 0
  assert evaluate.is_done(workdir)


def test_evaluate_model_path_must_hold_a_final(tmp_path):
  c = eval_config(model=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no finished grpo/final there"):
    evaluate.model_source(c, str(tmp_path))


def test_world_reward_refuses_a_prompt_file(tmp_path):
  f = tmp_path / "p.txt"
  f.write_text("a cat\na dog\na bird\n")
  c = config_lib.get_default_config()
  c.stages = ("grpo",)
  c.init.update(pretrain="assets/embedded", prm="assets/embedded/prm")
  c.data.prompts = str(f)
  with pytest.raises(config_lib.ConfigError, match="'shapes_fidelity' reads the embedded"):
    config_lib.validate(c, num_devices=8)
  c.grpo.rewards = (("jpeg_compressibility", 1.0),)
  config_lib.validate(c, num_devices=8)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("", "no prompts"),
    ("{\"text\": 1}\n", "no 'prompt'"),
])
def test_bad_prompt_files_are_config_errors(tmp_path, content, message):
  f = tmp_path / "p.jsonl"
  if content is not None:
    f.write_text(content)
  c = config_lib.get_default_config()
  c.stages = ("evaluate",)
  c.init.pretrain = "assets/embedded"
  c.data.prompts = str(f)
  with pytest.raises(config_lib.ConfigError, match="config.data.prompts") as e:
    config_lib.validate(c, num_devices=8)
  assert message in str(e.value) and "p.jsonl" in str(e.value)
