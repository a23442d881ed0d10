"""The `sample` stage: text -> videos with the flow model (ODE sampler, no reward model).

The model is this workdir's GRPO result when the config runs the `grpo` stage, else the
pretrained one (`init.pretrain` or this workdir's `pretrain` stage).

Writes `WORKDIR/sample/videos.{gif,mp4}`, a PNG contact sheet and `scores.json` (the outcome
reward of each video), then a DONE marker.
"""

from __future__ import annotations

import json
import os

import jax

from euphonium_jax import checkpoint, embedded, generate


def stage_dir(workdir: str) -> str:
  return os.path.join(workdir, "sample")


def is_done(workdir: str) -> bool:
  return checkpoint.is_done(stage_dir(workdir))


def run(config, workdir: str) -> dict:
  out = stage_dir(workdir)
  trained = os.path.join(workdir, "grpo", "final")  # a GRPO run in this workdir comes first
  source = trained if "grpo" in tuple(config.stages) and checkpoint.is_done(trained) else \
      embedded.flow_dir(config, workdir)
  gen = generate.Generator.from_checkpoint(config, source)
  prompts = list(config.sample.prompts) or None
  if prompts is not None:
    prompts = [p for p in prompts for _ in range(config.sample.num_per_prompt)]
  res = gen.evaluate(jax.random.key(config.seed), out, "videos", prompts=prompts)
  res["source"] = source
  if jax.process_index() == 0:
    with open(os.path.join(out, "summary.json"), "w") as f:
      json.dump(res, f, indent=1)
    with open(os.path.join(out, checkpoint.DONE), "w") as f:
      f.write("done\n")
  print(f"[sample] {res['num_prompts']} videos from {source}: mean reward "
        f"{res['reward_mean']:.3f} +- {res['reward_stderr']:.3f}; written to {out}/videos.gif, "
        f"videos.mp4, videos_frames.png")
  return res
