"""Latent process reward model (PRM): ``R_phi(x_t, t, text) -> [B]``, a scalar per sample.

Same inputs as the velocity field (``x_t [B,T,h,w,C]``, ``t [B]``, the text dict of
``models.text.TextEncoder``). Body: the first K blocks of the video transformer (patch
embed, time embed of 1000 t plus pooled text, adaLN-zero blocks with cross-attention), then
a learned-query attention pool over the video tokens and an MLP head on the pooled queries
and the conditioning vector. The trunk's submodules carry the same names as ``VideoDiT``'s
(``embed``, ``pos``, ``t_fc1``, ``t_fc2``, ``pooled_proj``, ``blocks``), so ``init_from_base``
copies the base model's first K blocks by key.

Pure adapter (``make_prm_fn``): ``prm(state, x_t, t, text) -> [B] float32``, differentiable
in ``x_t`` (the guidance gradient of the sampler).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from euphonium_jax.models import layers
from euphonium_jax.models.dit import Attention, VideoTrunk

TRUNK_KEYS = ('embed', 'pos', 't_fc1', 't_fc2', 'pooled_proj')


class LatentPRM(VideoTrunk):
  """PRM over latents [B,T,h,w,C] -> a logit [B] float32.

  Args:
    in_channels/text_dim/pooled_dim/width/heads/mlp_ratio/patch_size/latent_shape/
      pos_embed/dtype/attention_impl: as in ``VideoDiT`` (the trunk is its first blocks).
    depth: K, the number of transformer blocks of the trunk (0 allowed: embed + pool).
    num_queries: learned queries of the attention pool.
    head_width: hidden width of the MLP head.
  """

  def __init__(self, in_channels: int = 4, text_dim: int = 64, pooled_dim: int | None = 64,
               width: int = 128, depth: int = 2, heads: int = 4, mlp_ratio: int = 4,
               patch_size: Sequence[int] = (1, 2, 2),
               latent_shape: Sequence[int] | None = None, pos_embed: str = 'sincos',
               num_queries: int = 4, head_width: int = 128, dtype: str = 'float32',
               attention_impl: str = 'xla', *, rngs: nnx.Rngs):
    dt = self._init_trunk(in_channels=in_channels, text_dim=text_dim, pooled_dim=pooled_dim,
                          width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                          patch_size=patch_size, latent_shape=latent_shape,
                          pos_embed=pos_embed, dtype=dtype, attention_impl=attention_impl,
                          rngs=rngs, key='prm')
    impl = self.impl
    # Head: learned-query attention pool, then an MLP on [queries | conditioning].
    self.queries = nnx.Param(0.02 * jax.random.normal(rngs.params(), (num_queries, width)),
                             out_sharding=(None, 'embed'))
    self.pool = Attention(width, width, heads, rngs=rngs, dtype=dt, impl=impl)
    self.pool_norm = layers.layer_norm(width, rngs=rngs)
    self.head_fc1 = layers.dense((num_queries + 1) * width, head_width, (None, 'mlp'),
                                 rngs=rngs)
    self.head_fc2 = layers.dense(head_width, 1, ('mlp', None), rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array, text: dict[str, Any]) -> jax.Array:
    """x [B,T,h,w,C], t [B], text dict -> logit [B] float32."""
    b = x.shape[0]
    h, cond, ctx, mask, _ = self._inputs(x, t, text)
    for block in self.blocks:
      h = block(h, cond, ctx, mask)
    q = jnp.broadcast_to(self.queries[...][None], (b,) + self.queries.shape)
    pooled = self.pool_norm(self.pool(q, h, None)).reshape(b, -1)
    z = jnp.concatenate([pooled, jax.nn.silu(cond)], axis=-1)
    return self.head_fc2(jax.nn.gelu(self.head_fc1(z)))[:, 0].astype(jnp.float32)


def default_prm_config() -> ml_collections.ConfigDict:
  """Network sizes of the PRM (the trunk's other sizes follow the velocity model)."""
  return ml_collections.ConfigDict(dict(depth=2, num_queries=4, head_width=128))


def make_prm(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> LatentPRM:
  """LatentPRM from a flat config: the VideoDiT keys of cfg.model (width, heads, ...) plus
  depth (K), num_queries, head_width."""
  return layers.build(
      LatentPRM, in_channels=cfg.in_channels, text_dim=cfg.text_dim,
      pooled_dim=cfg.pooled_dim or None, width=cfg.width, depth=cfg.depth, heads=cfg.heads,
      mlp_ratio=cfg.mlp_ratio, patch_size=tuple(cfg.patch_size),
      latent_shape=tuple(cfg.latent_shape), pos_embed=cfg.pos_embed,
      num_queries=cfg.num_queries, head_width=cfg.head_width, dtype=cfg.dtype,
      attention_impl=cfg.attention_impl, rngs=rngs)


def make_prm_fn(graphdef: nnx.GraphDef, sigmoid: bool = False) -> Callable[..., jax.Array]:
  """-> prm(state, x_t [B,T,h,w,C], t [B], text dict) -> [B] float32 (a logit, or its
  sigmoid with ``sigmoid=True``). ``state`` is an ``nnx.State``, a pure dict, or a tuple
  of them (the pieces of a filtered split)."""
  def prm(state, x_t, t, text):
    parts = state if isinstance(state, (tuple, list)) else (state,)
    r = nnx.merge(graphdef, *parts)(x_t, t, text)
    return jax.nn.sigmoid(r) if sigmoid else r
  return prm


def init_from_base(prm_params: dict, base_params: dict) -> dict:
  """PRM params (pure dict) with the trunk copied from the velocity model's params.

  Copies ``embed``, ``pos``, ``t_fc1``, ``t_fc2``, ``pooled_proj`` and the first K blocks
  (K = the PRM's depth); the pool and head keep their own initialisation. Raises ValueError
  when a copied leaf's shape differs (the PRM's width/heads/patch must be the base's).
  """
  out = dict(prm_params)
  for key in TRUNK_KEYS + ('blocks',):
    if key not in prm_params:
      continue
    if key not in base_params:
      raise ValueError(f'the base model has no {key!r} parameters to initialise the PRM')
    src = base_params[key]
    if key == 'blocks':
      src = {k: src[k if k in src else str(k)] for k in prm_params[key]}
    shapes = lambda tree: jax.tree.map(jnp.shape, tree)
    if shapes(src) != shapes(prm_params[key]):
      raise ValueError(f'prm.init_from_base: the base model\'s {key!r} parameters '
                       f'{shapes(src)} do not match the PRM\'s {shapes(prm_params[key])}')
    out[key] = jax.tree.map(lambda a: jnp.array(a, copy=True), src)  # never alias the base
  return out
