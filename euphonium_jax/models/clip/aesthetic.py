"""The LAION improved-aesthetic predictor head (christophschuhmann/improved-aesthetic-predictor).

The published ``MLP`` is ``nn.Sequential(Linear(d, 1024), Dropout, Linear(1024, 128), Dropout,
Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1))``: five linear layers and no
activation (the ReLUs are commented out in the reference), so its state dict holds
``layers.{0,2,4,6,7}.{weight,bias}``. Its input is the CLIP ViT-L/14 image embedding
(d = 768) divided by its L2 norm; the output is the score (about 1-10 on real images).
``tools/convert_aesthetic.py`` writes the published ``.pth`` as ``aesthetic.safetensors``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from euphonium_jax.models import layers
from euphonium_jax.models.wan import loading
from euphonium_jax.models.wan.loading import Rule

FILENAME = 'aesthetic.safetensors'
HIDDEN = (1024, 128, 64, 16, 1)
TORCH_INDICES = (0, 2, 4, 6, 7)  # positions of the Linear layers in the nn.Sequential

AESTHETIC_RULES = tuple(
    r for i, idx in enumerate(TORCH_INDICES) for r in (
        Rule(rf'layers\.{idx}\.weight', f'layers/{i}/kernel', 'linear'),
        Rule(rf'layers\.{idx}\.bias', f'layers/{i}/bias')))


class AestheticMLP(nnx.Module):
  """L2-normalised image embeddings [N, d] -> scores [N] float32 (five affine maps)."""

  def __init__(self, input_dim: int, *, rngs: nnx.Rngs):
    dims = (input_dim,) + HIDDEN
    self.layers = nnx.List([layers.dense(a, b, (None, None), rngs=rngs)
                            for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, embeds: jax.Array) -> jax.Array:
    x = embeds.astype(jnp.float32)
    for layer in self.layers:
      x = layer(x)
    return x[:, 0]


def load_aesthetic(path: str, input_dim: int) -> AestheticMLP:
  """``aesthetic.safetensors`` (the converted published state dict) -> AestheticMLP.

  Wrong or missing tensors are one ``loading.WeightsError`` naming each (e.g. a head for
  another embedding width: shape mismatch of layers/0/kernel)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: layers.build(AestheticMLP, input_dim, rngs=nnx.Rngs(0))))
  state = loading.load_state(abstract, loading.TensorReader([path]), AESTHETIC_RULES)
  return nnx.merge(graphdef, state)


def torch_mlp(input_dim: int):
  """The published PyTorch module (the reference for tests and the converter's layout)."""
  from torch import nn
  return nn.Sequential(nn.Linear(input_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                       nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1),
                       nn.Linear(64, 16), nn.Linear(16, 1))


def random_torch_state_dict(input_dim: int, seed: int = 0) -> dict:
  """A random state dict with the published keys ('layers.0.weight', ...), torch tensors."""
  import torch
  torch.manual_seed(seed)
  mlp = torch_mlp(input_dim)
  return {f'layers.{k}': v.detach().clone().contiguous() for k, v in mlp.state_dict().items()}


def numpy_reference(state: dict, embeds: np.ndarray) -> np.ndarray:
  """The head in float64 numpy from a {name: array} state dict (an independent check)."""
  x = np.asarray(embeds, np.float64)
  for idx in TORCH_INDICES:
    x = x @ np.asarray(state[f'layers.{idx}.weight'], np.float64).T + np.asarray(
        state[f'layers.{idx}.bias'], np.float64)
  return x[:, 0]
