"""Text -> video with a bundle's networks: sample, decode, score, write.

`Generator` holds the three networks as (graphdef, params, rest) triples and one jitted
program per batch shape that runs the whole sampler (the Euler ODE of `config.eval` by
default, any sampler config by argument) and the VAE decoder. Used by the pretrain stage's
evaluations, the grpo stage's, and the `sample` and `evaluate` stages, on either bundle.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from euphonium_jax import checkpoint, embedded, parallel, report, sampling
from euphonium_jax.bundles import embedded as embedded_bundle
from euphonium_jax.data import prompts as prompts_lib
from euphonium_jax.data import world
from euphonium_jax.rewards import registry as rewards
from euphonium_jax.sampling import cfg as cfg_lib


def eval_sampler(config) -> sampling.SamplerConfig:
  """The evaluation sampler: Euler ODE with `eval.num_steps` / `eval.shift`."""
  return sampling.preset("ode", num_steps=config.eval.num_steps, shift=config.eval.shift)


def eval_prompts(config, prompt_set: prompts_lib.PromptSet, key) -> tuple[list, list]:
  """(prompts, metadata) of an evaluation: `eval.num_prompts` held-out prompts, a function of
  `key` only (the world's drawn from `eval.split` as always; a file's test split)."""
  n = config.eval.num_prompts
  if prompt_set.is_world:
    attrs = world.sample_attrs(jax.random.split(key)[0], n, config.eval.split)
    return world.captions(np.asarray(attrs)), [{} for _ in range(n)]
  prompts, meta = prompt_set.split("test")
  idx = prompts_lib.eval_indices(len(prompts), n, config.eval.seed)
  return [prompts[i] for i in idx], [meta[i] for i in idx]


def train_sampler(config, guided: bool) -> sampling.SamplerConfig:
  """The training sampler (`config.sampling`) as an evaluation sampler: one sample per prompt
  (no groups, no shared noise), every step an SDE step (no window); `guided=False` turns its
  PRM guidance off (and with it the PRM scoring of steps)."""
  s = sampling.sampler_config_from(config.sampling)
  s = dataclasses.replace(s, group_size=1, share_noise_in_group=False,
                          window=sampling.WindowConfig())
  if not guided:
    s = dataclasses.replace(s, guidance=dataclasses.replace(s.guidance, mode="off"),
                            score_unguided_steps=False)
  return s


def negative_prompts(config, null_prompt: str, metadata) -> list[str]:
  """CFG's negative prompt of each prompt: its metadata's `negative_prompt`, else
  `data.negative_prompt`, else the bundle's null prompt."""
  default = config.data.negative_prompt or null_prompt
  return [m.get("negative_prompt", default) for m in metadata]


@dataclasses.dataclass
class Generator:
  config: Any
  vae: tuple
  text: tuple
  model: tuple
  mesh: Any
  nets: Any = None  # the ModelBundle (default: the embedded world's)
  encode: Optional[Callable] = None  # host prompts -> text dict (default: self.text's, as set)
  sampler: Optional[sampling.SamplerConfig] = None  # default: eval_sampler(config)
  cfg_scale: Optional[float] = None  # default: config.eval.cfg_scale
  # (prm_fn ((params, rest), x, t, cond) -> [B], (params, rest)): the PRM a guided sampler's
  # guidance (and scoring) uses; None for samplers that need none.
  prm: Optional[tuple] = None

  def __post_init__(self):
    if self.nets is None:
      self.nets = embedded_bundle.EmbeddedBundle(self.config)
    if self.sampler is None:
      self.sampler = eval_sampler(self.config)
    if self.cfg_scale is None:
      self.cfg_scale = float(self.config.eval.cfg_scale)

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
    if self.encode is not None:
      return self.encode(list(prompts))
    ids, mask = self.nets.tokenize(list(prompts))  # the current self.text's parameters
    return self._text_program(self.text[1:], ids, mask)

  @functools.cached_property
  def _program(self):
    """jit(params, key, cond) -> (frames, latents) for the sampler settings."""
    sampler, shape = self.sampler, self.nets.latent_shape()
    velocity = cfg_lib.cfg_velocity(self.nets.velocity_fn(self.model[0]), self.cfg_scale)
    decode = self.nets.decode_fn(self.vae[0])

    prm_fn = None if self.prm is None else cfg_lib.text_only(self.prm[0])

    def program(params, key, cond):
      rollout = sampling.make_rollout(velocity, prm_fn, sampler,
                                      parallel.batch_sharding(self.mesh, len(shape) + 1))
      b = jax.tree.leaves(cond)[0].shape[0]
      out = rollout(params["model"], params.get("prm"), key, cond, (b,) + tuple(shape))
      return decode(params["vae"], out.x0_hat), out.x0_hat

    return jax.jit(program)

  def sample(self, key, prompts: Sequence[str], negatives: Sequence[str] | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Videos [B, T, H, W, 3] in [0, 1] (and their latents) for `prompts`."""
    cond = {"text": self.text_cond(prompts)}
    if self.cfg_scale != 1.0:
      negatives = negatives or negative_prompts(self.config, self.nets.null_prompt,
                                                [{}] * len(prompts))
      cond["negative"] = self.text_cond(negatives)
    params = {"model": self.model[1:], "vae": self.vae[1:]}
    if self.prm is not None:
      params["prm"] = self.prm[1]
    n = len(prompts)
    dp = parallel.data_parallel_size(self.mesh)
    pad = (-n) % dp  # keep the batch divisible by the data-parallel size
    if pad:
      cond = jax.tree.map(lambda a: jnp.concatenate([a, a[:1].repeat(pad, 0)]), cond)
    cond = jax.tree.map(lambda a: parallel.global_array(
        np.asarray(a), parallel.batch_sharding(self.mesh, np.ndim(a))), cond)
    frames, latents = self._program(params, key, cond)
    return parallel.to_host(frames)[:n], parallel.to_host(latents)[:n]

  def evaluate(self, key, outdir: str, name: str, prompts: Sequence[str] | None = None,
               reward_name: str | Callable = "shapes_fidelity",
               metadata: Sequence[dict] | None = None) -> dict[str, Any]:
    """Samples held-out prompts, scores them, writes a GIF/MP4 grid and a contact sheet.
    `reward_name`: a plain reward's name or a built reward (`registry.build`)."""
    c = self.config
    k_prompts, k_sample = jax.random.split(key)
    if prompts is None:
      attrs = world.sample_attrs(k_prompts, c.eval.num_prompts, c.eval.split)
      prompts = world.captions(np.asarray(attrs))
    negatives = None
    if metadata is not None and self.cfg_scale != 1.0:
      negatives = negative_prompts(c, self.nets.null_prompt, metadata)
    frames, _ = self.sample(k_sample, prompts, negatives)
    scores = rewards.score(reward_name, jnp.asarray(frames), list(prompts), metadata,
                           who="eval", kind="evaluation reward")
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
