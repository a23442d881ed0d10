"""eval.sde: the grpo stage's evaluations with the training sampler, guided and unguided.

The gap between the two is what distillation is meant to close (issue 16), so the two must
share prompts and noise, the guided one must use the PRM it is given, and the unguided one
must be the same SDE with the guidance term removed.
"""
import dataclasses
import os

import jax
import numpy as np
import pytest

from euphonium_jax import bundles, config as config_lib, generate, parallel, sampling
from conftest import use_tiny_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def euphonium_tiny(tiny_init):
  c = use_tiny_world(config_lib.from_file(os.path.join(REPO, "configs", "euphonium.py")))
  c.sampling.update(num_steps=6, group_size=4)
  c.sampling.guidance.update(mode="raw", scale=0.0, start=2)
  c.grpo.update(iterations=1, prompts_per_iteration=2, samples_per_update=8, eval_every=1,
                ckpt_every=1)
  c.eval.update(num_prompts=8, num_steps=3)
  c.init.pretrain = os.path.join(tiny_init, "pretrain")
  c.init.prm = os.path.join(tiny_init, "prm")
  return c


def test_train_sampler_is_the_training_sde_per_prompt():
  c = config_lib.from_file(os.path.join(REPO, "configs", "mix_grpo.py"))
  train = generate.train_sampler(c, guided=True)
  base = sampling.sampler_config_from(c.sampling)
  assert base.windowed and base.group_size > 1
  assert not train.windowed and train.group_size == 1 and not train.share_noise_in_group
  assert dataclasses.replace(train, group_size=base.group_size, window=base.window,
                             share_noise_in_group=base.share_noise_in_group) == base
  e = config_lib.from_file(os.path.join(REPO, "configs", "euphonium.py"))
  un = generate.train_sampler(e, guided=False)
  assert un.guidance.mode == "off" and not un.score_unguided_steps
  assert un.schedule == sampling.sampler_config_from(e.sampling).schedule


def _generators(c, tiny_init):
  mesh = parallel.mesh_from_config(c)
  nets = bundles.get(c)
  gen = generate.Generator.from_checkpoint(c, os.path.join(tiny_init, "pretrain"), mesh)
  prm = nets.load_prm(os.path.join(tiny_init, "prm"), mesh)
  make = lambda guided: generate.Generator(
      c, gen.vae, gen.text, gen.model, mesh, nets,
      sampler=generate.train_sampler(c, guided=guided),
      prm=(nets.prm_fn(prm[0]), prm[1:]) if guided else None)
  return make(True), make(False), prm, nets


def test_guided_and_unguided_share_noise_and_guidance_ascends_the_prm(tiny_init):
  c = euphonium_tiny(tiny_init)
  prompts = ["a red circle moving right"] * 4 + ["a blue square"] * 4
  key = jax.random.key(3)
  guided, unguided, prm, nets = _generators(c, tiny_init)
  _, lat_u = unguided.sample(key, prompts)
  _, lat_0 = guided.sample(key, prompts)  # raw guidance of scale 0
  np.testing.assert_array_equal(lat_0, lat_u)  # same noise; guidance adds exactly nothing

  c.sampling.guidance.scale = 3.0
  guided_3, _, _, _ = _generators(c, tiny_init)
  _, lat_3 = guided_3.sample(key, prompts)
  assert float(np.abs(lat_3 - lat_u).max()) > 1e-3
  # The guidance climbs the PRM: its score of the final latent rises (the PRM given is used).
  prm_fn = jax.jit(lambda p, x, cond: nets.prm_fn(prm[0])(p, x, np.zeros(len(x), np.float32),
                                                          cond))
  cond = guided.text_cond(prompts)
  score = lambda lat: np.asarray(prm_fn(prm[1:], lat, cond))
  gain = score(lat_3) - score(lat_u)
  assert gain.mean() > 0 and (gain > 0).mean() >= 0.75, gain


def test_eval_sde_is_validated():
  c = config_lib.from_file(os.path.join(REPO, "configs", "dance_grpo.py"))
  c.eval.sde = ("guided",)
  with pytest.raises(config_lib.ConfigError, match="eval.sde.*guidance.mode is 'off'"):
    config_lib.validate(c)
  c.eval.sde = ("unguided", "unguided")
  with pytest.raises(config_lib.ConfigError, match="eval.sde.*distinct 'guided' / 'unguided'"):
    config_lib.validate(c)
  c.eval.sde = ("unguided",)
  config_lib.validate(c)


@pytest.mark.slow
def test_grpo_stage_records_sde_evaluations(tiny_init, tmp_path):
  """A short run on the tiny world: every evaluation records the ODE, guided-SDE and
  unguided-SDE rewards, each the mean of its own scores on the same prompts. (Random tiny
  networks score 0: that guidance changes the samples is the test above.)"""
  import json
  from euphonium_jax import main, report
  c = euphonium_tiny(tiny_init)
  c.sampling.guidance.scale = 3.0
  c.eval.update(num_prompts=16, sde=("guided", "unguided"))
  config_lib.validate(c)
  main.run(c, str(tmp_path))
  rows = [r for r in report.read_metrics(str(tmp_path), "grpo") if "eval_reward" in r]
  assert [r["step"] for r in rows] == [0, 1]
  evals = os.path.join(str(tmp_path), "grpo", "eval")
  for r in rows:
    scores = {}
    for kind in ("", "_sde_guided", "_sde_unguided"):
      with open(os.path.join(evals, f"iter_{r['step']:05d}{kind}_scores.json")) as f:
        rec = json.load(f)
      scores[kind] = np.asarray(rec["scores"])
      assert len(scores[kind]) == 16
      assert r[f"eval_reward{kind}"] == pytest.approx(float(scores[kind].mean()), abs=1e-6)
      assert r[f"eval_stderr{kind}"] >= 0
    assert (rec["prompts"] == json.load(open(os.path.join(
        evals, f"iter_{r['step']:05d}_scores.json")))["prompts"])
  assert os.path.getsize(os.path.join(evals, "iter_00001_sde_unguided.gif")) > 0
