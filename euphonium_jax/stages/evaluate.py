"""The `evaluate` stage: a model on the prompt set's test split, scored by every configured
reward, on either bundle.

The model is `evaluate.model`: '' (this workdir's `grpo/final` when finished, else the base),
'base' (the base networks of `init.pretrain` / `wan.path`), or the path of a finished
`grpo/final` (or of a workdir holding one): for Wan with LoRA, the adapters it saved. The
sampler is the Euler ODE of `eval.num_steps` / `eval.shift` (`evaluate.sampler = 'ode'`) or
any sampling preset at those sizes, unguided (inference needs no reward model); CFG is
`eval.cfg_scale`; the prompts are `eval.num_prompts` of the test split, and the noise comes
from `eval.seed`, so two models evaluated with one config see the same prompts and noise.

Writes `WORKDIR/evaluate/`: `summary.json` (each reward's mean with its standard error),
`scores.jsonl` (one line per prompt: the prompt, its metadata and every reward's score),
`videos.{gif,mp4}` and `videos_frames.png` (a grid of the first `eval.num_videos`).
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from euphonium_jax import bundles, checkpoint, generate, parallel, paths, report, sampling
from euphonium_jax.data import prompts as prompts_lib
from euphonium_jax.rewards import registry as rewards

PRM_FINAL = "prm_final"


def stage_dir(workdir: str) -> str:
  return os.path.join(workdir, "evaluate")


def is_done(workdir: str) -> bool:
  return checkpoint.is_done(stage_dir(workdir))


def reward_names(config) -> list[str]:
  names = list(config.evaluate.rewards) or [n for n, _ in config.grpo.rewards if n != PRM_FINAL]
  return names or ["shapes_fidelity"]


def model_source(config, workdir: str) -> str | None:
  """The finished grpo/final to evaluate, or None for the base networks."""
  m = config.evaluate.model
  if m == "base":
    return None
  if not m:
    own = os.path.join(workdir, "grpo", "final")
    return own if checkpoint.is_done(own) else None
  path = paths.resolve_path(m)
  for cand in (path, os.path.join(path, "final"), os.path.join(path, "grpo", "final")):
    if checkpoint.is_done(cand):
      return cand
  raise FileNotFoundError(f"config.evaluate.model = {m!r}: no finished grpo/final there "
                          f"(looked in {path}, its final/ and grpo/final/)")


def sampler(config) -> sampling.SamplerConfig:
  e = config.eval
  if config.evaluate.sampler == "ode":
    return generate.eval_sampler(config)
  return sampling.preset(config.evaluate.sampler, num_steps=e.num_steps, shift=e.shift,
                         guidance=dict(mode="off"), group_size=1)


def run(config, workdir: str) -> dict:
  out = stage_dir(workdir)
  os.makedirs(out, exist_ok=True)
  mesh = parallel.mesh_from_config(config)
  prompt_set = prompts_lib.load(config.data.prompts, seed=config.seed,
                                test_fraction=config.data.test_fraction)
  nets = bundles.get(config)
  vae, text, model, base = nets.load_networks(workdir, mesh)
  source = model_source(config, workdir)
  if source is not None:
    model = nets.load_trained(source, model)
  key = jax.random.fold_in(jax.random.key(config.eval.seed), 777)
  prompts, meta = generate.eval_prompts(config, prompt_set, key)
  encode = bundles.run_text_encoder(config, nets, text, mesh, prompt_set, workdir)
  gen = generate.Generator(config, vae, text, model, mesh, nets, encode=encode,
                           sampler=sampler(config))

  names = reward_names(config)
  built = rewards.build_many(names, config.rewards)  # once, before anything compiles
  k_sample = jax.random.split(key)[1]
  negatives = None
  if gen.cfg_scale != 1.0:
    negatives = generate.negative_prompts(config, nets.null_prompt, meta)
  frames, _ = gen.sample(k_sample, prompts, negatives)
  scores = {name: v.astype(np.float64) for name, v in rewards.score_many(
      built, frames, list(prompts), meta, who="evaluate", kind="reward").items()}
  n = len(prompts)
  summary = {
      "stage": "evaluate", "family": nets.family, "model": source or f"base ({base})",
      "prompts": prompt_set.source, "split": "test", "num_prompts": n,
      "sampler": gen.sampler.name, "num_steps": gen.sampler.num_steps,
      "cfg_scale": gen.cfg_scale, "seed": config.eval.seed,
      "rewards": {name: {"mean": float(v.mean()),
                         "stderr": float(v.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0}
                  for name, v in scores.items()}}
  if jax.process_index() == 0:
    with open(os.path.join(out, "scores.jsonl"), "w") as f:
      for i, p in enumerate(prompts):
        f.write(json.dumps({"prompt": p, "metadata": meta[i],
                            **{name: float(v[i]) for name, v in scores.items()}}) + "\n")
    k = min(config.eval.num_videos, n)
    stem = os.path.join(out, "videos")
    report.write_videos(stem, frames[:k], fps=config.eval.fps)
    report.contact_sheet(stem + "_frames.png", frames[:k], list(prompts[:k]),
                         scores[names[0]][:k])
    with open(os.path.join(out, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
    with open(os.path.join(out, checkpoint.DONE), "w") as f:
      f.write("done\n")
  text_ = ", ".join(f"{k_} {v['mean']:.4f} +- {v['stderr']:.4f}"
                    for k_, v in summary["rewards"].items())
  print(f"[evaluate] {summary['model']} on {n} test prompts of {prompt_set.source}: {text_}")
  return summary
