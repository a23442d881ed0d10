"""UMT5 text encoder of Wan2.1 (transformers' ``UMT5EncoderModel``) in NNX, and its weight table.

The architecture, as the reference computes it:
  x = shared[ids]                                            (no scaling)
  per block:  x += o(attn(norm(x)))       q.k NOT scaled by 1/sqrt(d_kv); every block has its
                                          own relative position bias table (UMT5; in T5 only
                                          the first); padded keys get finfo(float32).min
              x += wo(act(wi_0(norm(x))) * wi_1(norm(x)))    (gated FFN, act = gelu_new)
  out = norm(x)          norm: T5 RMS norm, float32 variance, no mean subtraction, no bias

Blocks are built with ``nnx.vmap`` (every block parameter stacked on a leading 'layers' axis)
and applied with ``nnx.scan``. Compute is float32; ``dtype='bfloat16'`` runs the matmuls in
bf16 with float32 accumulation. Prompt handling (the Wan pipeline's convention) is in
``umt5_prompts.py``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from euphonium_jax.models import layers
from euphonium_jax.models.wan import loading
from euphonium_jax.models.wan.loading import Rule

ACTIVATIONS = {
    'gelu_new': functools.partial(jax.nn.gelu, approximate=True),  # tanh approximation
    'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'gelu_fast': functools.partial(jax.nn.gelu, approximate=True),
    'gelu': functools.partial(jax.nn.gelu, approximate=False),  # erf
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'swish': jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class UMT5Config:
  """Sizes of the encoder; defaults are google/umt5-xxl (Wan2.1's text encoder).

  ``act`` is transformers' ``dense_act_fn``; ``dtype`` the matmul dtype ('float32' |
  'bfloat16'); parameters, norms, softmax and the residual stream stay float32.
  """
  vocab_size: int = 256384
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  num_buckets: int = 32
  max_distance: int = 128
  eps: float = 1e-6
  act: str = 'gelu_new'
  dtype: str = 'float32'

  def __post_init__(self):
    if self.act not in ACTIVATIONS:
      raise ValueError(f'UMT5Config.act={self.act!r} is not supported; allowed: '
                       f'{sorted(ACTIVATIONS)}')
    layers.compute_dtype(self.dtype)  # ValueError naming the allowed values

  @classmethod
  def from_hf(cls, config: Mapping[str, Any], dtype: str = 'float32') -> 'UMT5Config':
    """From a transformers ``config.json`` dict, resolving the activation as transformers does
    (an explicit ``dense_act_fn`` wins; 'gated-gelu' means gelu_new)."""
    ff = config.get('feed_forward_proj', 'gated-gelu')
    parts = ff.split('-')
    if not config.get('is_gated_act', parts[0] == 'gated'):
      raise ValueError(f'feed_forward_proj={ff!r}: only gated FFNs (gated-<act>) are supported; '
                       "UMT5 and Wan use 'gated-gelu'")
    act = config.get('dense_act_fn') or ('gelu_new' if ff == 'gated-gelu' else parts[-1])
    return cls(vocab_size=config['vocab_size'], d_model=config['d_model'], d_kv=config['d_kv'],
               d_ff=config['d_ff'], num_layers=config['num_layers'],
               num_heads=config['num_heads'],
               num_buckets=config.get('relative_attention_num_buckets', 32),
               max_distance=config.get('relative_attention_max_distance', 128),
               eps=config.get('layer_norm_epsilon', 1e-6), act=act, dtype=dtype)


def relative_position_bucket(rel: jax.Array, num_buckets: int, max_distance: int) -> jax.Array:
  """Bidirectional T5 buckets of ``rel = key_pos - query_pos`` (int [...]) -> int32 [...].

  Half the buckets for rel > 0; in each half, exact buckets below ``num_buckets // 4`` and
  log-spaced ones up to ``max_distance`` (float32, truncated), as ``_relative_position_bucket``.
  """
  half = num_buckets // 2
  out = (rel > 0).astype(jnp.int32) * half
  n = jnp.abs(rel).astype(jnp.int32)
  max_exact = half // 2
  # log(0) = -inf at n = 0 is discarded by the where below, as in the reference.
  ratio = (jnp.log(n.astype(jnp.float32) / max_exact)
           / np.float32(np.log(max_distance / max_exact)) * (half - max_exact))
  large = jnp.minimum(max_exact + ratio.astype(jnp.int32), half - 1)
  return out + jnp.where(n < max_exact, n, large)


class T5Norm(nnx.Module):
  """T5 RMS norm [..., D] -> [..., D] float32: x / sqrt(mean(x^2) + eps) * scale."""

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = nnx.Param(nnx.with_partitioning(nnx.initializers.ones_init(), ('embed',))(
        rngs.params(), (dim,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return self.scale[...].astype(jnp.float32) * (x * jax.lax.rsqrt(var + self.eps))


class SelfAttention(nnx.Module):
  """Unscaled multi-head self-attention with this block's relative position bias table."""

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    inner = cfg.num_heads * cfg.d_kv
    self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
    self.dtype = layers.compute_dtype(cfg.dtype)
    proj = functools.partial(layers.dense, rngs=rngs, dtype=self.dtype, use_bias=False)
    self.q = proj(cfg.d_model, inner, ('embed', 'heads'))
    self.k = proj(cfg.d_model, inner, ('embed', 'heads'))
    self.v = proj(cfg.d_model, inner, ('embed', 'heads'))
    self.o = proj(inner, cfg.d_model, ('heads', 'embed'))
    self.rel_bias = nnx.Param(nnx.with_partitioning(
        nnx.initializers.normal(1.0), (None, 'heads'))(
            rngs.params(), (cfg.num_buckets, cfg.num_heads)))

  def __call__(self, x: jax.Array, buckets: jax.Array, key_bias: jax.Array) -> jax.Array:
    """x [B,L,D], buckets int [L,L], key_bias [B,1,1,L] (0 or finfo.min) -> [B,L,D] float32."""
    b, l, _ = x.shape
    split = lambda y: y.reshape(b, l, self.heads, self.d_kv).astype(self.dtype)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    scores = jnp.einsum('bqnh,bknh->bnqk', q, k, preferred_element_type=jnp.float32)
    position = jnp.transpose(self.rel_bias[...].astype(jnp.float32)[buckets], (2, 0, 1))
    probs = jax.nn.softmax(scores + position[None] + key_bias, axis=-1)
    out = jnp.einsum('bnqk,bknh->bqnh', probs.astype(self.dtype), v,
                     preferred_element_type=jnp.float32)
    return self.o(out.reshape(b, l, self.heads * self.d_kv)).astype(jnp.float32)


class GatedFFN(nnx.Module):
  """x [B,L,D] -> wo(act(wi_0 x) * wi_1 x) [B,L,D] float32."""

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    dt = layers.compute_dtype(cfg.dtype)
    proj = functools.partial(layers.dense, rngs=rngs, dtype=dt, use_bias=False)
    self.act = cfg.act
    self.wi_0 = proj(cfg.d_model, cfg.d_ff, ('embed', 'mlp'))
    self.wi_1 = proj(cfg.d_model, cfg.d_ff, ('embed', 'mlp'))
    self.wo = proj(cfg.d_ff, cfg.d_model, ('mlp', 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    h = ACTIVATIONS[self.act](self.wi_0(x).astype(jnp.float32)) * self.wi_1(x)
    return self.wo(h).astype(jnp.float32)


class UMT5Block(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then + ffn(norm(x)). [B,L,D] -> [B,L,D]."""

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    self.attn_norm = T5Norm(cfg.d_model, cfg.eps, rngs=rngs)
    self.attn = SelfAttention(cfg, rngs=rngs)
    self.ffn_norm = T5Norm(cfg.d_model, cfg.eps, rngs=rngs)
    self.ffn = GatedFFN(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, buckets: jax.Array, key_bias: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), buckets, key_bias)
    return x + self.ffn(self.ffn_norm(x))


class UMT5Encoder(nnx.Module):
  """UMT5 encoder stack. ``encode(ids, mask)`` -> last hidden state; ``__call__`` -> the
  project's text dict (Wan convention: tokens past each prompt's length are zero)."""

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(
        cfg.vocab_size, cfg.d_model, rngs=rngs,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ('vocab', 'embed')))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def blocks(rngs: nnx.Rngs) -> UMT5Block:
      return UMT5Block(cfg, rngs=rngs)

    self.blocks = blocks(rngs)
    self.final_norm = T5Norm(cfg.d_model, cfg.eps, rngs=rngs)

  def encode(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """ids int [B,L], mask [B,L] (nonzero = token) -> last hidden state [B,L,D] float32.

    Like the reference, padded positions still get (meaningless) outputs: see ``__call__``.
    """
    pos = jnp.arange(ids.shape[1])
    buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.num_buckets,
                                       self.cfg.max_distance)
    key_bias = jnp.where(mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min)
    key_bias = key_bias.astype(jnp.float32)[:, None, None, :]
    x = self.embed(ids).astype(jnp.float32)

    @nnx.scan(in_axes=(nnx.Carry, 0, None, None), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def apply(x, block, buckets, key_bias):
      return block(x, buckets, key_bias)

    return self.final_norm(apply(x, self.blocks, buckets, key_bias))

  def __call__(self, ids: jax.Array, mask: jax.Array) -> dict[str, Any]:
    """ids int [B,L], mask [B,L] -> {'tokens': [B,L,D] float32, 'mask': bool [B,L],
    'pooled': None}.

    As Wan's ``_get_t5_prompt_embeds``: the first ``sum(mask)`` tokens of each row are kept
    and the rest are exactly zero (right padding); the returned mask marks the kept ones.
    """
    hidden = self.encode(ids, mask)
    lengths = jnp.sum(mask.astype(jnp.int32), axis=1)
    keep = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
    return {'tokens': jnp.where(keep[..., None], hidden, 0.0), 'mask': keep, 'pooled': None}


# ------------------------------------------------------------------------------ Weights

_BLOCK = r'encoder\.block\.(?P<layer>\d+)\.layer\.'
SHARED, EMBED_TOKENS = 'shared.weight', 'encoder.embed_tokens.weight'

# transformers' UMT5EncoderModel names -> our parameter paths (stacked over 'layer').
UMT5_RULES = (
    Rule(r'shared\.weight', 'embed/embedding'),
    Rule(r'encoder\.embed_tokens\.weight', 'embed/embedding'),  # tied alias of shared
    Rule(_BLOCK + r'0\.layer_norm\.weight', 'blocks/attn_norm/scale'),
    Rule(_BLOCK + r'0\.SelfAttention\.q\.weight', 'blocks/attn/q/kernel', 'linear'),
    Rule(_BLOCK + r'0\.SelfAttention\.k\.weight', 'blocks/attn/k/kernel', 'linear'),
    Rule(_BLOCK + r'0\.SelfAttention\.v\.weight', 'blocks/attn/v/kernel', 'linear'),
    Rule(_BLOCK + r'0\.SelfAttention\.o\.weight', 'blocks/attn/o/kernel', 'linear'),
    Rule(_BLOCK + r'0\.SelfAttention\.relative_attention_bias\.weight', 'blocks/attn/rel_bias'),
    Rule(_BLOCK + r'1\.layer_norm\.weight', 'blocks/ffn_norm/scale'),
    Rule(_BLOCK + r'1\.DenseReluDense\.wi_0\.weight', 'blocks/ffn/wi_0/kernel', 'linear'),
    Rule(_BLOCK + r'1\.DenseReluDense\.wi_1\.weight', 'blocks/ffn/wi_1/kernel', 'linear'),
    Rule(_BLOCK + r'1\.DenseReluDense\.wo\.weight', 'blocks/ffn/wo/kernel', 'linear'),
    Rule(r'encoder\.final_layer_norm\.weight', 'final_norm/scale'),
)


class TiedEmbeddingReader:
  """A reader in which ``shared.weight`` and ``encoder.embed_tokens.weight`` are one tensor.

  Either name alone is the embedding; with both, they must be equal (WeightsError otherwise)
  and only ``shared.weight`` is passed on, so the table maps one tensor to the embedding.
  """

  def __init__(self, reader):
    self._reader = reader
    keys = reader.keys()
    if SHARED in keys and EMBED_TOKENS in keys:
      if not np.array_equal(reader[SHARED], reader[EMBED_TOKENS]):
        raise loading.WeightsError(f'{SHARED} and {EMBED_TOKENS} are both present and differ; '
                                   'the encoder ties them, so they must be equal')
      keys = [k for k in keys if k != EMBED_TOKENS]
    self._keys = keys

  def keys(self) -> list[str]:
    return list(self._keys)

  def __getitem__(self, name: str) -> np.ndarray:
    return self._reader[name]


def abstract_umt5(cfg: UMT5Config) -> UMT5Encoder:
  """The encoder with ShapeDtypeStruct parameters (nothing allocated)."""
  return nnx.eval_shape(lambda: layers.build(UMT5Encoder, cfg, rngs=nnx.Rngs(0)))


def load_umt5(folder: str, *, mesh=None, logical_rules=(), dtype=jnp.float32,
              compute: str = 'float32') -> UMT5Encoder:
  """A transformers UMT5 encoder folder (config.json + model.safetensors or a sharded index)
  -> UMT5Encoder, each parameter placed with its sharding from ``logical_rules`` on ``mesh``.

  ``dtype`` is the storage dtype of the parameters; ``compute`` the matmul dtype. Missing,
  unexpected and mis-shaped tensors raise ``loading.WeightsError`` naming every key.
  """
  cfg = UMT5Config.from_hf(loading.read_config(folder), dtype=compute)
  graphdef, abstract = nnx.split(abstract_umt5(cfg))
  reader = TiedEmbeddingReader(loading.open_folder(folder))
  state = loading.load_state(abstract, reader, UMT5_RULES, mesh=mesh,
                             logical_rules=logical_rules, dtype=dtype)
  return nnx.merge(graphdef, state)
