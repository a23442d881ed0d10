"""Text -> video with the embedded world's networks: sample, decode, score, write.

`Generator` holds the three networks as (graphdef, params, rest) triples and one jitted
program per batch shape that runs the whole sampler (any preset; ODE for evaluation) and the
VAE decoder. Used by the pretrain stage's evaluations and the `sample` stage.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from euphonium_jax import checkpoint, embedded, parallel, report
from euphonium_jax.data import world
from euphonium_jax.rewards import registry as rewards
from euphonium_jax import sampling


@dataclasses.dataclass
class Generator:
  config: Any
  vae: tuple
  text: tuple
  model: tuple
  mesh: Any
  nets: Any = embedded  # the model bundle: `embedded` or `wan_bundle` (same calls)

  @classmethod
  def from_params(cls, config, *, vae, text, model, mesh=None) -> "Generator":
    return cls(config, vae, text, model, mesh or parallel.mesh_from_config(config))

  @classmethod
  def from_checkpoint(cls, config, directory: str, mesh=None) -> "Generator":
    """Loads VAE, text encoder and flow model from a finished pretrain dir (or assets)."""
    mesh = mesh or parallel.mesh_from_config(config)
    rep = parallel.replicated(mesh)  # small networks: a full copy on every device
    tree = checkpoint.load_final(directory)
    nets = [embedded.load(k, config, directory, tree) for k in ("vae", "text", "model")]
    nets = [(g, jax.device_put(p, rep), jax.device_put(r, rep)) for g, p, r in nets]
    return cls(config, *nets, mesh)

  @functools.cached_property
  def _text_program(self):
    return jax.jit(self.nets.text_fn(self.text[0]))

  def text_cond(self, prompts: Sequence[str]) -> dict[str, jax.Array]:
    ids, mask = self.nets.tokenize(self.config, prompts)
    return self._text_program(self.text[1:], ids, mask)

  @functools.cached_property
  def _program(self):
    """jit(params, key, cond, null) -> (frames, latents) for the eval sampler settings."""
    c = self.config
    sampler = sampling.preset("ode", num_steps=c.eval.num_steps, shift=c.eval.shift)
    vg, _, _ = self.model
    velocity = self.nets.velocity_fn(vg)
    decode = self.nets.decode_fn(self.vae[0])
    shape = self.nets.latent_shape(c)

    def program(params, key, cond, null):
      v = embedded.cfg_velocity(velocity, c.eval.cfg_scale, null)
      rollout = sampling.make_rollout(v, None, sampler, parallel.batch_sharding(self.mesh, 5))
      b = jax.tree.leaves(cond)[0].shape[0]
      out = rollout(params["model"], None, key, cond, (b,) + tuple(shape))
      return decode(params["vae"], out.x0_hat), out.x0_hat

    return jax.jit(program)

  def sample(self, key, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Videos [B, T, H, W, 3] in [0, 1] (and their latents) for `prompts`."""
    cond = self.text_cond(prompts)
    null = self.text_cond([self.nets.NULL_PROMPT])
    params = {"model": self.model[1:], "vae": self.vae[1:]}
    n = len(prompts)
    dp = parallel.data_parallel_size(self.mesh)
    pad = (-n) % dp  # keep the batch divisible by the data-parallel size
    if pad:
      cond = jax.tree.map(lambda a: jnp.concatenate([a, a[:1].repeat(pad, 0)]), cond)
    cond = jax.tree.map(lambda a: parallel.global_array(
        np.asarray(a), parallel.batch_sharding(self.mesh, np.ndim(a))), cond)
    frames, latents = self._program(params, key, cond, null)
    return parallel.to_host(frames)[:n], parallel.to_host(latents)[:n]

  def evaluate(self, key, outdir: str, name: str, prompts: Sequence[str] | None = None,
               reward_name: str = "shapes_fidelity") -> dict[str, Any]:
    """Samples held-out prompts, scores them, writes a GIF/MP4 grid and a contact sheet."""
    c = self.config
    k_prompts, k_sample = jax.random.split(key)
    if prompts is None:
      attrs = world.sample_attrs(k_prompts, c.eval.num_prompts, c.eval.split)
      prompts = world.captions(np.asarray(attrs))
    frames, _ = self.sample(k_sample, prompts)
    scores = np.asarray(rewards.get(reward_name)(jnp.asarray(frames), list(prompts)))
    os.makedirs(outdir, exist_ok=True)
    k = min(c.eval.num_videos, len(prompts))
    stem = os.path.join(outdir, name)
    report.write_videos(stem, frames[:k], fps=c.eval.fps)
    report.contact_sheet(stem + "_frames.png", frames[:k], list(prompts[:k]), scores[:k])
    res = {"reward_mean": float(scores.mean()),
           "reward_stderr": float(scores.std(ddof=1) / np.sqrt(len(scores)))
           if len(scores) > 1 else 0.0,
           "num_prompts": len(prompts)}
    if jax.process_index() == 0:
      with open(stem + "_scores.json", "w") as f:
        json.dump(dict(res, prompts=list(prompts), scores=scores.tolist()), f, indent=1)
    return res
