"""Wan2.1 as a `ModelBundle`: a diffusers Wan pipeline folder's transformer, VAE and UMT5
encoder, and a latent PRM on the transformer's first blocks.

`config.wan.path` is a folder in the published layout (``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, each with its config and safetensors weights). The flow runs
in Wan's normalised latent space ([B, 1 + (F - 1) / 4, H / 8, W / 8, 16]); decoding
de-normalises and maps the VAE's [-1, 1] video to [0, 1] for the rewards. With
``wan.lora_rank > 0`` only the adapters are trained and the KL reference is the same network
with zero adapters; otherwise every transformer parameter is. Prompts come from the configured
prompt set; their UMT5 embeddings are computed once and cached on disk
(`models/wan/prompt_cache.py`), read back per iteration.

The PRM (`models/wan/prm.py`) is the transformer's first `prm.depth` blocks, initialised from
the base weights, a learned-query attention pool and an MLP head; trained fully or, with
``prm.lora_rank > 0``, as LoRA adapters on the trunk plus the head.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from euphonium_jax import checkpoint, parallel, paths, training
from euphonium_jax.bundles import common
from euphonium_jax.models.wan import loading, lora
from euphonium_jax.models.wan import prm as wan_prm
from euphonium_jax.models.wan import prompt_cache
from euphonium_jax.models.wan import transformer as wt
from euphonium_jax.models.wan import umt5 as umt5_lib
from euphonium_jax.models.wan import umt5_prompts
from euphonium_jax.models.wan import vae as vae_lib

NULL_PROMPT = ""
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer")


def check_folder(path: str) -> None:
  """The pipeline folder has the four parts, each with its config: ValueError otherwise."""
  root = paths.resolve_path(path)
  problems = []
  for sub in SUBFOLDERS:
    d = os.path.join(root, sub)
    if not os.path.isdir(d):
      problems.append(f"{sub}/ is missing")
      continue
    if sub != "tokenizer":
      if not os.path.exists(os.path.join(d, "config.json")):
        problems.append(f"{sub}/config.json is missing")
      try:
        loading.check_headers(d)
      except (loading.WeightsError, FileNotFoundError) as e:
        problems.append(str(e))
  if problems:
    raise ValueError(f"config.wan.path = {path!r} is not a Wan diffusers folder: "
                     + "; ".join(problems))


def _root(config) -> str:
  return paths.resolve_path(config.wan.path)


def _transformer_options(config) -> dict:
  """WanConfig's execution and LoRA options from config.wan."""
  w = config.wan
  return dict(dtype=w.dtype, remat=w.remat, attention_impl=w.attention_impl,
              lora_rank=w.lora_rank, lora_alpha=float(w.lora_alpha),
              lora_targets=tuple(w.lora_targets))


def transformer_config(config) -> wt.WanConfig:
  return wt.WanConfig.from_reference(
      loading.read_config(os.path.join(_root(config), "transformer")),
      **_transformer_options(config))


def vae_config(config) -> vae_lib.WanVAEConfig:
  return vae_lib.WanVAEConfig.from_reference(
      loading.read_config(os.path.join(_root(config), "vae")))


def latent_shape(config) -> tuple[int, int, int, int]:
  v, w = vae_config(config), config.wan
  return (1 + (w.frames - 1) // v.temporal_factor, w.height // v.spatial_factor,
          w.width // v.spatial_factor, v.z_dim)


def _trainable(config):
  return wt.LoRAParam if config.wan.lora_rank else nnx.Param


def _split(module_or_graph_state, trainable=nnx.Param):
  g, p, r = nnx.split(module_or_graph_state, trainable, ...)
  return g, nnx.to_pure_dict(p), nnx.to_pure_dict(r)



@functools.lru_cache(maxsize=4)
def _tokenizer(folder: str):
  return umt5_prompts.load_tokenizer(folder)


def prm_config(config) -> wan_prm.WanPRMConfig:
  """The Wan PRM's sizes: the base transformer's, its first `prm.depth` blocks, config.prm's
  head, and LoRA on the trunk when `prm.lora_rank > 0`."""
  p = config.prm
  base = wt.WanConfig.from_reference(
      loading.read_config(os.path.join(_root(config), "transformer")),
      **dict(_transformer_options(config), lora_rank=p.lora_rank, lora_alpha=float(p.lora_alpha)))
  return wan_prm.WanPRMConfig(base=base, depth=p.depth, num_queries=p.num_queries,
                              head_width=p.head_width)


class WanBundle:
  family = "wan"
  null_prompt = NULL_PROMPT

  def __init__(self, config):
    self.config = config
    self.root = _root(config)

  # ---------------------------------------------------------------------------- Networks

  def load_networks(self, workdir: str, mesh):
    """(vae, text, model) as (graphdef, params, rest) triples, placed with their shardings,
    and the folder they came from."""
    config, root = self.config, self.root
    rules, w = config.sharding.rules, config.wan
    dtype = jnp.dtype(w.param_dtype)
    g, s, _ = wt.load_wan_transformer(
        os.path.join(root, "transformer"), mesh=mesh, logical_rules=rules, param_dtype=dtype,
        seed=config.seed, **_transformer_options(config))
    model = _split(nnx.merge(g, s), _trainable(config))
    vg, vs, _ = vae_lib.load_wan_vae(os.path.join(root, "vae"), mesh=mesh, logical_rules=rules,
                                     dtype=dtype)
    vae = _split(nnx.merge(vg, vs))
    text = _split(umt5_lib.load_umt5(os.path.join(root, "text_encoder"), mesh=mesh,
                                     logical_rules=rules, dtype=dtype, compute=w.dtype))
    return vae, text, model, root

  def velocity_fn(self, graphdef):
    """velocity((params, rest), x_t, t, text) -> v, the project's time convention."""
    def velocity(state, x, t, text):
      return nnx.merge(graphdef, *state)(x, t, text)
    return velocity

  def text_fn(self, graphdef):
    def encode(state, ids, mask):
      return nnx.merge(graphdef, *state)(ids, mask)
    return encode

  def decode_fn(self, graphdef):
    """decode((params, rest), normalised latents) -> frames [B, F, H, W, 3] in [0, 1]."""
    def decode(state, z):
      vae = nnx.merge(graphdef, *state)
      return (vae.decode(vae.denormalize_latents(z)) + 1.0) * 0.5
    return decode

  def latent_shape(self) -> tuple[int, ...]:
    return tuple(latent_shape(self.config))

  def model_param_shardings(self, mesh):
    abstract = nnx.state(wt.abstract(transformer_config(self.config)), _trainable(self.config))
    return training.param_shardings(abstract, mesh, self.config.sharding.rules)

  def reference_params(self, params):
    """The KL reference: a copy of the parameters, or zero adapters (= the published model)."""
    if self.config.wan.lora_rank:
      return jax.tree.map(jnp.zeros_like, params)
    return jax.tree.map(jnp.copy, params)

  def save_final(self, directory: str, params, model_rest, vae, text, summary) -> None:
    """The trained parameters (adapters, or the whole transformer) and, with LoRA, the
    adapters as diffusers-loadable safetensors (`lora.safetensors`); VAE and text encoder are
    the published ones (`summary['source']`)."""
    checkpoint.save_final(directory, {"model": {"params": params}}, summary,
                          config_json=self.config.to_json_best_effort(indent=2))
    if self.config.wan.lora_rank:
      tree = jax.tree.map(parallel.to_host, dict(params))
      tree["lora_scale"] = parallel.to_host(model_rest["lora_scale"])
      if jax.process_index() == 0:
        lora.export(tree, os.path.join(directory, "lora.safetensors"))

  def load_trained(self, directory: str, model):
    g, p, r = model
    tree = checkpoint.load_final(directory)
    if "model" not in tree:
      raise ValueError(f"{directory} holds no trained Wan model (it has {sorted(tree)})")
    try:
      new = common.match_tree(p, tree["model"]["params"])
    except ValueError as e:
      raise ValueError(f"the model in {directory} does not match config.wan (LoRA rank or "
                       f"targets differ?): {e}") from None
    return g, jax.tree.map(lambda a, b: jax.device_put(a, b.sharding), new, p), r

  # ----------------------------------------------------------------------------- Prompts

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    tok = _tokenizer(os.path.join(self.root, "tokenizer"))
    return umt5_prompts.tokenize_prompts(tok, list(prompts), self.config.wan.max_text_length)

  def text_encoder(self, text, mesh, cache_dir: str | None = None, prompts: Sequence[str] = ()):
    """UMT5 embeddings; with `cache_dir`, those of `prompts` computed once into a disk cache
    (fingerprinted by encoder weights, tokenizer, text length) and read per call."""
    rep = parallel.replicated(mesh)
    program = jax.jit(self.text_fn(text[0]), out_shardings=rep)
    self.warn_truncated(prompts)

    def encode_batch(ps):
      ids, mask = self.tokenize(list(ps))
      out = program(text[1:], ids, mask)
      return {"tokens": out["tokens"].astype(jnp.float32), "mask": out["mask"]}

    if not cache_dir or not prompts:
      return encode_batch
    w = self.config.wan
    fp = prompt_cache.fingerprint(
        list(prompts), weights=prompt_cache.weights_digest(os.path.join(self.root,
                                                                        "text_encoder")),
        tokenizer=prompt_cache.files_digest(os.path.join(self.root, "tokenizer")),
        max_length=w.max_text_length, param_dtype=w.param_dtype, compute=w.dtype)
    cache_dir = os.path.join(cache_dir, fp[:16])  # one folder per prompt list and encoder
    first = jax.process_index() == 0
    cache = None
    if first:
      cache = prompt_cache.PromptCache(cache_dir, prompts, encode_batch,
                                       max_length=w.max_text_length, fingerprint_=fp)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("prompt cache")
    if cache is None:
      cache = prompt_cache.PromptCache(cache_dir, prompts, encode_batch,
                                       max_length=w.max_text_length, fingerprint_=fp,
                                       write=False)

    def encode(ps):
      ps = list(ps)
      if all(p in cache.row for p in ps):
        return jax.device_put(cache.lookup(ps), rep)
      return encode_batch(ps)
    return encode

  def warn_truncated(self, prompts: Sequence[str]) -> int:
    """Prompts longer than `wan.max_text_length` tokens are truncated (as Wan's pipeline
    does); their count is printed once."""
    if not prompts:
      return 0
    tok = _tokenizer(os.path.join(self.root, "tokenizer"))
    n_long = 0
    limit = self.config.wan.max_text_length
    for lo in range(0, len(prompts), 1024):
      enc = tok([umt5_prompts.clean_prompt(p) for p in prompts[lo:lo + 1024]],
                add_special_tokens=True)["input_ids"]
      n_long += sum(len(ids) > limit for ids in enc)
    if n_long:
      print(f"[prompts] {n_long} of {len(prompts)} prompts are longer than "
            f"wan.max_text_length = {limit} tokens and are truncated")
    return n_long

  # --------------------------------------------------------------------------------- PRM

  def _prm_filter(self):
    return wan_prm.trainable_filter(bool(self.config.prm.lora_rank))

  def init_prm(self, model, seed: int):
    """A fresh Wan PRM; its trunk (patch, time and text embeddings, blocks [:K]) copied from
    the base transformer when `prm.init_from_base`."""
    module = wan_prm.build(prm_config(self.config), seed=seed)
    if self.config.prm.init_from_base:
      g, p, r = model
      base = nnx.to_pure_dict(nnx.state(nnx.merge(g, p, r)))
      state = nnx.state(module)
      full = wan_prm.init_from_base(nnx.to_pure_dict(state), base)
      nnx.replace_by_pure_dict(state, full)
      nnx.update(module, state)
    return _split(module, self._prm_filter())

  def abstract_prm(self):
    return wan_prm.abstract(prm_config(self.config))

  def prm_param_shardings(self, mesh):
    return self._prm_shardings(mesh)[1]

  def load_prm(self, directory: str, mesh):
    g, p, r = _split(self.abstract_prm(), self._prm_filter())
    tree = checkpoint.load_final(directory)
    if "prm" not in tree:
      raise ValueError(f"{directory} holds no 'prm' network (it has {sorted(tree)})")
    try:
      p = common.match_tree(p, tree["prm"]["params"])
      r = common.match_tree(r, tree["prm"]["rest"])
    except (KeyError, ValueError) as e:
      raise ValueError(f"the Wan PRM in {directory} does not match config.prm and config.wan "
                       f"(different depth, head or LoRA rank?): {e}") from None
    _, sh_p, sh_r = self._prm_shardings(mesh)
    return g, jax.device_put(p, sh_p), jax.device_put(r, sh_r)

  def _prm_shardings(self, mesh):
    """(graphdef, shardings of the trained params, of the rest) of the PRM."""
    g, a_p, a_r = nnx.split(self.abstract_prm(), self._prm_filter(), ...)
    rules = self.config.sharding.rules
    return (g, nnx.to_pure_dict(parallel.state_shardings(a_p, mesh, rules)),
            nnx.to_pure_dict(parallel.state_shardings(a_r, mesh, rules)))

  def save_prm(self, directory: str, prm, text, summary: dict) -> None:
    del text  # the published UMT5 of config.wan.path
    checkpoint.save_final(directory, {"prm": {"params": prm[1], "rest": prm[2]}}, summary,
                          config_json=self.config.to_json_best_effort(indent=2))

  def prm_fn(self, graphdef):
    return wan_prm.make_prm_fn(graphdef)

