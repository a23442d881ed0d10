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

import einops
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from euphonium_jax.models import layers
from euphonium_jax.models.dit import Attention, DiTBlock

TRUNK_KEYS = ('embed', 'pos', 't_fc1', 't_fc2', 'pooled_proj')


class LatentPRM(nnx.Module):
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
    if width % heads:
      raise ValueError(f'prm width={width} must be divisible by heads={heads}')
    if pos_embed not in ('sincos', 'learned'):
      raise ValueError(f"prm pos_embed={pos_embed!r}; allowed: 'sincos', 'learned'")
    dt = layers.compute_dtype(dtype)
    impl = None if attention_impl in (None, 'auto') else attention_impl
    self.in_channels, self.width, self.patch = in_channels, width, tuple(patch_size)
    self.pos_embed = pos_embed
    patch_dim = in_channels * self.patch[0] * self.patch[1] * self.patch[2]
    # Trunk: the names and shapes of VideoDiT's (init_from_base copies them).
    self.embed = layers.dense(patch_dim, width, (None, 'embed'), rngs=rngs, dtype=dt)
    if pos_embed == 'learned':
      if latent_shape is None:
        raise ValueError("prm latent_shape is required with pos_embed='learned'")
      self.grid = tuple(s // p for s, p in zip(latent_shape, self.patch))
      self.pos = nnx.Dict({
          ax: nnx.Param(0.02 * jax.random.normal(rngs.params(), (n, width)),
                        out_sharding=(None, 'embed'))
          for ax, n in zip('thw', self.grid)})
    self.t_fc1 = layers.dense(256, width, (None, 'embed'), rngs=rngs)
    self.t_fc2 = layers.dense(width, width, ('embed', 'mlp'), rngs=rngs)
    self.pooled_proj = (layers.dense(pooled_dim, width, ('embed', 'mlp'), rngs=rngs)
                        if pooled_dim else None)
    self.blocks = nnx.List([
        DiTBlock(width, text_dim, heads, mlp_ratio, rngs=rngs, dtype=dt, impl=impl)
        for _ in range(depth)])
    # Head: learned-query attention pool, then an MLP on [queries | conditioning].
    self.queries = nnx.Param(0.02 * jax.random.normal(rngs.params(), (num_queries, width)),
                             out_sharding=(None, 'embed'))
    self.pool = Attention(width, width, heads, rngs=rngs, dtype=dt, impl=impl)
    self.pool_norm = layers.layer_norm(width, rngs=rngs)
    self.head_fc1 = layers.dense((num_queries + 1) * width, head_width, (None, 'mlp'),
                                 rngs=rngs)
    self.head_fc2 = layers.dense(head_width, 1, ('mlp', None), rngs=rngs)

  def _pos(self, grid: tuple[int, int, int]) -> jax.Array:
    """Positional encoding of a (T', h', w') token grid -> [T'*h'*w', D] (as VideoDiT)."""
    if self.pos_embed == 'sincos':
      return layers.sincos_3d(grid, self.width)
    if grid != self.grid:
      raise ValueError(f'token grid {grid} != prm latent_shape / patch {self.grid}')
    t, h, w = self.pos['t'][...], self.pos['h'][...], self.pos['w'][...]
    return (t[:, None, None] + h[None, :, None] + w[None, None, :]).reshape(-1, self.width)

  def condition(self, t: jax.Array, text: dict[str, Any]) -> jax.Array:
    """t [B] in [0,1], text dict -> conditioning vector [B, D] (time 1000 t + pooled text)."""
    temb = layers.sincos_1d(1000.0 * t.astype(jnp.float32), 256)
    cond = self.t_fc2(jax.nn.silu(self.t_fc1(temb)))
    pooled = text.get('pooled')
    if self.pooled_proj is not None and pooled is not None:
      cond = cond + self.pooled_proj(pooled.astype(jnp.float32))
    return cond

  def __call__(self, x: jax.Array, t: jax.Array, text: dict[str, Any]) -> jax.Array:
    """x [B,T,h,w,C], t [B], text dict -> logit [B] float32."""
    b, tt, hh, ww, c = x.shape
    pt, ph, pw = self.patch
    if tt % pt or hh % ph or ww % pw or c != self.in_channels:
      raise ValueError(f'latent {x.shape} does not fit patch {self.patch} / '
                       f'in_channels {self.in_channels}')
    grid = (tt // pt, hh // ph, ww // pw)
    tokens = einops.rearrange(
        x.astype(jnp.float32), 'b (t pt) (h ph) (w pw) c -> b (t h w) (pt ph pw c)',
        pt=pt, ph=ph, pw=pw)
    h = self.embed(tokens) + self._pos(grid)[None]
    cond = self.condition(t, text)
    ctx = text['tokens'].astype(jnp.float32)
    mask = text.get('mask')
    mask = jnp.ones(ctx.shape[:2], bool) if mask is None else mask.astype(bool)
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
