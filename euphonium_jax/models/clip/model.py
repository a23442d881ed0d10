"""CLIP (transformers' ``CLIPModel``): vision and text towers, projections, ``logit_scale``, in NNX.

As the reference computes it:
  vision  x = [class_embedding; patches(pixels) @ W] + position_embedding    (no patch bias)
          x = pre_layrnorm(x); blocks; pooled = post_layernorm(x[:, 0])
  text    x = token_embedding[ids] + position_embedding; blocks with a causal mask (and the
          padding mask); x = final_layer_norm(x); pooled = x at the end-of-text token: the
          first position holding ``eos_token_id``, or (legacy configs, eos_token_id == 2)
          the position of the largest token id, as transformers' ``CLIPTextTransformer``
  block   x += out(attn(layer_norm1(x)))  (q scaled by head_dim**-0.5, float32 softmax)
          x += fc2(act(fc1(layer_norm2(x))))   act = the config's hidden_act (quick_gelu:
          x * sigmoid(1.702 x))
  heads   image_embeds = visual_projection(pooled), text_embeds = text_projection(pooled)
          (no biases); logits_per_image = exp(logit_scale) * normalise(img) @ normalise(txt).T

Pixels are channels-last [N, H, W, 3], already preprocessed (``preprocess.py``). Blocks are
stacked with ``nnx.vmap`` on a leading 'layers' axis and applied with ``nnx.scan``. Compute is
float32; ``dtype='bfloat16'`` runs the matmuls in bf16 with float32 accumulation.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from euphonium_jax.models import layers


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    'quick_gelu': quick_gelu,
    'gelu': functools.partial(jax.nn.gelu, approximate=False),  # erf, torch's nn.GELU()
    'gelu_new': functools.partial(jax.nn.gelu, approximate=True),
    'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """One transformer tower. Vision: ``image_size``/``patch_size``; text: ``vocab_size``,
  ``max_positions`` and ``eos_token_id``."""
  hidden: int
  layers: int
  heads: int
  mlp: int
  act: str = 'quick_gelu'
  eps: float = 1e-5
  image_size: int = 0
  patch_size: int = 0
  vocab_size: int = 0
  max_positions: int = 0
  eos_token_id: int = 49407

  def __post_init__(self):
    if self.act not in ACTIVATIONS:
      raise ValueError(f'hidden_act={self.act!r} is not supported; allowed: {sorted(ACTIVATIONS)}')
    if self.hidden % self.heads:
      raise ValueError(f'hidden_size {self.hidden} is not a multiple of the {self.heads} heads')


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Sizes of a CLIP model; ``dtype`` is the matmul dtype ('float32' | 'bfloat16')."""
  vision: TowerConfig
  text: TowerConfig
  projection_dim: int
  logit_scale_init: float = 2.6592
  dtype: str = 'float32'

  def __post_init__(self):
    layers.compute_dtype(self.dtype)

  @classmethod
  def from_hf(cls, config: Mapping[str, Any], dtype: str = 'float32') -> 'CLIPConfig':
    """From a transformers ``CLIPConfig`` ``config.json`` dict (text_config, vision_config)."""
    v, t = config['vision_config'], config['text_config']
    vision = TowerConfig(
        hidden=v['hidden_size'], layers=v['num_hidden_layers'], heads=v['num_attention_heads'],
        mlp=v['intermediate_size'], act=v.get('hidden_act', 'quick_gelu'),
        eps=v.get('layer_norm_eps', 1e-5), image_size=v['image_size'],
        patch_size=v['patch_size'])
    text = TowerConfig(
        hidden=t['hidden_size'], layers=t['num_hidden_layers'], heads=t['num_attention_heads'],
        mlp=t['intermediate_size'], act=t.get('hidden_act', 'quick_gelu'),
        eps=t.get('layer_norm_eps', 1e-5), vocab_size=t['vocab_size'],
        max_positions=t['max_position_embeddings'], eos_token_id=t.get('eos_token_id', 49407))
    return cls(vision=vision, text=text, projection_dim=config.get('projection_dim', 512),
               logit_scale_init=config.get('logit_scale_init_value', 2.6592), dtype=dtype)


def _param(init, names, shape, rngs):
  return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape))


def _layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      dim, epsilon=eps, rngs=rngs,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ('embed',)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ('embed',)))


class Attention(nnx.Module):
  """Multi-head self-attention with biases: [N,L,D], additive bias [N|1,1,L|1,L] -> [N,L,D]."""

  def __init__(self, cfg: TowerConfig, dtype: str, *, rngs: nnx.Rngs):
    self.heads, self.dim = cfg.heads, cfg.hidden // cfg.heads
    self.dtype = layers.compute_dtype(dtype)
    proj = functools.partial(layers.dense, rngs=rngs, dtype=self.dtype)
    self.q = proj(cfg.hidden, cfg.hidden, ('embed', 'heads'))
    self.k = proj(cfg.hidden, cfg.hidden, ('embed', 'heads'))
    self.v = proj(cfg.hidden, cfg.hidden, ('embed', 'heads'))
    self.out = proj(cfg.hidden, cfg.hidden, ('heads', 'embed'))

  def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    n, l, _ = x.shape
    split = lambda y: y.reshape(n, l, self.heads, self.dim).astype(self.dtype)
    q = split(self.q(x) * (self.dim ** -0.5))
    k, v = split(self.k(x)), split(self.v(x))
    scores = jnp.einsum('bqnh,bknh->bnqk', q, k, preferred_element_type=jnp.float32)
    if bias is not None:
      scores = scores + bias
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum('bnqk,bknh->bqnh', probs.astype(self.dtype), v,
                     preferred_element_type=jnp.float32)
    return self.out(out.reshape(n, l, self.heads * self.dim)).astype(jnp.float32)


class Block(nnx.Module):
  """Pre-norm encoder layer: x + attn(ln1(x)), then + fc2(act(fc1(ln2(x)))). [N,L,D]."""

  def __init__(self, cfg: TowerConfig, dtype: str, *, rngs: nnx.Rngs):
    dt = layers.compute_dtype(dtype)
    self.act = cfg.act
    self.layer_norm1 = _layer_norm(cfg.hidden, cfg.eps, rngs)
    self.attn = Attention(cfg, dtype, rngs=rngs)
    self.layer_norm2 = _layer_norm(cfg.hidden, cfg.eps, rngs)
    self.fc1 = layers.dense(cfg.hidden, cfg.mlp, ('embed', 'mlp'), rngs=rngs, dtype=dt)
    self.fc2 = layers.dense(cfg.mlp, cfg.hidden, ('mlp', 'embed'), rngs=rngs, dtype=dt)

  def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    x = x + self.attn(self.layer_norm1(x), bias)
    h = ACTIVATIONS[self.act](self.fc1(self.layer_norm2(x)).astype(jnp.float32))
    return x + self.fc2(h).astype(jnp.float32)


def _stacked_blocks(cfg: TowerConfig, dtype: str, rngs: nnx.Rngs):
  @nnx.split_rngs(splits=cfg.layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def blocks(rngs: nnx.Rngs) -> Block:
    return Block(cfg, dtype, rngs=rngs)
  return blocks(rngs)


def _run_blocks(blocks, x: jax.Array, bias: jax.Array | None) -> jax.Array:
  @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry,
            transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def apply(x, block, bias):
    return block(x, bias)
  return apply(x, blocks, bias)


class VisionTower(nnx.Module):
  """pixels [N, S, S, 3] (preprocessed, S = image_size) -> pooled [N, hidden] float32."""

  def __init__(self, cfg: TowerConfig, dtype: str, *, rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, layers.compute_dtype(dtype)
    p, d = cfg.patch_size, cfg.hidden
    grid = cfg.image_size // p
    normal = nnx.initializers.normal(0.02)
    self.patch = _param(normal, (None, None, 'conv_in', 'embed'), (p, p, 3, d), rngs)
    self.class_embedding = _param(normal, ('embed',), (d,), rngs)
    self.position_embedding = _param(normal, (None, 'embed'), (grid * grid + 1, d), rngs)
    self.pre_layernorm = _layer_norm(d, cfg.eps, rngs)
    self.blocks = _stacked_blocks(cfg, dtype, rngs)
    self.post_layernorm = _layer_norm(d, cfg.eps, rngs)

  def hidden_states(self, pixels: jax.Array) -> jax.Array:
    """[N, S, S, 3] -> last hidden state [N, 1 + (S/p)^2, hidden] (before post_layernorm)."""
    n, h, w, c = pixels.shape
    p = self.cfg.patch_size
    if (h, w) != (self.cfg.image_size,) * 2:
      raise ValueError(f'pixels are {h}x{w}; this vision tower takes {self.cfg.image_size}^2')
    patches = pixels.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, (h // p) * (w // p), p * p * c)
    kernel = self.patch[...].reshape(p * p * c, -1)
    x = jnp.einsum('npk,kd->npd', patches.astype(self.dtype), kernel.astype(self.dtype),
                   preferred_element_type=jnp.float32)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(jnp.float32), (n, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(jnp.float32)
    return _run_blocks(self.blocks, self.pre_layernorm(x), None)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    return self.post_layernorm(self.hidden_states(pixels)[:, 0])


class TextTower(nnx.Module):
  """ids int [N, L], mask [N, L] (nonzero = token, right padding) -> pooled [N, hidden]."""

  def __init__(self, cfg: TowerConfig, dtype: str, *, rngs: nnx.Rngs):
    self.cfg = cfg
    normal = nnx.initializers.normal(0.02)
    self.token_embedding = nnx.Embed(
        cfg.vocab_size, cfg.hidden, rngs=rngs,
        embedding_init=nnx.with_partitioning(normal, ('vocab', 'embed')))
    self.position_embedding = _param(normal, (None, 'embed'), (cfg.max_positions, cfg.hidden),
                                     rngs)
    self.blocks = _stacked_blocks(cfg, dtype, rngs)
    self.final_layernorm = _layer_norm(cfg.hidden, cfg.eps, rngs)

  def hidden_states(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """-> last hidden state [N, L, hidden] (after final_layer_norm), as the reference."""
    l = ids.shape[1]
    if l > self.cfg.max_positions:
      raise ValueError(f'{l} tokens; the text tower has {self.cfg.max_positions} positions')
    x = self.token_embedding(ids).astype(jnp.float32) + self.position_embedding[:l].astype(
        jnp.float32)
    pos = jnp.arange(l)
    allowed = (pos[None, :] <= pos[:, None])[None] & mask.astype(bool)[:, None, :]
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None].astype(jnp.float32)
    return self.final_layernorm(_run_blocks(self.blocks, x, bias))

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.hidden_states(ids, mask)
    ids = ids.astype(jnp.int32)
    if self.cfg.eos_token_id == 2:  # transformers' legacy rule: the largest id is the EOS
      at = jnp.argmax(ids, axis=-1)
    else:
      at = jnp.argmax((ids == self.cfg.eos_token_id).astype(jnp.int32), axis=-1)
    return jnp.take_along_axis(x, at[:, None, None], axis=1)[:, 0]


class CLIP(nnx.Module):
  """Both towers, their projections and ``logit_scale`` (a scalar; its exp multiplies)."""

  def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt = layers.compute_dtype(cfg.dtype)
    self.vision = VisionTower(cfg.vision, cfg.dtype, rngs=rngs)
    self.text = TextTower(cfg.text, cfg.dtype, rngs=rngs)
    self.visual_projection = layers.dense(cfg.vision.hidden, cfg.projection_dim,
                                          ('embed', None), rngs=rngs, dtype=dt, use_bias=False)
    self.text_projection = layers.dense(cfg.text.hidden, cfg.projection_dim,
                                        ('embed', None), rngs=rngs, dtype=dt, use_bias=False)
    self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init, jnp.float32))

  def image_features(self, pixels: jax.Array) -> jax.Array:
    """Preprocessed pixels [N, S, S, 3] -> image embeddings [N, P] (not normalised)."""
    return self.visual_projection(self.vision(pixels)).astype(jnp.float32)

  def text_features(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Token ids [N, L], mask [N, L] -> text embeddings [N, P] (not normalised)."""
    return self.text_projection(self.text(ids, mask)).astype(jnp.float32)

  def __call__(self, pixels: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """logits_per_image [N_images, N_texts] = exp(logit_scale) * cosine similarities."""
    img = normalize(self.image_features(pixels))
    txt = normalize(self.text_features(ids, mask))
    return jnp.exp(self.logit_scale[...]) * img @ txt.T


def normalize(x: jax.Array) -> jax.Array:
  """x / ||x||_2 over the last axis (as the reference: no epsilon)."""
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def abstract_clip(cfg: CLIPConfig) -> CLIP:
  """The model with ShapeDtypeStruct parameters (nothing allocated)."""
  return nnx.eval_shape(lambda: layers.build(CLIP, cfg, rngs=nnx.Rngs(0)))


def random_clip(cfg: CLIPConfig, seed: int = 0) -> CLIP:
  """A randomly initialised model (benchmarks and tests; no weights needed)."""
  return layers.build(CLIP, cfg, rngs=nnx.Rngs(seed))
