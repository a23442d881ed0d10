"""Wan2.1 video VAE (diffusers' ``AutoencoderKLWan``) in Flax NNX, channels-last.

videos [B, T, H, W, 3] in [-1, 1], T = 1 + 4k  <->  latents [B, 1 + k, H/8, W/8, 16]
(the reference is channels-first, [B, C, T, H, W]). ``encode_mean`` is the reference's
``encode(x).latent_dist.mean`` (raw, un-normalised latents), ``decode`` its ``decode(z).sample``
(clamped to [-1, 1]); ``normalize_latents`` / ``denormalize_latents`` apply the config's
``latents_mean`` / ``latents_std`` as the Wan pipelines do.

Every 3D convolution is causal in time and the reference runs the networks chunk by chunk,
carrying a feature cache; the result depends on that schedule, so we keep it: the encoder sees
the first frame, then chunks of 4 frames; the decoder one latent frame at a time. The cache is
an explicit pytree, threaded through ``jax.lax.scan`` over the chunks after the first (the
first is special in the reference). Our cache of a causal conv is always the last
``CACHE_T = 2`` frames of [cache | input], starting from zeros: that reproduces the reference's
mix of zero padding and cached frames exactly. The special cases of ``WanResample``:
  - downsample3d (encoder): on the first chunk no time convolution (the frame passes through)
    and the chunk is cached; later chunks run the stride-2 time conv on [last cached | chunk].
  - upsample3d (decoder): on the first chunk no time upsampling (the reference's 'Rep' marker);
    later chunks run the time conv with a cache that starts from zeros and double the frames.
The Wan2.2 variants (``is_residual``, ``patch_size``) are not supported.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from euphonium_jax.models.wan import loading
from euphonium_jax.models.wan.loading import Rule

CACHE_T = 2
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
  """The keys of diffusers' ``AutoencoderKLWan`` config.json (Wan2.1 variant)."""
  base_dim: int = 96
  decoder_base_dim: int | None = None
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_scales: tuple[float, ...] = ()
  temperal_downsample: tuple[bool, ...] = (False, True, True)
  dropout: float = 0.0  # inference only: no effect
  latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
  latents_std: tuple[float, ...] = WAN21_LATENTS_STD
  in_channels: int = 3
  out_channels: int = 3

  def __post_init__(self):
    n = len(self.dim_mult)
    if len(self.temperal_downsample) != n - 1:
      raise ValueError(f'temperal_downsample={list(self.temperal_downsample)} needs '
                       f'len(dim_mult) - 1 = {n - 1} entries')
    if sum(map(bool, self.temperal_downsample)) > 2:
      raise ValueError(f'temperal_downsample={list(self.temperal_downsample)}: at most 2 '
                       'temporal down-samplings fit the chunks of 4 frames')
    if self.attn_scales:
      raise ValueError(f'attn_scales={list(self.attn_scales)}: only [] is supported (the '
                       "reference's encoder cannot run attention blocks in its down path)")
    for key in ('latents_mean', 'latents_std'):
      if len(getattr(self, key)) != self.z_dim:
        raise ValueError(f'{key} has {len(getattr(self, key))} entries, z_dim={self.z_dim}')

  @property
  def temporal_factor(self) -> int:
    return 2 ** sum(map(bool, self.temperal_downsample))

  @property
  def spatial_factor(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)

  @classmethod
  def from_reference(cls, cfg: dict[str, Any]) -> 'WanVAEConfig':
    """From a diffusers config.json dict; Wan2.2 keys must be absent / off."""
    if cfg.get('is_residual'):
      raise ValueError(f"is_residual={cfg['is_residual']!r}: only the Wan2.1 VAE is supported "
                       '(the residual down/up blocks of the Wan2.2 VAE are not ported)')
    if cfg.get('patch_size') not in (None, 1):
      raise ValueError(f"patch_size={cfg['patch_size']!r}: only the Wan2.1 VAE (patch_size "
                       'None) is supported')
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in names}
    c = cls(**kw)
    for key, ours in (('scale_factor_temporal', c.temporal_factor),
                      ('scale_factor_spatial', c.spatial_factor)):
      if cfg.get(key) not in (None, ours):
        raise ValueError(f'{key}={cfg[key]!r} does not match the architecture ({ours})')
    return c


# ------------------------------------------------------------------------------ Layers


def _param(rngs: nnx.Rngs, init, shape, names) -> nnx.Param:
  return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), tuple(shape)))


def _triple(v) -> tuple[int, int, int]:
  return (v,) * 3 if isinstance(v, int) else tuple(v)


class CausalConv3d(nnx.Module):
  """``WanCausalConv3d``: kernel [kt,kh,kw,cin,cout], time padded 2*pt on the left only.

  ``x`` [B,T,H,W,cin] follows the frames ``cache`` [B,c,H,W,cin] (None: zeros); the cache
  replaces as many of the left zero frames. Convs without time padding ignore the cache.
  """

  def __init__(self, cin: int, cout: int, kernel, *, stride=1, padding=0, rngs: nnx.Rngs):
    kernel, self.stride, pad = _triple(kernel), _triple(stride), _triple(padding)
    self.pad_t, self.pad_hw = 2 * pad[0], pad[1:]
    self.kernel = _param(rngs, nnx.initializers.lecun_normal(), kernel + (cin, cout),
                         (None, None, None, 'conv_in', 'conv_out'))
    self.bias = _param(rngs, nnx.initializers.zeros_init(), (cout,), ('conv_out',))

  def __call__(self, x: jax.Array, cache: jax.Array | None = None) -> jax.Array:
    if self.pad_t:
      left = self.pad_t
      if cache is not None:
        x, left = jnp.concatenate([cache.astype(x.dtype), x], axis=1), left - cache.shape[1]
      x = jnp.pad(x, ((0, 0), (left, 0), (0, 0), (0, 0), (0, 0)))
    ph, pw = self.pad_hw
    y = conv3d(x, self.kernel[...].astype(x.dtype), self.stride, ((ph, ph), (pw, pw)))
    return y + self.bias[...].astype(x.dtype)


FOLD_MAX_CHANNELS = 128


def conv3d(x: jax.Array, w: jax.Array, stride, pad_hw, impl: str = 'auto') -> jax.Array:
  """Valid-in-time 3D convolution, x [B,T,H,W,cin] * w [kt,kh,kw,cin,cout], space padded.

  impl 'lax' is one ``conv_general_dilated`` over (T, H, W); 'taps' writes it as 2D
  convolutions over the frames, one per time tap (the frames each tap reads folded into the
  batch): all kt taps concatenated on channels into one 2D convolution when kt * cin <=
  ``FOLD_MAX_CHANNELS``, else summed. The same sums in another order. 'auto' is 'taps' on
  CPU, where XLA's 3D convolution is 5-10x slower than either (experiments/results/
  bench_peer_cpu.md), and 'lax' elsewhere (cuDNN's 3D convolutions, no tap copies in memory).
  """
  if impl == 'auto':
    impl = 'taps' if jax.default_backend() == 'cpu' else 'lax'
  if impl == 'lax':
    return jax.lax.conv_general_dilated(
        x, w, stride, ((0, 0),) + tuple(pad_hw), dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
  if impl != 'taps':
    raise ValueError(f'conv3d impl={impl!r}; allowed: auto, lax, taps')
  kt, kh, kw, cin, cout = w.shape
  st, sh, sw = stride
  b, t = x.shape[:2]
  to = (t - kt) // st + 1
  taps = [x[:, i:i + st * (to - 1) + 1:st] for i in range(kt)]  # each [B,to,H,W,cin]

  def conv2d(frames, kernel):
    y = jax.lax.conv_general_dilated(
        frames.reshape((b * to,) + frames.shape[2:]), kernel, (sh, sw), tuple(pad_hw),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y.reshape((b, to) + y.shape[1:])

  if kt == 1 or kt * cin <= FOLD_MAX_CHANNELS:
    folded = taps[0] if kt == 1 else jnp.concatenate(taps, axis=-1)
    return conv2d(folded, w.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * cin, cout))
  y = conv2d(taps[0], w[0])
  for i in range(1, kt):
    y = y + conv2d(taps[i], w[i])
  return y


def cached_conv(conv: CausalConv3d, x: jax.Array, cache: jax.Array | None):
  """Runs ``conv`` on x after ``cache`` -> (y, last CACHE_T frames of [cache | x]).

  A None cache is CACHE_T zero frames, which is what the reference's padding amounts to.
  """
  if cache is None:
    cache = jnp.zeros((x.shape[0], CACHE_T) + x.shape[2:], x.dtype)
  return conv(x, cache), jnp.concatenate([cache, x], axis=1)[:, -CACHE_T:]


class Conv2d(nnx.Module):
  """Per-frame 2D convolution (``nn.Conv2d`` on frames folded into the batch).

  kernel [kh,kw,cin,cout]; ``padding`` ((top, bottom), (left, right)).
  """

  def __init__(self, cin: int, cout: int, k: int, *, stride: int = 1, padding=((0, 0), (0, 0)),
               rngs: nnx.Rngs):
    self.stride, self.padding = (stride, stride), tuple(map(tuple, padding))
    self.kernel = _param(rngs, nnx.initializers.lecun_normal(), (k, k, cin, cout),
                         (None, None, 'conv_in', 'conv_out'))
    self.bias = _param(rngs, nnx.initializers.zeros_init(), (cout,), ('conv_out',))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t = x.shape[:2]
    y = jax.lax.conv_general_dilated(
        x.reshape((b * t,) + x.shape[2:]), self.kernel[...].astype(x.dtype), self.stride,
        self.padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return (y + self.bias[...].astype(x.dtype)).reshape((b, t) + y.shape[1:])


class RMSNorm(nnx.Module):
  """``WanRMS_norm``: x / max(||x||_2, 1e-12) * sqrt(dim) * gamma over channels (no bias).

  gamma keeps the reference's shape, (dim, 1, 1, 1) (video) or (dim, 1, 1) (``images``).
  """

  def __init__(self, dim: int, *, images: bool, rngs: nnx.Rngs):
    shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
    self.scale = dim ** 0.5
    self.gamma = _param(rngs, nnx.initializers.ones_init(), shape,
                        ('conv_out',) + (None,) * (len(shape) - 1))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
    y = (xf / jnp.maximum(norm, 1e-12)).astype(x.dtype)
    return y * self.scale * self.gamma[...].reshape(-1).astype(x.dtype)


class ResidualBlock(nnx.Module):
  """``WanResidualBlock``: shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))).

  cache: (conv1's, conv2's) input frames, or None on the first chunk.
  """

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
    self.norm1 = RMSNorm(cin, images=False, rngs=rngs)
    self.conv1 = CausalConv3d(cin, cout, 3, padding=1, rngs=rngs)
    self.norm2 = RMSNorm(cout, images=False, rngs=rngs)
    self.conv2 = CausalConv3d(cout, cout, 3, padding=1, rngs=rngs)
    self.conv_shortcut = CausalConv3d(cin, cout, 1, rngs=rngs) if cin != cout else None

  def __call__(self, x, cache):
    c1, c2 = (None, None) if cache is None else cache
    h = x if self.conv_shortcut is None else self.conv_shortcut(x)
    x, c1 = cached_conv(self.conv1, jax.nn.silu(self.norm1(x)), c1)
    x, c2 = cached_conv(self.conv2, jax.nn.silu(self.norm2(x)), c2)
    return x + h, (c1, c2)


class AttentionBlock(nnx.Module):
  """``WanAttentionBlock``: per-frame single-head self-attention over H*W, 1x1 conv q/k/v."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.norm = RMSNorm(dim, images=True, rngs=rngs)
    self.to_qkv = Conv2d(dim, 3 * dim, 1, rngs=rngs)
    self.proj = Conv2d(dim, dim, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 1, 3 * c)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    o = jax.nn.dot_product_attention(q, k, v).reshape(b, t, h, w, c)
    return x + self.proj(o)


class Resample(nnx.Module):
  """``WanResample`` in mode 'upsample2d' | 'upsample3d' | 'downsample2d' | 'downsample3d'.

  Up: nearest x2 in space, 3x3 conv to ``out_dim``; 3d also doubles the frames with a causal
  time conv to 2*dim channels (frame 2i from channels [:dim], 2i+1 from [dim:]). Down: zero pad
  right/bottom, 3x3 conv stride 2; 3d also halves the frames with a stride-2 time conv.
  cache: None on the first chunk (see the module docstring), else the time conv's frames.
  """

  def __init__(self, dim: int, mode: str, out_dim: int | None = None, *, rngs: nnx.Rngs):
    self.mode = mode
    if mode.startswith('upsample'):
      self.resample = Conv2d(dim, out_dim or dim // 2, 3, padding=((1, 1), (1, 1)), rngs=rngs)
    elif mode.startswith('downsample'):
      self.resample = Conv2d(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs)
    else:
      raise ValueError(f'Resample mode {mode!r} is not supported')
    if mode == 'upsample3d':
      self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), rngs=rngs)
    elif mode == 'downsample3d':
      self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), rngs=rngs)

  def __call__(self, x, cache):
    b, t, h, w, c = x.shape
    if self.mode == 'upsample3d':
      if cache is None:  # 'Rep': no time conv now; zero padding on the next chunk.
        cache = jnp.zeros((b, CACHE_T, h, w, c), x.dtype)
      else:
        y, cache = cached_conv(self.time_conv, x, cache)
        x = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
    if self.mode.startswith('upsample'):
      x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # 'nearest-exact' at scale 2
    x = self.resample(x)
    if self.mode == 'downsample3d':
      last = x[:, -1:]
      if cache is not None:
        x = self.time_conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))
      cache = last
    return x, cache


class MidBlock(nnx.Module):
  """``WanMidBlock``: resnet, (attention, resnet). cache: one entry per resnet."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResidualBlock(dim, dim, rngs=rngs) for _ in range(2)])
    self.attentions = nnx.List([AttentionBlock(dim, rngs=rngs)])

  def __call__(self, x, cache):
    cache = cache or (None,) * len(self.resnets)
    x, c0 = self.resnets[0](x, cache[0])
    out = [c0]
    for attn, resnet, c in zip(self.attentions, list(self.resnets)[1:], cache[1:]):
      x, c = resnet(attn(x), c)
      out.append(c)
    return x, tuple(out)


def _run(blocks, x, cache):
  cache = cache or (None,) * len(blocks)
  out = []
  for block, c in zip(blocks, cache):
    x, c = block(x, c)
    out.append(c)
  return x, tuple(out)


class Encoder(nnx.Module):
  """``WanEncoder3d`` (no attention in the down path): one chunk -> (features, cache)."""

  def __init__(self, c: WanVAEConfig, *, rngs: nnx.Rngs):
    dims = [c.base_dim * u for u in (1,) + tuple(c.dim_mult)]
    self.conv_in = CausalConv3d(c.in_channels, dims[0], 3, padding=1, rngs=rngs)
    blocks = []
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(c.num_res_blocks):
        blocks.append(ResidualBlock(din, dout, rngs=rngs))
        din = dout
      if i != len(c.dim_mult) - 1:
        mode = 'downsample3d' if c.temperal_downsample[i] else 'downsample2d'
        blocks.append(Resample(dout, mode, rngs=rngs))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(dims[-1], rngs=rngs)
    self.norm_out = RMSNorm(dims[-1], images=False, rngs=rngs)
    self.conv_out = CausalConv3d(dims[-1], 2 * c.z_dim, 3, padding=1, rngs=rngs)

  def __call__(self, x, cache):
    cache = cache or dict(conv_in=None, down_blocks=None, mid_block=None, conv_out=None)
    x, c_in = cached_conv(self.conv_in, x, cache['conv_in'])
    x, c_down = _run(self.down_blocks, x, cache['down_blocks'])
    x, c_mid = self.mid_block(x, cache['mid_block'])
    x, c_out = cached_conv(self.conv_out, jax.nn.silu(self.norm_out(x)), cache['conv_out'])
    return x, dict(conv_in=c_in, down_blocks=c_down, mid_block=c_mid, conv_out=c_out)


class UpBlock(nnx.Module):
  """``WanUpBlock``: num_res_blocks + 1 resnets, then an optional Resample ('upsampler')."""

  def __init__(self, din: int, dout: int, num_res_blocks: int, mode: str | None, *,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([ResidualBlock(din if j == 0 else dout, dout, rngs=rngs)
                             for j in range(num_res_blocks + 1)])
    self.upsampler = None if mode is None else Resample(dout, mode, rngs=rngs)

  def __call__(self, x, cache):
    c_res, c_up = (None, None) if cache is None else cache
    x, c_res = _run(self.resnets, x, c_res)
    if self.upsampler is not None:
      x, c_up = self.upsampler(x, c_up)
    return x, (c_res, c_up)


class Decoder(nnx.Module):
  """``WanDecoder3d`` (Wan2.1 up blocks): one latent chunk -> (frames, cache)."""

  def __init__(self, c: WanVAEConfig, *, rngs: nnx.Rngs):
    base = c.decoder_base_dim or c.base_dim
    mult = tuple(c.dim_mult)
    dims = [base * u for u in (mult[-1],) + mult[::-1]]
    ups = tuple(c.temperal_downsample)[::-1]
    self.conv_in = CausalConv3d(c.z_dim, dims[0], 3, padding=1, rngs=rngs)
    self.mid_block = MidBlock(dims[0], rngs=rngs)
    blocks = []
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
      din = din // 2 if i > 0 else din  # the previous upsampler halved the channels
      mode = None
      if i != len(mult) - 1:
        mode = 'upsample3d' if ups[i] else 'upsample2d'
      blocks.append(UpBlock(din, dout, c.num_res_blocks, mode, rngs=rngs))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = RMSNorm(dims[-1], images=False, rngs=rngs)
    self.conv_out = CausalConv3d(dims[-1], c.out_channels, 3, padding=1, rngs=rngs)

  def __call__(self, x, cache):
    cache = cache or dict(conv_in=None, mid_block=None, up_blocks=None, conv_out=None)
    x, c_in = cached_conv(self.conv_in, x, cache['conv_in'])
    x, c_mid = self.mid_block(x, cache['mid_block'])
    x, c_up = _run(self.up_blocks, x, cache['up_blocks'])
    x, c_out = cached_conv(self.conv_out, jax.nn.silu(self.norm_out(x)), cache['conv_out'])
    return x, dict(conv_in=c_in, mid_block=c_mid, up_blocks=c_up, conv_out=c_out)


# ------------------------------------------------------------------------------- Model


def _chunked(net, x: jax.Array, first: int, size: int) -> jax.Array:
  """net on x[:, :first], then on chunks of ``size`` frames under lax.scan, cache carried."""
  b, t = x.shape[:2]
  out, cache = net(x[:, :first], None)
  k = (t - first) // size
  if k == 0:
    return out
  chunks = x[:, first:].reshape((b, k, size) + x.shape[2:]).swapaxes(0, 1)

  def step(cache, chunk):
    y, cache = net(chunk, cache)
    return cache, y

  _, ys = jax.lax.scan(step, cache, chunks)  # [k, B, t', ...]
  ys = ys.swapaxes(0, 1).reshape((b, k * ys.shape[2]) + ys.shape[3:])
  return jnp.concatenate([out, ys], axis=1)


class WanVAE(nnx.Module):
  """``AutoencoderKLWan`` (Wan2.1): see the module docstring for layouts and chunking.

  Activations follow the parameters' dtype (norms in float32); outputs are float32.
  """

  def __init__(self, c: WanVAEConfig, *, rngs: nnx.Rngs):
    self.config = c
    self.encoder = Encoder(c, rngs=rngs)
    self.quant_conv = CausalConv3d(2 * c.z_dim, 2 * c.z_dim, 1, rngs=rngs)
    self.post_quant_conv = CausalConv3d(c.z_dim, c.z_dim, 1, rngs=rngs)
    self.decoder = Decoder(c, rngs=rngs)

  def encode_moments(self, video: jax.Array) -> jax.Array:
    """video [B,T,H,W,3] in [-1,1], T = 1 + 4k -> (mean | logvar) [B,1+k,H/8,W/8,2*z_dim]."""
    t = video.shape[1]
    if t < 1 or (t - 1) % 4:
      raise ValueError(f'video has {t} frames: the Wan VAE encodes 1 + 4k frames '
                       '(1, 5, 9, 13, ...)')
    x = video.astype(self.quant_conv.kernel.dtype)
    return self.quant_conv(_chunked(self.encoder, x, 1, 4)).astype(jnp.float32)

  def encode_mean(self, video: jax.Array) -> jax.Array:
    """video [B,T,H,W,3] in [-1,1] -> posterior mean [B,1+(T-1)/4,H/8,W/8,z_dim] (raw)."""
    return self.encode_moments(video)[..., :self.config.z_dim]

  def decode(self, z: jax.Array) -> jax.Array:
    """Raw latents [B,t,h,w,z_dim] -> video [B,1+4(t-1),8h,8w,3] in [-1,1], float32."""
    x = self.post_quant_conv(z.astype(self.post_quant_conv.kernel.dtype))
    return jnp.clip(_chunked(self.decoder, x, 1, 1).astype(jnp.float32), -1.0, 1.0)

  def normalize_latents(self, z: jax.Array) -> jax.Array:
    """Raw -> normalised latents: (z - latents_mean) * (1 / latents_std), per channel."""
    mean = jnp.asarray(self.config.latents_mean, jnp.float32)
    inv_std = 1.0 / jnp.asarray(self.config.latents_std, jnp.float32)
    return (z.astype(jnp.float32) - mean) * inv_std

  def denormalize_latents(self, z: jax.Array) -> jax.Array:
    """Normalised -> raw latents: z / (1 / latents_std) + latents_mean (as WanPipeline)."""
    mean = jnp.asarray(self.config.latents_mean, jnp.float32)
    inv_std = 1.0 / jnp.asarray(self.config.latents_std, jnp.float32)
    return z.astype(jnp.float32) / inv_std + mean


def make_encode_mean_fn(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
  """-> encode_mean(state, video [B,T,H,W,3] in [-1,1]) -> raw latents; pure, jittable."""
  def encode_mean(state, video):
    return nnx.merge(graphdef, state).encode_mean(video)
  return encode_mean


def make_decode_fn(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
  """-> decode(state, raw latents [B,t,h,w,z]) -> video in [-1,1]; pure, jittable."""
  def decode(state, z):
    return nnx.merge(graphdef, state).decode(z)
  return decode


def build(c: WanVAEConfig, seed: int = 0) -> WanVAE:
  """Randomly initialised model, built with eager sharding off."""
  with nnx.use_eager_sharding(False):
    return WanVAE(c, rngs=nnx.Rngs(seed))


def abstract(c: WanVAEConfig) -> WanVAE:
  """Shape-only model (nothing allocated): for loading and memory planning."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: WanVAE(c, rngs=nnx.Rngs(0)))


# --------------------------------------------------------------------------- Weights


def _resnet_rules(ref: str, ours: str) -> list[Rule]:
  """The tensors of one site of ``WanResidualBlock``s (ref: regex prefix, ours: path)."""
  return [
      Rule(ref + r'\.(?P<c>conv1|conv2|conv_shortcut)\.weight', ours + '/{c}/kernel', 'conv3d'),
      Rule(ref + r'\.(?P<c>conv1|conv2|conv_shortcut)\.bias', ours + '/{c}/bias'),
      Rule(ref + r'\.(?P<n>norm1|norm2)\.gamma', ours + '/{n}/gamma'),
  ]


_ED = r'(?P<e>encoder|decoder)'
_DOWN = r'encoder\.down_blocks\.(?P<i>\d+)'
_UP = r'decoder\.up_blocks\.(?P<i>\d+)\.upsamplers\.0'
VAE_RULES: list[Rule] = [
    # 1x1x1 convolutions around the latent.
    Rule(r'(?P<m>quant_conv|post_quant_conv)\.weight', '{m}/kernel', 'conv3d'),
    Rule(r'(?P<m>quant_conv|post_quant_conv)\.bias', '{m}/bias'),
    # Stems and heads.
    Rule(_ED + r'\.(?P<m>conv_in|conv_out)\.weight', '{e}/{m}/kernel', 'conv3d'),
    Rule(_ED + r'\.(?P<m>conv_in|conv_out)\.bias', '{e}/{m}/bias'),
    Rule(_ED + r'\.norm_out\.gamma', '{e}/norm_out/gamma'),
    # Residual blocks: the encoder's down path, both mid blocks, the decoder's up blocks.
    *_resnet_rules(_DOWN, 'encoder/down_blocks/{i}'),
    *_resnet_rules(_ED + r'\.mid_block\.resnets\.(?P<j>\d+)', '{e}/mid_block/resnets/{j}'),
    *_resnet_rules(r'decoder\.up_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)',
                   'decoder/up_blocks/{i}/resnets/{j}'),
    # Mid-block attention (1x1 convs).
    Rule(_ED + r'\.mid_block\.attentions\.(?P<j>\d+)\.norm\.gamma',
         '{e}/mid_block/attentions/{j}/norm/gamma'),
    Rule(_ED + r'\.mid_block\.attentions\.(?P<j>\d+)\.(?P<m>to_qkv|proj)\.weight',
         '{e}/mid_block/attentions/{j}/{m}/kernel', 'conv2d'),
    Rule(_ED + r'\.mid_block\.attentions\.(?P<j>\d+)\.(?P<m>to_qkv|proj)\.bias',
         '{e}/mid_block/attentions/{j}/{m}/bias'),
    # Resamplers: spatial conv ('resample.1' after the pad / upsample) and time conv.
    Rule(_DOWN + r'\.resample\.1\.weight', 'encoder/down_blocks/{i}/resample/kernel', 'conv2d'),
    Rule(_DOWN + r'\.resample\.1\.bias', 'encoder/down_blocks/{i}/resample/bias'),
    Rule(_DOWN + r'\.time_conv\.weight', 'encoder/down_blocks/{i}/time_conv/kernel', 'conv3d'),
    Rule(_DOWN + r'\.time_conv\.bias', 'encoder/down_blocks/{i}/time_conv/bias'),
    Rule(_UP + r'\.resample\.1\.weight', 'decoder/up_blocks/{i}/upsampler/resample/kernel',
         'conv2d'),
    Rule(_UP + r'\.resample\.1\.bias', 'decoder/up_blocks/{i}/upsampler/resample/bias'),
    Rule(_UP + r'\.time_conv\.weight', 'decoder/up_blocks/{i}/upsampler/time_conv/kernel',
         'conv3d'),
    Rule(_UP + r'\.time_conv\.bias', 'decoder/up_blocks/{i}/upsampler/time_conv/bias'),
]


def load_wan_vae(folder: str, *, mesh=None, logical_rules=(), dtype=jnp.float32,
                 ) -> tuple[nnx.GraphDef, nnx.State, WanVAEConfig]:
  """A diffusers ``vae/`` folder -> (graphdef, state placed with its shardings, config).

  ``dtype`` is the storage dtype of the parameters (and so of the activations).
  Raises loading.WeightsError naming every missing, unexpected or mis-shaped tensor.
  """
  c = WanVAEConfig.from_reference(loading.read_config(folder))
  graphdef, abstract_state = nnx.split(abstract(c))
  state = loading.load_state(abstract_state, loading.open_folder(folder), VAE_RULES,
                             mesh=mesh, logical_rules=logical_rules, dtype=dtype)
  return graphdef, state, c
