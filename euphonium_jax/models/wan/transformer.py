"""Wan2.1 video transformer (diffusers' ``WanTransformer3DModel``, text-to-video) in Flax NNX.

Same computation as the reference, channels-last: ``velocity = model(x [B,T,H,W,C], t [B],
text)`` with the project's time convention (``t = 1`` noise, ``x_t = (1 - t) x_0 + t eps``,
velocity ``eps - x_0``); Wan's timestep is ``1000 t``. ``text['tokens']`` [B,L,text_dim] are
the UMT5 embeddings, zeroed past each prompt as the Wan pipeline pads them; Wan attends to all
L positions (no mask) and has no pooled vector, so ``text['mask']`` and ``text['pooled']`` are
not used.

Structure (names follow the reference so that the weight table in ``WAN_RULES`` reads 1:1):
3D patch embedding (a conv with kernel = stride = patch, run as a matmul over patches);
``condition_embedder`` = sinusoidal time features (cos | sin, 256) -> ``time_embedder`` MLP
-> ``time_proj`` to the six-way adaLN vector, and ``text_embedder`` (tanh-GELU MLP); blocks of
self-attention with RMSNorm over all heads on q and k and 3D RoPE, cross-attention to the text
after the affine ``norm2``, tanh-GELU FFN, each modulated by the per-block
``scale_shift_table`` + the time projection; output norm modulated by the final table + the
time embedding, ``proj_out`` and unpatchify.

Blocks are built stacked (``nnx.vmap``, leading axis named 'layers') and applied with
``jax.lax.scan``; ``remat`` picks a checkpoint policy (``layers.remat_policy``). Attention runs
through ``layers.attention`` with ``attention_impl``: 'auto' (the default) is the query-blocked,
heads-first attention on CPU and cuDNN on a GPU (bf16, head sizes cuDNN takes:
``layers.auto_impl``); 'xla' | 'cudnn' | 'blocked' force one.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from euphonium_jax.models import layers


@dataclasses.dataclass(frozen=True)
class WanConfig:
  """The reference's config.json keys (text-to-video subset) plus our execution options."""
  patch_size: tuple[int, int, int] = (1, 2, 2)
  num_attention_heads: int = 12
  attention_head_dim: int = 128
  in_channels: int = 16
  out_channels: int = 16
  text_dim: int = 4096
  freq_dim: int = 256
  ffn_dim: int = 8960
  num_layers: int = 30
  cross_attn_norm: bool = True
  qk_norm: str | None = 'rms_norm_across_heads'
  eps: float = 1e-6
  rope_max_seq_len: int = 1024
  # Ours: matmul dtype ('float32' | 'bfloat16', float32 accumulation), remat policy name,
  # attention implementation (layers.ATTENTION_IMPLS; 'auto': layers.auto_impl, blocked on
  # CPU, cuDNN on a GPU where it applies).
  dtype: str = 'float32'
  remat: str = 'none'
  attention_impl: str | None = 'auto'
  # LoRA adapters (rank 0 = none) on the named projections of every block (diffusers/peft
  # names: to_q, to_k, to_v, to_out.0 of both attentions; ffn.net.0.proj, ffn.net.2).
  lora_rank: int = 0
  lora_alpha: float = 1.0
  lora_targets: tuple[str, ...] = ('to_q', 'to_k', 'to_v', 'to_out.0')
  # Mesh axes of the activations' batch dimension, constrained at every block boundary (needs
  # an ambient mesh, jax.set_mesh); () lets XLA choose. With FSDP-sharded weights, XLA may
  # otherwise keep activations replicated and gather the batch instead of the weights.
  batch_axes: tuple[str, ...] = ()

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @classmethod
  def from_reference(cls, cfg: dict[str, Any], **ours) -> 'WanConfig':
    """From a diffusers config.json dict; image-to-video keys must be absent/None."""
    for key in ('image_dim', 'added_kv_proj_dim', 'pos_embed_seq_len'):
      if cfg.get(key) is not None:
        raise ValueError(f'{key}={cfg[key]!r}: only the text-to-video Wan transformer is '
                         'supported (no image conditioning)')
    if cfg.get('qk_norm', 'rms_norm_across_heads') != 'rms_norm_across_heads':
      raise ValueError(f"qk_norm={cfg['qk_norm']!r}: only 'rms_norm_across_heads' is supported")
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in cfg.items() if k in names}
    if 'patch_size' in kw:
      kw['patch_size'] = tuple(kw['patch_size'])
    return cls(**kw, **ours)


# ---------------------------------------------------------------------- Functional parts


def layer_norm(x: jax.Array, eps: float, scale=None, bias=None) -> jax.Array:
  """LayerNorm over the last axis in float32 (torch's two-pass variance)."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + eps)
  if scale is not None:
    y = y * scale + bias
  return y


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps) * scale


def timestep_features(t: jax.Array, dim: int) -> jax.Array:
  """diffusers' Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0): [B] -> [B, dim]."""
  return layers.sincos_1d(t, dim)


def rope_split(head_dim: int) -> tuple[int, int, int]:
  """Head-dimension split into (time, height, width) rotary parts, as diffusers does it."""
  h = w = 2 * (head_dim // 6)
  return head_dim - h - w, h, w


def rope_tables(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0):
  """cos/sin [L, head_dim // 2] of the 3D RoPE for a (F, H, W) token grid (float64 -> f32)."""
  parts = []
  for n, d in zip(grid, rope_split(head_dim)):
    freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64)[: d // 2] / d)
    parts.append(np.outer(np.arange(n, dtype=np.float64), freqs))  # [n, d/2]
    if d % 2:
      raise ValueError(f'attention_head_dim={head_dim}: rotary part of odd size {d}')
  f, h, w = grid
  ang = np.concatenate([
      np.broadcast_to(parts[0][:, None, None], (f, h, w, parts[0].shape[-1])),
      np.broadcast_to(parts[1][None, :, None], (f, h, w, parts[1].shape[-1])),
      np.broadcast_to(parts[2][None, None, :], (f, h, w, parts[2].shape[-1]))], -1)
  ang = ang.reshape(f * h * w, head_dim // 2)
  return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B,L,N,D] with interleaved pairs (x[2i], x[2i+1]) rotated by angle i; cos/sin [L,D/2]."""
  x1, x2 = x[..., 0::2], x[..., 1::2]
  c, s = cos[None, :, None, :], sin[None, :, None, :]
  return jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).reshape(x.shape)


# ------------------------------------------------------------------------------ Modules


def _dense(din, dout, names, rngs, dtype):
  return layers.dense(din, dout, names, rngs=rngs, dtype=dtype)


def _scale(dim: int, names=('embed',)) -> nnx.Param:
  return nnx.Param(nnx.with_partitioning(nnx.initializers.ones_init(), names)(
      jax.random.key(0), (dim,)))


LORA_TARGETS = ('to_q', 'to_k', 'to_v', 'to_out.0', 'ffn.net.0.proj', 'ffn.net.2')


class LoRAParam(nnx.Param):
  """A LoRA adapter matrix: the only trainable parameters of a LoRA model (filter on this)."""


class LoRAScale(nnx.Variable):
  """alpha / rank, applied to every adapter; 0 turns the adapters off (the KL reference)."""


class LoRA(nnx.Module):
  """Low-rank update x -> (x A) B of a projection; A [in, r] ~ N(0, 1/r^2), B [r, out] = 0."""

  def __init__(self, din: int, dout: int, rank: int, names, *, rngs: nnx.Rngs):
    self.a = LoRAParam(nnx.with_partitioning(nnx.initializers.normal(1.0 / rank),
                                             (names[0], None))(rngs.params(), (din, rank)))
    self.b = LoRAParam(nnx.with_partitioning(nnx.initializers.zeros_init(), (None, names[1]))(
        rngs.params(), (rank, dout)))

  def __call__(self, x, scale):
    return (x.astype(jnp.float32) @ self.a[...]) @ self.b[...] * scale


def _adapters(targets, shapes, rank, rngs) -> nnx.Dict:
  """{target name with '.' -> '_': LoRA} for the targets among ``shapes`` (name -> (in, out,
  logical names))."""
  return nnx.Dict({k.replace('.', '_'): LoRA(*shapes[k][:2], rank, shapes[k][2], rngs=rngs)
                   for k in shapes if rank and k in targets})


class Attention(nnx.Module):
  """Wan attention: q/k/v projections, RMSNorm over all heads on q and k, optional RoPE."""

  def __init__(self, dim: int, heads: int, eps: float, *, rngs: nnx.Rngs, dtype, impl,
               lora_rank: int = 0, lora_targets=()):
    self.heads, self.eps, self.dtype, self.impl = heads, eps, dtype, impl
    self.to_q = _dense(dim, dim, ('embed', 'heads'), rngs, dtype)
    self.to_k = _dense(dim, dim, ('embed', 'heads'), rngs, dtype)
    self.to_v = _dense(dim, dim, ('embed', 'heads'), rngs, dtype)
    self.to_out = _dense(dim, dim, ('heads', 'embed'), rngs, dtype)
    self.norm_q = _scale(dim, ('heads',))
    self.norm_k = _scale(dim, ('heads',))
    qkv = (dim, dim, ('embed', 'heads'))
    self.lora = _adapters(lora_targets, {'to_q': qkv, 'to_k': qkv, 'to_v': qkv,
                                         'to_out.0': (dim, dim, ('heads', 'embed'))},
                          lora_rank, rngs)

  def _proj(self, name: str, x, scale):
    y = getattr(self, name if name != 'to_out_0' else 'to_out')(x)
    return y + self.lora[name](x, scale) if name in self.lora else y

  def __call__(self, x, ctx, rope=None, lora_scale=0.0):
    b, l, d = x.shape
    q = rms_norm(self._proj('to_q', x, lora_scale), self.norm_q[...], self.eps)
    k = rms_norm(self._proj('to_k', ctx, lora_scale), self.norm_k[...], self.eps)
    v = self._proj('to_v', ctx, lora_scale).astype(jnp.float32)
    split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, d // self.heads)
    q, k, v = split(q), split(k), split(v)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = layers.attention(q, k, v, None, self.impl, self.dtype)
    return self._proj('to_out_0', out.reshape(b, l, d), lora_scale)


class FeedForward(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype, lora_rank: int = 0,
               lora_targets=()):
    self.proj_in = _dense(dim, hidden, ('embed', 'mlp'), rngs, dtype)
    self.proj_out = _dense(hidden, dim, ('mlp', 'embed'), rngs, dtype)
    self.lora = _adapters(lora_targets, {'ffn.net.0.proj': (dim, hidden, ('embed', 'mlp')),
                                         'ffn.net.2': (hidden, dim, ('mlp', 'embed'))},
                          lora_rank, rngs)

  def __call__(self, x, lora_scale=0.0):
    h = self.proj_in(x)
    if 'ffn_net_0_proj' in self.lora:
      h = h + self.lora['ffn_net_0_proj'](x, lora_scale)
    h = jax.nn.gelu(h, approximate=True)
    y = self.proj_out(h)
    if 'ffn_net_2' in self.lora:
      y = y + self.lora['ffn_net_2'](h, lora_scale)
    return y


class Block(nnx.Module):
  """One Wan transformer block (self-attention, cross-attention, FFN; six-way adaLN)."""

  def __init__(self, c: WanConfig, *, rngs: nnx.Rngs):
    d, dt = c.inner_dim, layers.compute_dtype(c.dtype)
    self.eps = c.eps
    lora = dict(lora_rank=c.lora_rank, lora_targets=c.lora_targets)
    self.attn1 = Attention(d, c.num_attention_heads, c.eps, rngs=rngs, dtype=dt,
                           impl=c.attention_impl, **lora)
    self.attn2 = Attention(d, c.num_attention_heads, c.eps, rngs=rngs, dtype=dt,
                           impl=c.attention_impl, **lora)
    self.norm2 = nnx.data(None)
    if c.cross_attn_norm:
      self.norm2 = nnx.Dict(scale=_scale(d), bias=nnx.Param(nnx.with_partitioning(
          nnx.initializers.zeros_init(), ('embed',))(rngs.params(), (d,))))
    self.ffn = FeedForward(d, c.ffn_dim, rngs=rngs, dtype=dt, **lora)
    self.scale_shift_table = nnx.Param(nnx.with_partitioning(
        lambda k, s: jax.random.normal(k, s) / math.sqrt(d), (None, None, 'embed'))(
            rngs.params(), (1, 6, d)))

  def __call__(self, x, ctx, temb6, rope, lora_scale=0.0):
    mod = self.scale_shift_table[...] + temb6  # [B, 6, D]
    shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, i][:, None] for i in range(6))
    h = layer_norm(x, self.eps) * (1 + scale) + shift
    x = x + self.attn1(h, h, rope, lora_scale) * gate
    h = x if self.norm2 is None else layer_norm(x, self.eps, self.norm2['scale'][...],
                                                self.norm2['bias'][...])
    x = x + self.attn2(h, ctx, None, lora_scale)
    h = layer_norm(x, self.eps) * (1 + c_scale) + c_shift
    return x + self.ffn(h, lora_scale) * c_gate


class WanTrunk(nnx.Module):
  """What the velocity field and the PRM share: patch embedding, the condition embedder
  (time embedding of 1000 t, its six-way projection, text projection), 3D RoPE and the
  stacked blocks. Subclasses call ``_init_trunk``; its parameters carry the same names in
  every subclass, so a PRM can start from the transformer's first blocks by key."""

  def _init_trunk(self, c: WanConfig, num_layers: int, rngs: nnx.Rngs):
    layers.compute_dtype(c.dtype)
    self.use_remat, self.policy = layers.remat_policy(c.remat)
    bad = [t for t in c.lora_targets if t not in LORA_TARGETS]
    if c.lora_rank < 0 or bad:
      raise ValueError(f'lora_rank={c.lora_rank}, lora_targets={c.lora_targets}: rank must be '
                       f'>= 0 and targets among {LORA_TARGETS}')
    if c.attention_head_dim % 2 or any(p % 2 for p in rope_split(c.attention_head_dim)):
      raise ValueError(f'attention_head_dim={c.attention_head_dim}: each of the three rotary '
                       f'parts {rope_split(c.attention_head_dim)} must be even')
    self.config = c
    d, dt, pt, ph, pw = c.inner_dim, layers.compute_dtype(c.dtype), *c.patch_size
    self.patch_embedding = nnx.Dict(
        kernel=nnx.Param(nnx.with_partitioning(
            nnx.initializers.lecun_normal(), (None, None, None, 'conv_in', 'embed'))(
                rngs.params(), (pt, ph, pw, c.in_channels, d))),
        bias=nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), ('embed',))(
            rngs.params(), (d,))))
    self.time_embedder = nnx.Dict(
        linear_1=_dense(c.freq_dim, d, (None, 'embed'), rngs, None),
        linear_2=_dense(d, d, ('embed', 'mlp'), rngs, None))
    self.time_proj = _dense(d, 6 * d, ('embed', 'mlp'), rngs, None)
    self.text_embedder = nnx.Dict(
        linear_1=_dense(c.text_dim, d, (None, 'embed'), rngs, dt),
        linear_2=_dense(d, d, ('embed', 'mlp'), rngs, dt))

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(r):
      return Block(c, rngs=r)

    self.blocks = make_blocks(rngs)
    self.lora_scale = LoRAScale(jnp.asarray(c.lora_alpha / c.lora_rank if c.lora_rank else 0.0,
                                            jnp.float32))
    return d, dt

  def embed(self, x: jax.Array, t: jax.Array, text: dict[str, Any]):
    """x [B,T,H,W,C], t [B], text -> (tokens [B,L,D], projected text [B,Lt,D], time
    embedding [B,D], its six-way projection [B,6,D], rope (cos, sin) [L,hd/2], token grid)."""
    c = self.config
    pt, ph, pw = c.patch_size
    b, tt, hh, ww, ch = x.shape
    if tt % pt or hh % ph or ww % pw:
      raise ValueError(f'latent grid {(tt, hh, ww)} is not divisible by patch {c.patch_size}')
    grid = (tt // pt, hh // ph, ww // pw)
    # Patch embedding: [B, F, pt, H, ph, W, pw, C] -> tokens [B, F*H*W, D].
    p = x.astype(jnp.float32).reshape(b, grid[0], pt, grid[1], ph, grid[2], pw, ch)
    p = p.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, -1, pt, ph, pw, ch)
    h = jnp.einsum('nlpqrc,pqrcd->nld', p, self.patch_embedding['kernel'][...],
                   precision=jax.lax.Precision.HIGHEST) + self.patch_embedding['bias'][...]
    # Conditioning: time embedding of 1000 t, its six-way projection, projected text.
    te = self.time_embedder
    temb = te['linear_2'](jax.nn.silu(te['linear_1'](
        timestep_features(1000.0 * t.astype(jnp.float32), c.freq_dim))))
    temb6 = self.time_proj(jax.nn.silu(temb)).reshape(b, 6, -1)
    tx = self.text_embedder
    ctx = tx['linear_2'](jax.nn.gelu(tx['linear_1'](text['tokens'].astype(jnp.float32)),
                                     approximate=True))
    rope = tuple(jnp.asarray(a) for a in rope_tables(grid, c.attention_head_dim))
    return h, ctx, temb, temb6, rope, grid

  def run_blocks(self, h, ctx, temb6, rope) -> jax.Array:
    """Tokens [B,L,D] through the stacked blocks (``lax.scan``, remat per config)."""
    c = self.config
    graphdef, state = nnx.split(self.blocks)

    lora_scale = self.lora_scale[...]

    pin = lambda a: a
    if c.batch_axes:
      pin = lambda a: jax.lax.with_sharding_constraint(
          a, jax.sharding.PartitionSpec(tuple(c.batch_axes), *([None] * (a.ndim - 1))))
    h, ctx = pin(h), pin(ctx)

    def body(h, block_state):
      return pin(nnx.merge(graphdef, block_state)(h, ctx, temb6, rope, lora_scale)), None

    if self.use_remat:
      body = jax.checkpoint(body, policy=self.policy)
    h, _ = jax.lax.scan(body, h, state)
    return h


class WanTransformer(WanTrunk):
  """``WanTransformer3DModel`` (t2v): x [B,T,H,W,C], t [B], text -> velocity, float32."""

  def __init__(self, c: WanConfig, *, rngs: nnx.Rngs):
    d, dt = self._init_trunk(c, c.num_layers, rngs)
    pt, ph, pw = c.patch_size
    self.proj_out = _dense(d, c.out_channels * pt * ph * pw, ('embed', None), rngs, dt)
    self.scale_shift_table = nnx.Param(nnx.with_partitioning(
        lambda k, s: jax.random.normal(k, s) / math.sqrt(d), (None, None, 'embed'))(
            rngs.params(), (1, 2, d)))

  def __call__(self, x: jax.Array, t: jax.Array, text: dict[str, Any]) -> jax.Array:
    c = self.config
    pt, ph, pw = c.patch_size
    b, tt, hh, ww, _ = x.shape
    h, ctx, temb, temb6, rope, grid = self.embed(x, t, text)
    h = self.run_blocks(h, ctx, temb6, rope)
    shift, scale = (self.scale_shift_table[...] + temb[:, None]).transpose(1, 0, 2)[:, :, None]
    h = layer_norm(h, c.eps) * (1 + scale) + shift
    out = self.proj_out(h).astype(jnp.float32)
    out = out.reshape(b, *grid, pt, ph, pw, c.out_channels)
    out = out.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return out.reshape(b, tt, hh, ww, c.out_channels)


def build(c: WanConfig, seed: int = 0) -> WanTransformer:
  return layers.build(WanTransformer, c, rngs=nnx.Rngs(seed))


def abstract(c: WanConfig) -> WanTransformer:
  """Shape-only model (nothing allocated): for loading and memory planning."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: WanTransformer(c, rngs=nnx.Rngs(0)))


# --------------------------------------------------------------------------- Weights


def _rules():
  from euphonium_jax.models.wan.loading import Rule
  blk = r'blocks\.(?P<layer>\d+)\.'
  rules = [
      Rule(r'patch_embedding\.weight', 'patch_embedding/kernel', 'conv3d'),
      Rule(r'patch_embedding\.bias', 'patch_embedding/bias'),
      Rule(r'condition_embedder\.(?P<m>time_embedder|text_embedder)\.(?P<l>linear_[12])\.weight',
           '{m}/{l}/kernel', 'linear'),
      Rule(r'condition_embedder\.(?P<m>time_embedder|text_embedder)\.(?P<l>linear_[12])\.bias',
           '{m}/{l}/bias'),
      Rule(r'condition_embedder\.time_proj\.weight', 'time_proj/kernel', 'linear'),
      Rule(r'condition_embedder\.time_proj\.bias', 'time_proj/bias'),
      Rule(blk + r'(?P<a>attn[12])\.(?P<p>to_[qkv])\.weight', 'blocks/{a}/{p}/kernel', 'linear'),
      Rule(blk + r'(?P<a>attn[12])\.(?P<p>to_[qkv])\.bias', 'blocks/{a}/{p}/bias'),
      Rule(blk + r'(?P<a>attn[12])\.to_out\.0\.weight', 'blocks/{a}/to_out/kernel', 'linear'),
      Rule(blk + r'(?P<a>attn[12])\.to_out\.0\.bias', 'blocks/{a}/to_out/bias'),
      Rule(blk + r'(?P<a>attn[12])\.(?P<n>norm_[qk])\.weight', 'blocks/{a}/{n}'),
      Rule(blk + r'norm2\.weight', 'blocks/norm2/scale'),
      Rule(blk + r'norm2\.bias', 'blocks/norm2/bias'),
      Rule(blk + r'ffn\.net\.0\.proj\.weight', 'blocks/ffn/proj_in/kernel', 'linear'),
      Rule(blk + r'ffn\.net\.0\.proj\.bias', 'blocks/ffn/proj_in/bias'),
      Rule(blk + r'ffn\.net\.2\.weight', 'blocks/ffn/proj_out/kernel', 'linear'),
      Rule(blk + r'ffn\.net\.2\.bias', 'blocks/ffn/proj_out/bias'),
      Rule(blk + r'scale_shift_table', 'blocks/scale_shift_table'),
      Rule(r'proj_out\.weight', 'proj_out/kernel', 'linear'),
      Rule(r'proj_out\.bias', 'proj_out/bias'),
      Rule(r'scale_shift_table', 'scale_shift_table'),
  ]
  return rules


WAN_RULES = _rules()


BASE = nnx.All(nnx.Param, nnx.Not(LoRAParam))  # the published weights


def init_extra(c: WanConfig, mesh=None, logical_rules=(), seed: int = 0) -> nnx.State:
  """The variables that published weights do not hold (LoRA adapters and their scale),
  freshly initialised. One jitted construction whose other outputs are dropped, so XLA never
  computes (or allocates) the base weights; placed with their shardings on ``mesh``."""
  abstract_extra = nnx.split(abstract(c), BASE, ...)[2]
  shardings = None
  if mesh is not None:
    from euphonium_jax import parallel
    shardings = parallel.state_shardings(abstract_extra, mesh, logical_rules)

  def make():
    with nnx.use_eager_sharding(False):
      return nnx.split(WanTransformer(c, rngs=nnx.Rngs(seed)), BASE, ...)[2]

  return jax.jit(make, out_shardings=shardings)()


def load_wan_transformer(folder: str, *, mesh=None, logical_rules=(),
                         param_dtype=jnp.float32, seed: int = 0, **ours) -> tuple[nnx.GraphDef, nnx.State, WanConfig]:
  """A diffusers ``transformer/`` folder -> (graphdef, state placed with its shardings, config).

  ``ours`` sets execution and LoRA options of ``WanConfig`` (its ``dtype`` is the matmul
  dtype); ``param_dtype`` is the storage dtype of the published weights. LoRA adapters start fresh from ``seed`` (B = 0: the loaded model's
  output is the published one).
  """
  from euphonium_jax.models.wan import loading
  c = WanConfig.from_reference(loading.read_config(folder), **ours)
  graphdef, abstract_base, _ = nnx.split(abstract(c), BASE, ...)
  base = loading.load_state(abstract_base, loading.open_folder(folder), WAN_RULES,
                            mesh=mesh, logical_rules=logical_rules, dtype=param_dtype)
  return graphdef, nnx.merge_state(base, init_extra(c, mesh, logical_rules, seed)), c
