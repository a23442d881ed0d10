"""Building blocks shared by the networks: partitioned layers, attention, sincos embeddings.

Every parameter carries logical axis names (``nnx.with_partitioning``) so that
``nnx.get_partition_spec(nnx.state(model))`` maps it to mesh axes through a rules
table. Flax 0.12 shards eagerly when names are present: build models with ``build``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Names = tuple[str | None, ...]


def build(ctor: Callable[..., nnx.Module], *args: Any, **kwargs: Any) -> nnx.Module:
  """Constructs ``ctor(*args, **kwargs)`` with eager sharding off (no mesh needed)."""
  with nnx.use_eager_sharding(False):
    return ctor(*args, **kwargs)


def compute_dtype(name: str | jnp.dtype | None) -> jnp.dtype:
  """Maps a config value ('float32' | 'bfloat16') to a dtype; ValueError otherwise."""
  if name is None:
    return jnp.float32
  allowed = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
  key = name if isinstance(name, str) else jnp.dtype(name).name
  if key not in allowed:
    raise ValueError(f'dtype={name!r} is not supported; allowed: {sorted(allowed)}')
  return allowed[key]


def dense(din: int, dout: int, names: Names, *, rngs: nnx.Rngs, dtype=None,
          zero: bool = False, use_bias: bool = True) -> nnx.Linear:
  """``nnx.Linear`` with logical names ``names`` (kernel) / ``names[-1:]`` (bias).

  With a low-precision ``dtype`` inputs and kernel are cast to it and the matmul
  accumulates (and returns) float32; params stay float32.
  """
  init = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
  low = dtype is not None and jnp.dtype(dtype) != jnp.float32
  return nnx.Linear(
      din, dout, use_bias=use_bias, dtype=dtype,
      preferred_element_type=jnp.float32 if low else None,
      kernel_init=nnx.with_partitioning(init, names),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[-1:]),
      rngs=rngs)


class VideoConv(nnx.Module):
  """Channels-last video convolution [B,T,H,W,C] -> [B,T',H',W',C'], 'SAME' padding.

  A kernel (1, kh, kw) runs as a 2D convolution over frames folded into the batch, and a
  kernel (kt, 1, 1) as a 1D convolution over time with space folded into the batch: on
  XLA:CPU both are 4-6x faster (forward and backward) than the equivalent 3D convolution.
  Other kernels (e.g. a strided (3, 3, 3)) use the 3D convolution. Parameters as in
  ``nnx.Conv``: kernel [kt, kh, kw, cin, cout] named (None, None, None, 'conv_in',
  'conv_out'), bias [cout] named ('conv_out',).
  """

  def __init__(self, cin: int, cout: int, kernel: Sequence[int], *, rngs: nnx.Rngs,
               strides=1, dtype=None, zero: bool = False):
    kernel = tuple(kernel)
    if len(kernel) != 3:
      raise ValueError(f'VideoConv needs a 3-tuple kernel, got {kernel}')
    init = nnx.initializers.zeros_init() if zero else nnx.initializers.lecun_normal()
    self.strides = (strides,) * 3 if isinstance(strides, int) else tuple(strides)
    self.dtype = dtype
    self.kernel = nnx.Param(
        nnx.with_partitioning(init, (None,) * 3 + ('conv_in', 'conv_out'))(
            rngs.params(), kernel + (cin, cout)))
    self.bias = nnx.Param(
        nnx.with_partitioning(nnx.initializers.zeros_init(), ('conv_out',))(
            rngs.params(), (cout,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    kt, kh, kw, cin, cout = self.kernel.shape
    st, sh, sw = self.strides
    low = self.dtype is not None and jnp.dtype(self.dtype) != jnp.float32
    dt = self.dtype if low else x.dtype
    w = self.kernel[...].astype(dt)
    x = x.astype(dt)
    prec = dict(preferred_element_type=jnp.float32) if low else {}
    b, t, h, wd, _ = x.shape
    if kt == 1 and st == 1:
      y = jax.lax.conv_general_dilated(
          x.reshape(b * t, h, wd, cin), w[0], (sh, sw), 'SAME',
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'), **prec)
      y = y.reshape((b, t) + y.shape[1:])
    elif kh == kw == 1 and sh == sw == 1:
      xt = jnp.moveaxis(x, 1, 3).reshape(b * h * wd, t, cin)
      y = jax.lax.conv_general_dilated(
          xt, w[:, 0, 0], (st,), 'SAME', dimension_numbers=('NWC', 'WIO', 'NWC'), **prec)
      y = jnp.moveaxis(y.reshape(b, h, wd, y.shape[1], cout), 3, 1)
    else:
      y = jax.lax.conv_general_dilated(
          x, w, self.strides, 'SAME', dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'), **prec)
    return (y.astype(jnp.float32) if low else y) + self.bias[...]


def conv(cin: int, cout: int, kernel: Sequence[int], *, rngs: nnx.Rngs, strides=1,
         dtype=None, zero: bool = False) -> VideoConv:
  """Channels-last video convolution (see ``VideoConv``)."""
  return VideoConv(cin, cout, kernel, rngs=rngs, strides=strides, dtype=dtype, zero=zero)


def layer_norm(dim: int, *, rngs: nnx.Rngs, affine: bool = True,
               name: str = 'embed') -> nnx.LayerNorm:
  """LayerNorm over the last axis (float32); ``affine=False`` has no params (adaLN)."""
  return nnx.LayerNorm(
      dim, use_bias=affine, use_scale=affine, epsilon=1e-6,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), (name,)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (name,)),
      rngs=rngs)


def rms_norm(dim: int, *, rngs: nnx.Rngs, name: str = 'embed') -> nnx.RMSNorm:
  """RMSNorm over the last axis with a learned scale named ``(name,)``."""
  return nnx.RMSNorm(
      dim, epsilon=1e-6,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), (name,)),
      rngs=rngs)


ATTENTION_IMPLS = ('xla', 'cudnn', 'blocked', 'auto', None)
QUERY_BLOCK = 128  # queries per block of the 'blocked' attention (measured on XLA:CPU)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None,
              impl: str | None, dtype) -> jax.Array:
  """Multi-head attention. q [B,Lq,N,H], k/v [B,Lk,N,H], key_mask [B,Lk] -> [B,Lq,N,H].

  Inputs are cast to ``dtype``. ``impl``: 'xla' | 'cudnn' go to
  ``jax.nn.dot_product_attention``; 'blocked' is ``blocked_attention`` (the fast one on
  XLA:CPU); 'auto' or None is ``auto_impl``'s choice for the default backend. Output is
  float32.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'attention impl={impl!r} is not supported; allowed: {ATTENTION_IMPLS}')
  auto = impl in ('auto', None)
  if auto:
    impl = auto_impl(jax.default_backend(), dtype, q.shape[-1])
  q, k, v = (a.astype(dtype) for a in (q, k, v))
  if impl == 'blocked':
    return blocked_attention(q, k, v, key_mask)
  mask = None if key_mask is None else key_mask.astype(bool)[:, None, None, :]
  try:
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
  except (NotImplementedError, RuntimeError, ValueError):
    if not (auto and impl == 'cudnn'):
      raise
    # cuDNN's fused attention refused these shapes or this cuDNN version (a trace-time check).
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')
  return out.astype(jnp.float32)


def auto_impl(backend: str, dtype, head_dim: int) -> str:
  """What 'auto' runs: 'blocked' on CPU (XLA:CPU's fused attention is slow, see
  ``blocked_attention``); on a GPU 'cudnn' (flash attention, no [Lq, Lk] probabilities in
  memory) for 16-bit inputs with a head size cuDNN takes (a multiple of 8, at most 128),
  else 'xla'. (``jax.nn.dot_product_attention(implementation=None)`` is XLA's attention on
  every backend in the JAX releases supported, so 'auto' chooses here.)"""
  if backend == 'cpu':
    return 'blocked'
  low = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if backend in ('gpu', 'cuda', 'rocm') and low and head_dim % 8 == 0 and head_dim <= 128:
    return 'cudnn'
  return 'xla'


def _attention_block(q, k, v, bias):
  """softmax(q k^T / sqrt(H) + bias) v for heads-first q [B,N,bq,H], k/v [B,N,Lk,H], bias
  [B,1,1,Lk] or None -> [B,N,bq,H] float32; logits and softmax in float32."""
  low = q.dtype != jnp.float32
  prec = dict(preferred_element_type=jnp.float32) if low else {}
  s = jnp.einsum('bnqh,bnkh->bnqk', q, k, **prec) * (1.0 / math.sqrt(q.shape[-1]))
  if bias is not None:
    s = jnp.where(bias, s, _MASKED)
  p = jax.nn.softmax(s.astype(jnp.float32), axis=-1)
  return jnp.einsum('bnqk,bnkh->bnqh', p.astype(v.dtype), v, **prec).astype(jnp.float32)


# What jax.nn.dot_product_attention puts at masked logits (a row with no key left then
# averages all keys, as there).
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None,
                      block: int = QUERY_BLOCK) -> jax.Array:
  """Exact attention, heads-first and one block of ``block`` queries at a time (``lax.map``).

  q [B,Lq,N,H], k/v [B,Lk,N,H], key_mask [B,Lk] (True = attend) -> [B,Lq,N,H] float32. Each
  query's softmax is over all keys, so blocking the queries changes nothing but the size of
  the logits in flight ([B,N,block,Lk] instead of [B,N,Lq,Lk]): on XLA:CPU at [8,768,8,64]
  this and the heads-first layout took the forward from 3.5x torch's fused attention (1
  thread) to 1.6-2.1x and the gradient from 2.4x to 1.5x (2 loaded EPYC cores). Each block is
  rematerialised in the backward pass (``jax.checkpoint``): the probabilities are never
  stored. Queries are zero-padded to a multiple of ``block`` and the padding dropped.
  """
  b, lq, n, h = q.shape
  bias = None if key_mask is None else key_mask.astype(bool)[:, None, None, :]
  q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
  one = jax.checkpoint(_attention_block)
  if lq <= block:
    return one(q, k, v, bias).transpose(0, 2, 1, 3)
  nb = -(-lq // block)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, nb * block - lq), (0, 0)))
  qb = q.reshape(b, n, nb, block, h).transpose(2, 0, 1, 3, 4)
  out = jax.lax.map(lambda qi: one(qi, k, v, bias), qb)  # [nb, B, N, block, H]
  out = out.transpose(1, 0, 3, 2, 4).reshape(b, nb * block, n, h)
  return out[:, :lq]


def sincos_1d(pos: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of positions ``pos`` [...] -> [..., dim] (cos | sin halves)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = pos.astype(jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
  return emb


def sincos_3d(grid: Sequence[int], dim: int) -> jax.Array:
  """Fixed 3D positional encoding for a (T, H, W) token grid -> [T*H*W, dim].

  The channels are split between t, h and w (t gets the remainder); each part is a
  1D sincos embedding of its coordinate.
  """
  t, h, w = grid
  dh = dw = (dim // 3) // 2 * 2
  dt = dim - dh - dw
  tt, hh, ww = jnp.meshgrid(jnp.arange(t), jnp.arange(h), jnp.arange(w), indexing='ij')
  emb = jnp.concatenate(
      [sincos_1d(tt, dt), sincos_1d(hh, dh), sincos_1d(ww, dw)], axis=-1)
  return emb.reshape(t * h * w, dim)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation: x [B,L,D], shift/scale [B,D] -> x * (1 + scale) + shift."""
  return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def remat_policy(name: str):
  """Maps a config name to (use_remat, jax checkpoint policy); ValueError otherwise."""
  policies = {
      'none': (False, None),
      'full': (True, None),
      'dots': (True, jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
      'dots_saveable': (True, jax.checkpoint_policies.dots_saveable),
  }
  if name not in policies:
    raise ValueError(f'remat={name!r} is not supported; allowed: {sorted(policies)}')
  return policies[name]
