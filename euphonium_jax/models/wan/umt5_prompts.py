"""Wan's prompt embeddings from the UMT5 encoder: host tokenization, jitted encode, disk cache.

The convention is diffusers' ``WanPipeline._get_t5_prompt_embeds``: clean the prompt (html
unescape, ftfy where installed, collapse whitespace), tokenize with padding='max_length',
truncation and special tokens (the closing </s>), encode with the padding mask, then keep the
first ``sum(mask)`` tokens of each row and zero the rest. Wan uses ``max_length=512``.
The result is the project's text dict ``{'tokens': [B,L,D], 'mask': [B,L], 'pooled': None}``.
"""
from __future__ import annotations

import functools
import hashlib
import html
import json
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from euphonium_jax.models.wan.umt5 import UMT5Encoder

MAX_LENGTH = 512  # Wan2.1's max_sequence_length


def load_tokenizer(folder: str):
  """The tokenizer saved in a local folder (``AutoTokenizer``; never downloads)."""
  # Without torch, importing transformers prints "PyTorch was not found..." (an advisory
  # warning: it only tokenizes here, the models are JAX).
  os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def clean_prompt(text: str) -> str:
  """diffusers' ``prompt_clean``: ftfy (if installed), double html unescape, whitespace."""
  try:
    import ftfy
    text = ftfy.fix_text(text)
  except ImportError:
    pass
  text = html.unescape(html.unescape(text)).strip()
  return re.sub(r'\s+', ' ', text).strip()


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_length: int = MAX_LENGTH):
  """Host step: prompts -> (ids int32 [B, max_length], mask bool [B, max_length])."""
  enc = tokenizer([clean_prompt(p) for p in prompts], padding='max_length',
                  max_length=max_length, truncation=True, add_special_tokens=True,
                  return_attention_mask=True, return_tensors='np')
  return (np.asarray(enc['input_ids'], np.int32),
          np.asarray(enc['attention_mask']).astype(bool))


@functools.partial(jax.jit, static_argnums=0)
def encode_tokens(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array,
                 mask: jax.Array) -> dict[str, Any]:
  """Jitted step: (graphdef, state) of a UMT5Encoder, ids [B,L], mask [B,L] -> text dict."""
  return nnx.merge(graphdef, state)(ids, mask)


def prompt_embeds(model: UMT5Encoder, tokenizer, prompts: Sequence[str],
                  max_length: int = MAX_LENGTH) -> dict[str, Any]:
  """Prompts -> {'tokens': [B,L,D] float32 (zero past each prompt), 'mask': bool [B,L],
  'pooled': None}, as Wan's ``_get_t5_prompt_embeds`` with ``max_sequence_length=L``."""
  ids, mask = tokenize_prompts(tokenizer, prompts, max_length)
  graphdef, state = nnx.split(model)
  return encode_tokens(graphdef, state, ids, mask)


def cache_key(prompts: Sequence[str], max_length: int, model_id: str, tokenizer) -> str:
  """sha256 over the prompts, max_length, the model's id and the tokenizer's name and size."""
  blob = json.dumps({'prompts': list(prompts), 'max_length': int(max_length),
                     'model': model_id, 'tokenizer': [str(tokenizer.name_or_path),
                                                      len(tokenizer)]})
  return hashlib.sha256(blob.encode()).hexdigest()


def cache_prompt_embeds(path: str, model: UMT5Encoder, tokenizer, prompts: Sequence[str], *,
                        model_id: str, max_length: int = MAX_LENGTH,
                        batch_size: int = 8) -> dict[str, Any]:
  """``prompt_embeds`` of a prompt set, computed once and then read from an .npz on disk.

  ``path`` is a folder (the file is ``umt5_<key[:16]>.npz`` in it) or an ``.npz`` path (a
  file there made for other prompts is recomputed and replaced). ``model_id`` names the
  weights (e.g. their folder): it is part of the key, with the prompts, ``max_length`` and the
  tokenizer. Only the kept tokens are stored. Returns host arrays: tokens float32 [N,L,D],
  mask bool [N,L], pooled None.
  """
  key = cache_key(prompts, max_length, model_id, tokenizer)
  file = path if path.endswith('.npz') else os.path.join(path, f'umt5_{key[:16]}.npz')
  if os.path.exists(file):
    with np.load(file) as z:
      if str(z['key']) == key:
        return _unpack(z['rows'], z['lengths'], int(z['max_length']))
  rows, lengths = [], []
  for i in range(0, len(prompts), batch_size):
    out = prompt_embeds(model, tokenizer, prompts[i:i + batch_size], max_length)
    tokens, n = np.asarray(out['tokens']), np.asarray(out['mask']).sum(1)
    rows += [t[:k] for t, k in zip(tokens, n)]
    lengths += list(n)
  rows = np.concatenate(rows) if rows else np.zeros((0, model.cfg.d_model), np.float32)
  lengths = np.asarray(lengths, np.int32)
  os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
  tmp = f'{file}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    np.savez(f, key=np.array(key), rows=rows, lengths=lengths, max_length=np.int32(max_length),
             prompts=np.array(list(prompts), dtype=str))
  os.replace(tmp, file)
  return _unpack(rows, lengths, max_length)


def _unpack(rows: np.ndarray, lengths: np.ndarray, max_length: int) -> dict[str, Any]:
  """Kept rows [sum(lengths), D] -> zero-padded tokens [N, max_length, D] and mask."""
  tokens = np.zeros((len(lengths), max_length, rows.shape[-1]), np.float32)
  mask = np.arange(max_length)[None, :] < np.asarray(lengths)[:, None]
  tokens[mask] = rows
  return {'tokens': tokens, 'mask': mask, 'pooled': None}
