"""CLIP weights: transformers' ``CLIPModel`` folders and open_clip state dicts (HPSv2.1) -> NNX.

One name table (``CLIP_RULES``, transformers names) read through the project's loader
(``models/wan/loading.py``: header checks, one WeightsError naming every missing, unexpected
or mis-shaped tensor, sharded placement). An open_clip state dict (``visual.conv1.weight``,
``visual.transformer.resblocks.N.attn.in_proj_weight``, ``ln_final``...) is read through
``OpenClipReader``, which presents it under transformers' names: the fused ``in_proj`` of
every attention split into q, k, v (rows [0:D], [D:2D], [2D:3D], as
``nn.MultiheadAttention`` does), ``visual.proj`` / ``text_projection`` ([in, out], used as
``x @ proj``) transposed to Linear weights. open_clip files carry no architecture, so the
folder's ``config.json`` holds a transformers CLIP config (``OPEN_CLIP_CONFIGS`` has ViT-H-14,
HPSv2.1's backbone).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from euphonium_jax.models.clip import model as clip_model
from euphonium_jax.models.wan import loading
from euphonium_jax.models.wan.loading import Rule

_T = r'(?P<tower>vision|text)_model\.'
_L = _T + r'encoder\.layers\.(?P<layer>\d+)\.'

CLIP_RULES = (
    Rule(r'vision_model\.embeddings\.class_embedding', 'vision/class_embedding'),
    Rule(r'vision_model\.embeddings\.patch_embedding\.weight', 'vision/patch', 'conv2d'),
    Rule(r'vision_model\.embeddings\.position_embedding\.weight', 'vision/position_embedding'),
    Rule(r'vision_model\.pre_layrnorm\.weight', 'vision/pre_layernorm/scale'),
    Rule(r'vision_model\.pre_layrnorm\.bias', 'vision/pre_layernorm/bias'),
    Rule(r'vision_model\.post_layernorm\.weight', 'vision/post_layernorm/scale'),
    Rule(r'vision_model\.post_layernorm\.bias', 'vision/post_layernorm/bias'),
    Rule(r'text_model\.embeddings\.token_embedding\.weight', 'text/token_embedding/embedding'),
    Rule(r'text_model\.embeddings\.position_embedding\.weight', 'text/position_embedding'),
    Rule(r'text_model\.final_layer_norm\.weight', 'text/final_layernorm/scale'),
    Rule(r'text_model\.final_layer_norm\.bias', 'text/final_layernorm/bias'),
    Rule(_L + r'self_attn\.(?P<p>q|k|v)_proj\.weight', '{tower}/blocks/attn/{p}/kernel', 'linear'),
    Rule(_L + r'self_attn\.(?P<p>q|k|v)_proj\.bias', '{tower}/blocks/attn/{p}/bias'),
    Rule(_L + r'self_attn\.out_proj\.weight', '{tower}/blocks/attn/out/kernel', 'linear'),
    Rule(_L + r'self_attn\.out_proj\.bias', '{tower}/blocks/attn/out/bias'),
    Rule(_L + r'layer_norm(?P<n>1|2)\.weight', '{tower}/blocks/layer_norm{n}/scale'),
    Rule(_L + r'layer_norm(?P<n>1|2)\.bias', '{tower}/blocks/layer_norm{n}/bias'),
    Rule(_L + r'mlp\.(?P<fc>fc1|fc2)\.weight', '{tower}/blocks/{fc}/kernel', 'linear'),
    Rule(_L + r'mlp\.(?P<fc>fc1|fc2)\.bias', '{tower}/blocks/{fc}/bias'),
    Rule(r'visual_projection\.weight', 'visual_projection/kernel', 'linear'),
    Rule(r'text_projection\.weight', 'text_projection/kernel', 'linear'),
    Rule(r'logit_scale', 'logit_scale'),
)
CLIP_IGNORE = (r'.*position_ids',)  # a buffer older transformers versions saved

# ----------------------------------------------------------------------------- open_clip

# open_clip name pieces -> transformers name pieces (per tower and per block).
_OC_TOP = {
    'visual.class_embedding': 'vision_model.embeddings.class_embedding',
    'visual.conv1.weight': 'vision_model.embeddings.patch_embedding.weight',
    'visual.positional_embedding': 'vision_model.embeddings.position_embedding.weight',
    'visual.ln_pre.weight': 'vision_model.pre_layrnorm.weight',
    'visual.ln_pre.bias': 'vision_model.pre_layrnorm.bias',
    'visual.ln_post.weight': 'vision_model.post_layernorm.weight',
    'visual.ln_post.bias': 'vision_model.post_layernorm.bias',
    'token_embedding.weight': 'text_model.embeddings.token_embedding.weight',
    'positional_embedding': 'text_model.embeddings.position_embedding.weight',
    'ln_final.weight': 'text_model.final_layer_norm.weight',
    'ln_final.bias': 'text_model.final_layer_norm.bias',
    'logit_scale': 'logit_scale',
}
_OC_TRANSPOSED = {'visual.proj': 'visual_projection.weight',
                  'text_projection': 'text_projection.weight'}
_OC_BLOCK = {'ln_1': 'layer_norm1', 'ln_2': 'layer_norm2', 'attn.out_proj': 'self_attn.out_proj',
             'mlp.c_fc': 'mlp.fc1', 'mlp.c_proj': 'mlp.fc2'}
_OC_IGNORE = ('attn_mask',)  # a causal-mask buffer some open_clip versions saved


def is_open_clip(names) -> bool:
  return 'visual.conv1.weight' in set(names)


def _oc_block(name: str):
  """'visual.transformer.resblocks.3.ln_1.weight' -> ('vision', 3, 'ln_1', 'weight') | None."""
  for prefix, tower in (('visual.transformer.resblocks.', 'vision'),
                        ('transformer.resblocks.', 'text')):
    if name.startswith(prefix):
      layer, rest = name[len(prefix):].split('.', 1)
      piece, kind = rest.rsplit('.', 1)
      return tower, int(layer), piece, kind
  return None


class OpenClipReader:
  """An open_clip CLIP state dict read under transformers' ``CLIPModel`` names.

  Names it does not know (e.g. a layer-scale ``ls_1``, which transformers' CLIP lacks) are
  passed on unchanged, so the loader reports them as unexpected.
  """

  def __init__(self, reader):
    self._reader, self._map = reader, {}  # ours -> (their name, how)
    for name in reader.keys():
      if name in _OC_IGNORE:
        continue
      if name in _OC_TOP:
        self._map[_OC_TOP[name]] = (name, None)
      elif name in _OC_TRANSPOSED:
        self._map[_OC_TRANSPOSED[name]] = (name, 'T')
      elif (b := _oc_block(name)) is not None:
        tower, layer, piece, kind = b
        base = f'{tower}_model.encoder.layers.{layer}.'
        if piece == 'attn' and kind in ('in_proj_weight', 'in_proj_bias'):
          suffix = 'weight' if kind == 'in_proj_weight' else 'bias'
          for i, p in enumerate('qkv'):
            self._map[f'{base}self_attn.{p}_proj.{suffix}'] = (name, i)
        elif piece in _OC_BLOCK:
          self._map[f'{base}{_OC_BLOCK[piece]}.{kind}'] = (name, None)
        else:
          self._map[name] = (name, None)
      else:
        self._map[name] = (name, None)
    self.folder = getattr(reader, 'folder', '')

  def keys(self) -> list[str]:
    return list(self._map)

  def __getitem__(self, name: str) -> np.ndarray:
    theirs, how = self._map[name]
    x = self._reader[theirs]
    if how == 'T':
      return np.ascontiguousarray(x.T)
    if isinstance(how, int):
      if x.shape[0] % 3:
        raise loading.WeightsError(f'{theirs}: shape {x.shape}, the fused q/k/v projection '
                                   'needs a first axis divisible by 3')
      d = x.shape[0] // 3
      return x[how * d:(how + 1) * d]
    return x


# ViT-H-14 (open_clip's 'ViT-H-14', the backbone of HPSv2.1 and PickScore) as a transformers
# CLIP config: write it as config.json next to an open_clip state dict converted to safetensors.
OPEN_CLIP_CONFIGS = {
    'ViT-H-14': {
        'projection_dim': 1024, 'logit_scale_init_value': 2.6592,
        'vision_config': {'hidden_size': 1280, 'intermediate_size': 5120,
                          'num_hidden_layers': 32, 'num_attention_heads': 16, 'image_size': 224,
                          'patch_size': 14, 'hidden_act': 'gelu', 'layer_norm_eps': 1e-5},
        'text_config': {'hidden_size': 1024, 'intermediate_size': 4096,
                        'num_hidden_layers': 24, 'num_attention_heads': 16,
                        'vocab_size': 49408, 'max_position_embeddings': 77,
                        'hidden_act': 'gelu', 'layer_norm_eps': 1e-5, 'eos_token_id': 2},
    },
}


# ------------------------------------------------------------------------------- Loading


def read_clip_config(folder: str, dtype: str = 'float32') -> clip_model.CLIPConfig:
  return clip_model.CLIPConfig.from_hf(loading.read_config(folder), dtype=dtype)


def reader_for(folder: str):
  """The folder's tensors under transformers' names (open_clip naming detected and mapped)."""
  reader = loading.open_folder(folder)
  return OpenClipReader(reader) if is_open_clip(reader.keys()) else reader


def load_clip(folder: str, *, mesh=None, logical_rules=(), dtype=jnp.float32,
              compute: str = 'float32') -> clip_model.CLIP:
  """A CLIP folder (config.json + safetensors with transformers' or open_clip's names)
  -> CLIP, each parameter placed with its sharding from ``logical_rules`` on ``mesh``.

  ``dtype``: storage dtype of the parameters; ``compute``: the matmul dtype. Missing,
  unexpected and mis-shaped tensors raise ``loading.WeightsError`` naming every key.
  """
  cfg = read_clip_config(folder, compute)
  graphdef, abstract = nnx.split(clip_model.abstract_clip(cfg))
  state = loading.load_state(abstract, reader_for(folder), CLIP_RULES, ignore=CLIP_IGNORE,
                             mesh=mesh, logical_rules=logical_rules, dtype=dtype)
  return nnx.merge(graphdef, state)


def load_tokenizer(folder: str):
  """The folder's tokenizer through transformers (``AutoTokenizer``; local files only)."""
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def tokenize(tokenizer, prompts, max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """prompts -> (ids int32 [N, max_length], mask int32 [N, max_length]): truncated and
  right-padded to ``max_length`` (the text tower's positions), as CLIP processors do."""
  enc = tokenizer(list(prompts), padding='max_length', truncation=True, max_length=max_length,
                  return_tensors='np')
  return enc['input_ids'].astype(np.int32), enc['attention_mask'].astype(np.int32)


def read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def preprocessor_config(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, 'preprocessor_config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{folder}: no preprocessor_config.json (CLIPImageProcessor)')
  return read_json(path)
