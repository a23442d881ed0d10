"""The Wan2.1 model bundle: the same calls as `embedded` (the grpo stage and `Generator` use
either), on a diffusers Wan pipeline folder.

`config.wan.path` is a folder in the published layout (``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, each with its config and safetensors weights). The flow runs
in Wan's normalised latent space ([B, 1 + (F - 1) / 4, H / 8, W / 8, 16]); decoding
de-normalises and maps the VAE's [-1, 1] video to [0, 1] for the rewards. With
``wan.lora_rank > 0`` only the adapters are trained and the KL reference is the same network
with zero adapters; otherwise every transformer parameter is. Prompts are the embedded world's
captions (the pixel reward `shapes_fidelity` parses them); their UMT5 embeddings are computed
once per run.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from euphonium_jax import checkpoint, embedded, parallel, training
from euphonium_jax.models.wan import loading, lora
from euphonium_jax.models.wan import transformer as wt
from euphonium_jax.models.wan import umt5 as umt5_lib
from euphonium_jax.models.wan import umt5_prompts
from euphonium_jax.models.wan import vae as vae_lib

NULL_PROMPT = ""
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer")


def check_folder(path: str) -> None:
  """The pipeline folder has the four parts, each with its config: ValueError otherwise."""
  from euphonium_jax.config import resolve_path
  root = resolve_path(path)
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
        loading.safetensors_files(d)
      except (loading.WeightsError, FileNotFoundError) as e:
        problems.append(str(e))
  if problems:
    raise ValueError(f"config.wan.path = {path!r} is not a Wan diffusers folder: "
                     + "; ".join(problems))


def _root(config) -> str:
  from euphonium_jax.config import resolve_path
  return resolve_path(config.wan.path)


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


def load_networks(config, workdir: str, mesh):
  """(vae, text, model) as (graphdef, params, rest) triples, placed with their shardings, and
   a description of the source."""
  root, rules, w = _root(config), config.sharding.rules, config.wan
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


def model_param_shardings(config, mesh):
  abstract = nnx.state(wt.abstract(transformer_config(config)), _trainable(config))
  return training.param_shardings(abstract, mesh, config.sharding.rules)


def reference_params(config, params):
  """The KL reference: a copy of the parameters, or zero adapters (= the published model)."""
  if config.wan.lora_rank:
    return jax.tree.map(jnp.zeros_like, params)
  return jax.tree.map(jnp.copy, params)


# ------------------------------------------------------------------------------ Prompts


@functools.lru_cache(maxsize=4)
def _tokenizer(folder: str):
  return umt5_prompts.load_tokenizer(folder)


def tokenize(config, prompts) -> tuple[np.ndarray, np.ndarray]:
  tok = _tokenizer(os.path.join(_root(config), "tokenizer"))
  return umt5_prompts.tokenize_prompts(tok, list(prompts), config.wan.max_text_length)


def prompt_table(config) -> embedded.PromptTable:
  """Every caption of the world (indexed as `embedded.combo_index`) and the null caption."""
  caps = embedded.all_captions() + [NULL_PROMPT]
  ids, mask = tokenize(config, caps)
  return embedded.PromptTable(ids=ids, mask=mask)


# -------------------------------------------------------------------------- Pure calls


def velocity_fn(graphdef):
  """velocity((params, rest), x_t, t, text) -> v, the project's time convention."""
  def velocity(state, x, t, text):
    return nnx.merge(graphdef, *state)(x, t, text)
  return velocity


def text_fn(graphdef):
  def encode(state, ids, mask):
    return nnx.merge(graphdef, *state)(ids, mask)
  return encode


def decode_fn(graphdef):
  """decode((params, rest), normalised latents) -> frames [B, F, H, W, 3] in [0, 1]."""
  def decode(state, z):
    vae = nnx.merge(graphdef, *state)
    return (vae.decode(vae.denormalize_latents(z)) + 1.0) * 0.5
  return decode


def save_final(directory: str, state_params, model_rest, vae, text, summary, config) -> None:
  """The trained parameters (adapters, or the whole transformer) and, with LoRA, the adapters
  as diffusers-loadable safetensors (`lora.safetensors`); VAE and text encoder are the
  published ones (`summary['source']`)."""
  checkpoint.save_final(directory, {"model": {"params": state_params}}, summary)
  if config.wan.lora_rank:
    tree = jax.tree.map(parallel.to_host, dict(state_params))
    tree["lora_scale"] = parallel.to_host(model_rest["lora_scale"])
    if jax.process_index() == 0:
      lora.export(tree, os.path.join(directory, "lora.safetensors"))
