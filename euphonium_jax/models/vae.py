"""Video VAE of the embedded world: factorised (2D spatial + 1D temporal) 3D convolutions.

frames [B, T, H, W, 3] in [0, 1]  <->  latents [B, T/ft, H/f, W/f, latent_channels], with
f = 2 ** (len(channels) - 1) (x4 by default) and ft = 2 if ``temporal_downsample``.
The decoder is light (few channels at full resolution, pixel-shuffle up-sampling)
because the RL loop decodes every rollout.
"""
from __future__ import annotations

from typing import Sequence

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from euphonium_jax.models import layers


class LatentStats(nnx.Variable):
  """Non-trainable latent normalisation constants (per-channel shift and scale)."""


class ResBlock(nnx.Module):
  """x + conv_s(silu(norm(conv_t(conv_s(silu(norm(x))))))), convs (1,3,3) and (3,1,1)."""

  def __init__(self, ch: int, *, rngs: nnx.Rngs, dtype=None):
    self.norm1 = layers.rms_norm(ch, rngs=rngs, name='conv_out')
    self.conv1 = layers.conv(ch, ch, (1, 3, 3), rngs=rngs, dtype=dtype)
    self.tconv = layers.conv(ch, ch, (3, 1, 1), rngs=rngs, dtype=dtype)
    self.norm2 = layers.rms_norm(ch, rngs=rngs, name='conv_out')
    self.conv2 = layers.conv(ch, ch, (1, 3, 3), rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.tconv(self.conv1(jax.nn.silu(self.norm1(x))))
    return x + self.conv2(jax.nn.silu(self.norm2(h)))


class Upsample(nnx.Module):
  """Pixel-shuffle up-sampling: conv to cout * prod(factor) channels, depth-to-space."""

  def __init__(self, cin: int, cout: int, factor: tuple[int, int, int], *,
               rngs: nnx.Rngs, dtype=None):
    self.factor = factor
    ft, fh, fw = factor
    self.conv = layers.conv(cin, cout * ft * fh * fw, (1, 3, 3), rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    ft, fh, fw = self.factor
    return einops.rearrange(self.conv(x), 'b t h w (ft fh fw c) -> b (t ft) (h fh) (w fw) c',
                            ft=ft, fh=fh, fw=fw)


def _factors(levels: int, temporal: bool) -> list[tuple[int, int, int]]:
  """Down-sampling factor between level i and i+1 (temporal on the last one if asked)."""
  return [(2 if temporal and i == levels - 2 else 1, 2, 2) for i in range(levels - 1)]


class VideoVAE(nnx.Module):
  """Convolutional video VAE with a stored latent normalisation.

  Args:
    latent_channels: C of the latent.
    channels: widths per resolution level, full resolution first; len(channels) - 1
      spatial x2 down-samplings.
    num_res_blocks: residual blocks per level (encoder and decoder), an int or one per
      level; none at full resolution by default keeps the decoder fast.
    temporal_downsample: also halve T (on the last down-sampling).
    dtype: conv compute dtype ('float32' | 'bfloat16', float32 accumulation).
  """

  def __init__(self, latent_channels: int = 4, channels: Sequence[int] = (16, 32, 64),
               num_res_blocks: int | Sequence[int] = (0, 1, 1), temporal_downsample: bool = False,
               dtype: str = 'float32', *, rngs: nnx.Rngs):
    if len(channels) < 2:
      raise ValueError(f'vae.channels={tuple(channels)} needs at least 2 levels')
    dt = layers.compute_dtype(dtype)
    chs = list(channels)
    nres = ([num_res_blocks] * len(chs) if isinstance(num_res_blocks, int)
            else list(num_res_blocks))
    if len(nres) != len(chs):
      raise ValueError(f'vae.num_res_blocks={num_res_blocks} needs one entry per level '
                       f'of vae.channels={tuple(channels)}')
    facs = _factors(len(chs), temporal_downsample)
    self.latent_channels = latent_channels
    self.spatial_factor = 2 ** (len(chs) - 1)
    self.temporal_factor = 2 if temporal_downsample else 1
    # Encoder.
    self.enc_in = layers.conv(3, chs[0], (1, 3, 3), rngs=rngs, dtype=dt)
    enc = []
    for i, ch in enumerate(chs):
      enc += [ResBlock(ch, rngs=rngs, dtype=dt) for _ in range(nres[i])]
      if i < len(chs) - 1:
        kernel = (3, 3, 3) if facs[i][0] == 2 else (1, 3, 3)
        enc.append(layers.conv(ch, chs[i + 1], kernel, strides=facs[i], rngs=rngs, dtype=dt))
    enc.append(ResBlock(chs[-1], rngs=rngs, dtype=dt))
    self.enc_blocks = nnx.List(enc)
    self.enc_norm = layers.rms_norm(chs[-1], rngs=rngs, name='conv_out')
    self.enc_out = layers.conv(chs[-1], 2 * latent_channels, (1, 3, 3), rngs=rngs, dtype=dt)
    # Decoder.
    self.dec_in = layers.conv(latent_channels, chs[-1], (1, 3, 3), rngs=rngs, dtype=dt)
    dec = [ResBlock(chs[-1], rngs=rngs, dtype=dt)]
    for i in reversed(range(len(chs))):
      dec += [ResBlock(chs[i], rngs=rngs, dtype=dt) for _ in range(nres[i])]
      if i > 0:
        dec.append(Upsample(chs[i], chs[i - 1], facs[i - 1], rngs=rngs, dtype=dt))
    self.dec_blocks = nnx.List(dec)
    self.dec_norm = layers.rms_norm(chs[0], rngs=rngs, name='conv_out')
    self.dec_out = layers.conv(chs[0], 3, (1, 3, 3), rngs=rngs, dtype=dt)
    # Latent normalisation: z_norm = (z - shift) / scale; set by ``set_latent_stats``.
    self.latent_shift = LatentStats(jnp.zeros((latent_channels,)), out_sharding=(None,))
    self.latent_scale = LatentStats(jnp.ones((latent_channels,)), out_sharding=(None,))

  def encode(self, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    """frames [B,T,H,W,3] in [0,1] -> (mean, logvar), each [B,T/ft,H/f,W/f,C] float32."""
    x = self.enc_in(2.0 * frames.astype(jnp.float32) - 1.0)
    for block in self.enc_blocks:
      x = block(x)
    moments = self.enc_out(jax.nn.silu(self.enc_norm(x))).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array, clip: bool = True) -> jax.Array:
    """z [B,t,h,w,C] (raw latent) -> frames [B,T,H,W,3] float32, clipped to [0,1] if ``clip``."""
    x = self.dec_in(z.astype(jnp.float32))
    for block in self.dec_blocks:
      x = block(x)
    x = 0.5 * (self.dec_out(jax.nn.silu(self.dec_norm(x))).astype(jnp.float32) + 1.0)
    return jnp.clip(x, 0.0, 1.0) if clip else x

  def encode_latents(self, frames: jax.Array) -> jax.Array:
    """frames -> normalised latents (posterior mean, shifted and scaled to ~unit variance)."""
    mean, _ = self.encode(frames)
    return (mean - self.latent_shift[...]) / self.latent_scale[...]

  def decode_latents(self, z: jax.Array) -> jax.Array:
    """Normalised latents [B,t,h,w,C] -> frames [B,T,H,W,3] in [0,1]."""
    return self.decode(z * self.latent_scale[...] + self.latent_shift[...])

  def set_latent_stats(self, latents: jax.Array) -> None:
    """Sets shift/scale to the per-channel mean/std of raw latents [..., C]."""
    flat = latents.reshape(-1, latents.shape[-1]).astype(jnp.float32)
    self.latent_shift[...] = flat.mean(0)
    self.latent_scale[...] = flat.std(0) + 1e-6

  def latent_shape(self, frames_shape: Sequence[int]) -> tuple[int, ...]:
    """[B,T,H,W,3] -> [B,t,h,w,C]; ValueError if T, H, W are not divisible."""
    b, t, h, w, _ = frames_shape
    f, ft = self.spatial_factor, self.temporal_factor
    if h % f or w % f or t % ft:
      raise ValueError(f'frames {tuple(frames_shape)} not divisible by the VAE factors '
                       f'(t: {ft}, h/w: {f})')
    return (b, t // ft, h // f, w // f, self.latent_channels)


def vae_loss(model: VideoVAE, frames: jax.Array, key: jax.Array,
             kl_weight: float = 1e-4) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Reconstruction (MSE + L1, per pixel mean) + kl_weight * KL (per latent element mean).

  frames [B,T,H,W,3] in [0,1]. Returns (loss, metrics with mse, l1, kl, psnr).
  """
  mean, logvar = model.encode(frames)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
  recon = model.decode(z, clip=False)
  err = recon - frames.astype(jnp.float32)
  mse = jnp.mean(err ** 2)
  l1 = jnp.mean(jnp.abs(err))
  kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
  loss = mse + l1 + kl_weight * kl
  clipped_mse = jnp.mean((jnp.clip(recon, 0.0, 1.0) - frames) ** 2)
  psnr = -10.0 * jnp.log10(jnp.maximum(clipped_mse, 1e-10))
  return loss, {'loss': loss, 'mse': mse, 'l1': l1, 'kl': kl, 'psnr': psnr}
