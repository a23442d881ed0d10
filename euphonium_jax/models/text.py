"""Tokenizer and text encoder of the embedded world.

The encoder's output dict ``{'tokens': [B,L,D], 'mask': [B,L], 'pooled': [B,D'] | None}``
is the text-conditioning interface of every velocity network (real families such as Wan
return ``pooled=None``).
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from euphonium_jax.models import layers

PAD, UNK, CLS = '[PAD]', '[UNK]', '[CLS]'


def build_tokenizer(words: Sequence[str], max_length: int = 8):
  """Word-level tokenizer built in code (nothing downloaded).

  Ids: [PAD]=0, [UNK]=1, [CLS]=2, then ``words`` (lower-cased, de-duplicated, in order).
  Every encoding starts with [CLS], so even an empty prompt has one unmasked token.

  Returns:
    A ``transformers.PreTrainedTokenizerFast`` with ``model_max_length=max_length``.
  """
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
  # Without torch, importing transformers prints "PyTorch was not found..." (an advisory
  # warning: it only tokenizes here, the models are JAX).
  os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')
  from transformers import PreTrainedTokenizerFast

  vocab = {PAD: 0, UNK: 1, CLS: 2}
  for word in words:
    vocab.setdefault(word.lower(), len(vocab))
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
      single=f'{CLS} $A', special_tokens=[(CLS, vocab[CLS])])
  return PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token=PAD, unk_token=UNK, cls_token=CLS,
      model_max_length=max_length, padding_side='right')


def tokenize(tokenizer, prompts: Sequence[str], max_length: int | None = None):
  """Prompts -> (ids int32 [B, L], mask bool [B, L]), right-padded/truncated to L.

  ``max_length`` defaults to ``tokenizer.model_max_length``.
  """
  length = max_length or tokenizer.model_max_length
  enc = tokenizer(list(prompts), padding='max_length', truncation=True,
                  max_length=length, return_tensors='np')
  return (np.asarray(enc['input_ids'], np.int32),
          np.asarray(enc['attention_mask']).astype(bool))


class TextBlock(nnx.Module):
  """Pre-LN transformer block with key-masked self-attention."""

  def __init__(self, width: int, heads: int, mlp_ratio: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.norm1 = layers.layer_norm(width, rngs=rngs)
    self.qkv = layers.dense(width, 3 * width, ('embed', 'heads'), rngs=rngs)
    self.out = layers.dense(width, width, ('heads', 'embed'), rngs=rngs)
    self.norm2 = layers.layer_norm(width, rngs=rngs)
    self.fc1 = layers.dense(width, mlp_ratio * width, ('embed', 'mlp'), rngs=rngs)
    self.fc2 = layers.dense(mlp_ratio * width, width, ('mlp', 'embed'), rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x [B,L,D], mask [B,L] -> [B,L,D]."""
    b, l, d = x.shape
    qkv = self.qkv(self.norm1(x)).reshape(b, l, 3, self.heads, d // self.heads)
    h = layers.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask, 'xla',
                         jnp.float32)
    x = x + self.out(h.reshape(b, l, d))
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


class TextEncoder(nnx.Module):
  """Small transformer text encoder: token + learned position embeddings, pre-LN blocks.

  Args:
    vocab_size: embedding rows (>= ``len(tokenizer)``).
    width: token dim D. depth/heads/mlp_ratio: transformer sizes.
    max_length: number of learned positions (L <= max_length).
    pooled_dim: dim D' of the pooled vector (masked mean + projection); default ``width``.
  """

  def __init__(self, vocab_size: int, width: int = 64, depth: int = 2, heads: int = 4,
               mlp_ratio: int = 4, max_length: int = 8, pooled_dim: int | None = None,
               *, rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f'text.width={width} must be divisible by text.heads={heads}')
    self.width = width
    self.pooled_dim = pooled_dim or width
    self.embed = nnx.Embed(
        vocab_size, width, rngs=rngs,
        embedding_init=nnx.with_partitioning(
            nnx.initializers.normal(0.02), ('vocab', 'embed')))
    self.pos = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (max_length, width)),
        out_sharding=(None, 'embed'))
    self.blocks = nnx.List(
        [TextBlock(width, heads, mlp_ratio, rngs=rngs) for _ in range(depth)])
    self.norm = layers.layer_norm(width, rngs=rngs)
    self.pool = layers.dense(width, self.pooled_dim, ('embed', 'mlp'), rngs=rngs)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """ids int [B,L], mask [B,L] -> dict(tokens [B,L,D] (0 at padding), mask bool [B,L],
    pooled [B,D'])."""
    mask = mask.astype(bool)
    x = self.embed(ids) + self.pos[: ids.shape[1]][None]
    for block in self.blocks:
      x = block(x, mask)
    m = mask[..., None].astype(jnp.float32)
    x = self.norm(x) * m
    mean = x.sum(1) / jnp.maximum(m.sum(1), 1.0)
    return {'tokens': x, 'mask': mask, 'pooled': self.pool(mean)}
