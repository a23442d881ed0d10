"""Latent video diffusion transformer (DiT) predicting the flow-matching velocity.

``VideoDiT(x_t [B,T,h,w,C], t [B], text) -> v [B,T,h,w,C]`` (float32), with ``text`` the
dict of ``models.text.TextEncoder`` (``tokens [B,L,Dt]``, ``mask [B,L]``, ``pooled [B,Dp]``
or None). Conditioning: adaLN-zero from time (sincos of 1000 t + MLP) plus pooled text;
cross-attention to the text tokens. t = 1 is noise, t = 0 data.
"""
from __future__ import annotations

from typing import Any, Sequence

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from euphonium_jax.models import layers


class Attention(nnx.Module):
  """Multi-head (cross-)attention with RMS-normalised queries and keys."""

  def __init__(self, width: int, kv_dim: int, heads: int, *, rngs: nnx.Rngs, dtype,
               impl: str | None, zero_out: bool = False):
    self.heads, self.dtype, self.impl = heads, dtype, impl
    head_dim = width // heads
    self.q = layers.dense(width, width, ('embed', 'heads'), rngs=rngs, dtype=dtype)
    self.k = layers.dense(kv_dim, width, ('embed', 'heads'), rngs=rngs, dtype=dtype)
    self.v = layers.dense(kv_dim, width, ('embed', 'heads'), rngs=rngs, dtype=dtype)
    self.q_norm = layers.rms_norm(head_dim, rngs=rngs, name='kv')
    self.k_norm = layers.rms_norm(head_dim, rngs=rngs, name='kv')
    self.out = layers.dense(width, width, ('heads', 'embed'), rngs=rngs, dtype=dtype,
                            zero=zero_out)

  def __call__(self, x: jax.Array, ctx: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x [B,Lq,D], ctx [B,Lk,Dkv], mask [B,Lk] or None -> [B,Lq,D] float32."""
    split = lambda a: einops.rearrange(a, 'b l (n h) -> b l n h', n=self.heads)
    q = self.q_norm(split(self.q(x)))
    k = self.k_norm(split(self.k(ctx)))
    h = layers.attention(q, k, split(self.v(ctx)), mask, self.impl, self.dtype)
    return self.out(einops.rearrange(h, 'b l n h -> b l (n h)'))


class DiTBlock(nnx.Module):
  """adaLN-zero self-attention, cross-attention to text, adaLN-zero MLP."""

  def __init__(self, width: int, text_dim: int, heads: int, mlp_ratio: int, *,
               rngs: nnx.Rngs, dtype, impl: str | None):
    self.norm1 = layers.layer_norm(width, rngs=rngs, affine=False)
    self.attn = Attention(width, width, heads, rngs=rngs, dtype=dtype, impl=impl)
    self.norm_x = layers.layer_norm(width, rngs=rngs)
    self.cross = Attention(width, text_dim, heads, rngs=rngs, dtype=dtype, impl=impl,
                           zero_out=True)
    self.norm2 = layers.layer_norm(width, rngs=rngs, affine=False)
    self.fc1 = layers.dense(width, mlp_ratio * width, ('embed', 'mlp'), rngs=rngs,
                            dtype=dtype)
    self.fc2 = layers.dense(mlp_ratio * width, width, ('mlp', 'embed'), rngs=rngs,
                            dtype=dtype)
    self.ada = layers.dense(width, 6 * width, ('embed', 'mlp'), rngs=rngs, zero=True)

  def __call__(self, x: jax.Array, cond: jax.Array, tokens: jax.Array,
               mask: jax.Array) -> jax.Array:
    """x [B,L,D], cond [B,D], tokens [B,Lt,Dt], mask [B,Lt] -> [B,L,D] float32."""
    s1, sc1, g1, s2, sc2, g2 = jnp.split(self.ada(jax.nn.silu(cond)), 6, axis=-1)
    h = layers.modulate(self.norm1(x), s1, sc1)
    x = x + g1[:, None] * self.attn(h, h, None)
    x = x + self.cross(self.norm_x(x), tokens, mask)
    h = layers.modulate(self.norm2(x), s2, sc2)
    return x + g2[:, None] * self.fc2(jax.nn.gelu(self.fc1(h)))


class VideoTrunk(nnx.Module):
  """What the velocity field and the PRM share: patch embedding, 3D positions, the
  conditioning vector (time embedding of 1000 t plus pooled text) and DiT blocks.

  Subclasses call ``_init_trunk`` in their constructor; the parameters it creates carry the
  same names in every subclass (``embed``, ``pos``, ``t_fc1``, ``t_fc2``, ``pooled_proj``,
  ``blocks``), so a PRM can start from the velocity model's first blocks by key.
  """

  def _init_trunk(self, *, in_channels, text_dim, pooled_dim, width, depth, heads, mlp_ratio,
                  patch_size, latent_shape, pos_embed, dtype, attention_impl, rngs, key):
    if width % heads:
      raise ValueError(f'{key}.width={width} must be divisible by {key}.heads={heads}')
    if pos_embed not in ('sincos', 'learned'):
      raise ValueError(f"{key}.pos_embed={pos_embed!r}; allowed: 'sincos', 'learned'")
    dt = layers.compute_dtype(dtype)
    self.in_channels, self.width = in_channels, width
    self.patch = tuple(patch_size)
    self.pos_embed = pos_embed
    self.impl = None if attention_impl in (None, 'auto') else attention_impl
    self.patch_dim = in_channels * self.patch[0] * self.patch[1] * self.patch[2]
    self.embed = layers.dense(self.patch_dim, width, (None, 'embed'), rngs=rngs, dtype=dt)
    if pos_embed == 'learned':
      if latent_shape is None:
        raise ValueError(f"{key}.latent_shape is required with {key}.pos_embed='learned'")
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
        DiTBlock(width, text_dim, heads, mlp_ratio, rngs=rngs, dtype=dt, impl=self.impl)
        for _ in range(depth)])
    return dt

  def _pos(self, grid: tuple[int, int, int]) -> jax.Array:
    """Positional encoding of a (T', h', w') token grid -> [T'*h'*w', D]."""
    if self.pos_embed == 'sincos':
      return layers.sincos_3d(grid, self.width)
    if grid != self.grid:
      raise ValueError(f'token grid {grid} != latent_shape / patch {self.grid}')
    t, h, w = self.pos['t'][...], self.pos['h'][...], self.pos['w'][...]
    pos = t[:, None, None] + h[None, :, None] + w[None, None, :]
    return pos.reshape(-1, self.width)

  def condition(self, t: jax.Array, text: dict[str, Any]) -> jax.Array:
    """t [B] in [0,1], text dict -> conditioning vector [B, D]."""
    temb = layers.sincos_1d(1000.0 * t.astype(jnp.float32), 256)
    cond = self.t_fc2(jax.nn.silu(self.t_fc1(temb)))
    pooled = text.get('pooled')
    if self.pooled_proj is not None and pooled is not None:
      cond = cond + self.pooled_proj(pooled.astype(jnp.float32))
    return cond

  def _inputs(self, x: jax.Array, t: jax.Array, text: dict[str, Any]):
    """-> (tokens h [B,L,D], cond [B,D], text tokens [B,Lt,Dt], text mask [B,Lt], grid)."""
    tt, hh, ww, c = x.shape[1:]
    pt, ph, pw = self.patch
    if tt % pt or hh % ph or ww % pw or c != self.in_channels:
      raise ValueError(f'latent {x.shape} does not fit patch {self.patch} / '
                       f'in_channels {self.in_channels}')
    grid = (tt // pt, hh // ph, ww // pw)
    tokens = einops.rearrange(
        x.astype(jnp.float32), 'b (t pt) (h ph) (w pw) c -> b (t h w) (pt ph pw c)',
        pt=pt, ph=ph, pw=pw)
    h = self.embed(tokens) + self._pos(grid)[None]
    ctx = text['tokens'].astype(jnp.float32)
    mask = text.get('mask')
    mask = jnp.ones(ctx.shape[:2], bool) if mask is None else mask.astype(bool)
    return h, self.condition(t, text), ctx, mask, grid


class VideoDiT(VideoTrunk):
  """Video DiT over latents [B,T,h,w,C].

  Args:
    in_channels: latent channels C.
    text_dim: dim of the text tokens. pooled_dim: dim of the pooled text vector, or
      None for encoders without one (then ``text['pooled']`` is ignored).
    width/depth/heads/mlp_ratio: transformer sizes.
    patch_size: (pt, ph, pw) patch over (T, h, w).
    latent_shape: (T, h, w) of the inputs; only needed (and checked) for
      ``pos_embed='learned'`` (factorised t/h/w tables of these sizes / patch).
    pos_embed: 'sincos' (fixed 3D, any grid) | 'learned'.
    remat: 'none' | 'full' | 'dots' | 'dots_saveable' (nnx.remat policy over blocks).
    dtype: 'float32' | 'bfloat16' matmul dtype (float32 params, accumulation, residual).
    attention_impl: ``implementation`` of ``jax.nn.dot_product_attention``.
  """

  def __init__(self, in_channels: int = 4, text_dim: int = 64, pooled_dim: int | None = 64,
               width: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: int = 4,
               patch_size: Sequence[int] = (1, 2, 2),
               latent_shape: Sequence[int] | None = None, pos_embed: str = 'sincos',
               remat: str = 'none', dtype: str = 'float32', attention_impl: str = 'xla',
               *, rngs: nnx.Rngs):
    self.use_remat, self.policy = layers.remat_policy(remat)
    self._init_trunk(in_channels=in_channels, text_dim=text_dim, pooled_dim=pooled_dim,
                     width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                     patch_size=patch_size, latent_shape=latent_shape, pos_embed=pos_embed,
                     dtype=dtype, attention_impl=attention_impl, rngs=rngs, key='model')
    self.final_norm = layers.layer_norm(width, rngs=rngs, affine=False)
    self.final_ada = layers.dense(width, 2 * width, ('embed', 'mlp'), rngs=rngs, zero=True)
    self.final = layers.dense(width, self.patch_dim, ('embed', None), rngs=rngs,
                              zero=True)

  def __call__(self, x: jax.Array, t: jax.Array, text: dict[str, Any]) -> jax.Array:
    """x [B,T,h,w,C], t [B], text dict -> velocity [B,T,h,w,C] float32."""
    h, cond, ctx, mask, grid = self._inputs(x, t, text)
    pt, ph, pw = self.patch

    def apply(block, h, cond, ctx, mask):
      return block(h, cond, ctx, mask)

    if self.use_remat:
      apply = nnx.remat(apply, policy=self.policy)
    for block in self.blocks:
      h = apply(block, h, cond, ctx, mask)
    shift, scale = jnp.split(self.final_ada(jax.nn.silu(cond)), 2, axis=-1)
    out = self.final(layers.modulate(self.final_norm(h), shift, scale))
    return einops.rearrange(
        out.astype(jnp.float32), 'b (t h w) (pt ph pw c) -> b (t pt) (h ph) (w pw) c',
        t=grid[0], h=grid[1], w=grid[2], pt=pt, ph=ph, pw=pw)
