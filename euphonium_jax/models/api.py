"""Configs, factories and pure-function adapters of the embedded-world networks.

Factories build modules with eager sharding off, so parameters carry logical axis names
but no device placement (place them with the rules table of ``parallel``). Adapters
turn a graphdef into a pure function of explicit state pytrees:

  graphdef, state = nnx.split(model)          # or (graphdef, params, rest) with filters
  velocity = make_velocity_fn(graphdef)
  v = jax.jit(velocity)(state, x_t, t, text)   # jit / scan / grad act on explicit pytrees

``state`` may be one ``nnx.State`` or a tuple of them (the pieces of a filtered split).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
from flax import nnx

from euphonium_jax.models import layers
from euphonium_jax.models.dit import VideoDiT
from euphonium_jax.models.text import TextEncoder
from euphonium_jax.models.vae import VideoVAE


def default_model_configs() -> ml_collections.ConfigDict:
  """Defaults of the embedded world: 8 x 32 x 32 RGB videos -> 8 x 8 x 8 x 4 latents."""
  cfg = ml_collections.ConfigDict()
  cfg.vae = ml_collections.ConfigDict(dict(
      latent_channels=4, channels=(16, 32, 32), num_res_blocks=(0, 0, 2),
      temporal_downsample=False, dtype='float32', kl_weight=1e-4,
      frames=8, resolution=32))
  cfg.text = ml_collections.ConfigDict(dict(
      vocab_size=32, width=64, depth=2, heads=4, mlp_ratio=4, max_length=8,
      pooled_dim=64))
  cfg.model = ml_collections.ConfigDict(dict(
      in_channels=4, latent_shape=(8, 8, 8), text_dim=64, pooled_dim=64,
      width=128, depth=4, heads=4, mlp_ratio=4, patch_size=(1, 2, 2),
      pos_embed='sincos', remat='none', dtype='float32', attention_impl='xla'))
  return cfg


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
  if not ok:
    raise ValueError(f'{key}={value!r} is invalid: {allowed}')


def validate_model_configs(cfg: ml_collections.ConfigDict) -> None:
  """Checks sizes within and across cfg.vae / cfg.text / cfg.model; ValueError names the key."""
  vae, text, model = cfg.vae, cfg.text, cfg.model
  _require(len(vae.channels) >= 2, 'vae.channels', vae.channels, 'at least 2 levels')
  factor = 2 ** (len(vae.channels) - 1)
  _require(vae.resolution % factor == 0, 'vae.resolution', vae.resolution,
           f'must be divisible by the VAE factor {factor}')
  tf = 2 if vae.temporal_downsample else 1
  _require(vae.frames % tf == 0, 'vae.frames', vae.frames,
           'must be even with vae.temporal_downsample')
  _require(text.width % text.heads == 0, 'text.width', text.width,
           f'must be divisible by text.heads={text.heads}')
  _require(model.width % model.heads == 0, 'model.width', model.width,
           f'must be divisible by model.heads={model.heads}')
  _require(len(model.patch_size) == 3, 'model.patch_size', model.patch_size,
           'must be (pt, ph, pw)')
  _require(model.in_channels == vae.latent_channels, 'model.in_channels',
           model.in_channels, f'must equal vae.latent_channels={vae.latent_channels}')
  _require(model.text_dim == text.width, 'model.text_dim', model.text_dim,
           f'must equal text.width={text.width}')
  _require(model.pooled_dim in (None, 0, text.pooled_dim), 'model.pooled_dim',
           model.pooled_dim, f'must be None or text.pooled_dim={text.pooled_dim}')
  expected = (vae.frames // tf, vae.resolution // factor, vae.resolution // factor)
  _require(tuple(model.latent_shape) == expected, 'model.latent_shape',
           model.latent_shape, f'must be the VAE latent grid {expected}')
  for axis, (size, p) in enumerate(zip(model.latent_shape, model.patch_size)):
    _require(p > 0 and size % p == 0, f'model.patch_size[{axis}]', p,
             f'must divide model.latent_shape[{axis}]={size}')
  for key in ('dtype',):
    layers.compute_dtype(model[key])
    layers.compute_dtype(vae[key])
  layers.remat_policy(model.remat)
  _require(model.pos_embed in ('sincos', 'learned'), 'model.pos_embed', model.pos_embed,
           "allowed: 'sincos', 'learned'")
  _require(model.attention_impl in ('xla', 'cudnn', 'auto', 'blocked', None),
           'model.attention_impl', model.attention_impl,
           "allowed: 'xla', 'cudnn', 'auto', 'blocked'")


def make_vae(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> VideoVAE:
  """VideoVAE from cfg.vae."""
  return layers.build(
      VideoVAE, latent_channels=cfg.latent_channels, channels=tuple(cfg.channels),
      num_res_blocks=(cfg.num_res_blocks if isinstance(cfg.num_res_blocks, int)
                      else tuple(cfg.num_res_blocks)),
      temporal_downsample=cfg.temporal_downsample, dtype=cfg.dtype, rngs=rngs)


def make_text_encoder(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs,
                      vocab_size: int | None = None) -> TextEncoder:
  """TextEncoder from cfg.text; ``vocab_size`` (e.g. ``len(tokenizer)``) must fit."""
  if vocab_size is not None and vocab_size > cfg.vocab_size:
    raise ValueError(f'text.vocab_size={cfg.vocab_size} is smaller than the tokenizer '
                     f'vocabulary ({vocab_size})')
  return layers.build(
      TextEncoder, cfg.vocab_size, width=cfg.width, depth=cfg.depth, heads=cfg.heads,
      mlp_ratio=cfg.mlp_ratio, max_length=cfg.max_length, pooled_dim=cfg.pooled_dim,
      rngs=rngs)


def make_dit(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> VideoDiT:
  """VideoDiT from cfg.model."""
  return layers.build(
      VideoDiT, in_channels=cfg.in_channels, text_dim=cfg.text_dim,
      pooled_dim=cfg.pooled_dim or None, width=cfg.width, depth=cfg.depth,
      heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, patch_size=tuple(cfg.patch_size),
      latent_shape=tuple(cfg.latent_shape), pos_embed=cfg.pos_embed, remat=cfg.remat,
      dtype=cfg.dtype, attention_impl=cfg.attention_impl, rngs=rngs)


def _merge(graphdef: nnx.GraphDef, state) -> nnx.Module:
  if isinstance(state, (tuple, list)):
    return nnx.merge(graphdef, *state)
  return nnx.merge(graphdef, state)


def make_velocity_fn(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
  """-> velocity(state, x_t [B,T,h,w,C], t [B], text dict) -> v [B,T,h,w,C] float32."""
  def velocity(state, x_t, t, text):
    return _merge(graphdef, state)(x_t, t, text)
  return velocity


def make_text_fn(graphdef: nnx.GraphDef) -> Callable[..., dict]:
  """-> encode_text(state, ids [B,L], mask [B,L]) -> dict(tokens, mask, pooled)."""
  def encode_text(state, ids, mask):
    return _merge(graphdef, state)(ids, mask)
  return encode_text


def make_encode_fn(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
  """-> encode(state, frames [B,T,H,W,3]) -> normalised latents [B,t,h,w,C]."""
  def encode(state, frames):
    return _merge(graphdef, state).encode_latents(frames)
  return encode


def make_decode_fn(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
  """-> decode(state, z [B,t,h,w,C] normalised) -> frames [B,T,H,W,3] in [0,1]."""
  def decode(state, z):
    return _merge(graphdef, state).decode_latents(z)
  return decode
