"""LoRA on the Wan transformer: trainable split, the adapters-off KL reference, merging, and
export in the naming diffusers' ``load_lora_weights`` / ``load_lora_adapter`` reads.

The adapters live in the model (``transformer.LoRA`` on the targets of ``WanConfig``): only
``LoRAParam`` leaves are trained, so only they enter the optimiser state; the published
weights stay frozen (and sharded as loaded). The KL reference is the same network with the
``LoRAScale`` leaf set to 0: no second copy of the model.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from euphonium_jax.models.wan import transformer as wt

# Our adapter key (inside attn1 / attn2 / ffn) -> the diffusers module name and our base layer.
_ATTN = {'to_q': 'to_q', 'to_k': 'to_k', 'to_v': 'to_v', 'to_out_0': 'to_out'}
_FFN = {'ffn_net_0_proj': ('net.0.proj', 'proj_in'), 'ffn_net_2': ('net.2', 'proj_out')}


def split_trainable(graphdef: nnx.GraphDef, state: nnx.State):
  """-> (adapters: the LoRAParam leaves, frozen: everything else). ``nnx.merge(graphdef,
  adapters, frozen)`` rebuilds the model."""
  model = nnx.merge(graphdef, state)
  graphdef, adapters, frozen = nnx.split(model, wt.LoRAParam, ...)
  return graphdef, adapters, frozen


def reference_state(frozen: nnx.State) -> nnx.State:
  """The frozen part with the adapters switched off (LoRA scale 0): the KL reference."""
  return _with_scale(frozen, 0.0)


def _with_scale(frozen: nnx.State, value: float) -> nnx.State:
  flat = nnx.to_flat_state(frozen)
  out = []
  for path, leaf in flat:
    if path == ('lora_scale',):
      leaf = leaf.replace(jnp.zeros_like(leaf[...]) + value)
    out.append((path, leaf))
  return nnx.from_flat_state(out)


def _pairs(state: nnx.State):
  """Yields (diffusers module name without block index, attn|ffn part, our adapter key, our
  base layer name) for every adapter present in ``state``."""
  blocks = state['blocks']
  present = lambda part: blocks[part]['lora'] if part in blocks and 'lora' in blocks[part] \
      else {}
  for part in ('attn1', 'attn2'):
    for key, base in _ATTN.items():
      if key in present(part):
        yield f'{part}.{key.replace("to_out_0", "to_out.0")}', part, key, base
  for key, (name, base) in _FFN.items():
    if key in present('ffn'):
      yield f'ffn.{name}', 'ffn', key, base


def export(state: nnx.State, path: str, prefix: str = 'transformer') -> dict[str, np.ndarray]:
  """Writes the adapters as safetensors named ``{prefix}.blocks.{i}.{module}.lora_A.weight``
  ([rank, in]) and ``lora_B.weight`` ([out, rank]), diffusers' PEFT naming. The scale
  alpha / rank is folded into B, so a loader that assumes alpha = rank (diffusers without
  alpha metadata) reproduces the model exactly. Returns the tensors written."""
  from safetensors.numpy import save_file
  scale = float(np.asarray(state['lora_scale'][...]))
  blocks = state['blocks']
  tensors = {}
  for module, part, key, _ in _pairs(state):
    a = np.asarray(jax.device_get(blocks[part]['lora'][key]['a'][...]), np.float32)
    b = np.asarray(jax.device_get(blocks[part]['lora'][key]['b'][...]), np.float32)
    for i in range(a.shape[0]):
      tensors[f'{prefix}.blocks.{i}.{module}.lora_A.weight'] = np.ascontiguousarray(a[i].T)
      tensors[f'{prefix}.blocks.{i}.{module}.lora_B.weight'] = np.ascontiguousarray(
          (scale * b[i]).T)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file(tensors, path)
  return tensors


def merge(state: nnx.State) -> nnx.State:
  """Base kernels + scale * A B, adapters switched off: a plain model with the same output."""
  scale = state['lora_scale'][...]
  flat = dict(nnx.to_flat_state(state))
  blocks = state['blocks']
  for _, part, key, base in _pairs(state):
    ad = blocks[part]['lora'][key]
    delta = scale * jnp.einsum('lir,lro->lio', ad['a'][...], ad['b'][...])
    kpath = ('blocks', part, base, 'kernel')
    flat[kpath] = flat[kpath].replace(flat[kpath][...] + delta.astype(flat[kpath][...].dtype))
  flat[('lora_scale',)] = flat[('lora_scale',)].replace(jnp.zeros_like(scale))
  return nnx.from_flat_state(list(flat.items()))
