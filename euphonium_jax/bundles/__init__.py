"""Model families behind one declared interface, chosen from `config.model_family` here only.

A bundle is what a stage needs of a model family: load its networks (VAE, text encoder, flow
model) as `(graphdef, params, rest)` triples placed on the mesh, call them as pure functions,
encode prompts, build / load / call its latent process reward model, and save what a run
trained. `embedded` (the shipped 32x32 world) and `wan` (a Wan2.1 diffusers folder) implement
it; `tests/test_bundles.py` checks both against the protocol.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import os

import numpy as np

from euphonium_jax.data import prompts as prompts_lib

Net = tuple  # (graphdef, params, rest): rest is the non-trained state (may be frozen weights)
VelocityFn = Callable[[Any, Any, Any, Any], Any]  # ((params, rest), x, t, text) -> v
PrmFn = Callable[[Any, Any, Any, Any], Any]  # ((params, rest), x, t, text) -> [B] float32

FAMILIES = ("embedded", "wan")


@runtime_checkable
class TextEncoder(Protocol):
  """Host prompts -> the text encoder's output for them, on the device (replicated)."""

  def __call__(self, prompts: Sequence[str]) -> dict[str, Any]: ...


@runtime_checkable
class ModelBundle(Protocol):
  """What the stages call on a model family (see the module docstring)."""

  family: str
  null_prompt: str

  # Networks.
  def load_networks(self, workdir: str, mesh) -> tuple[Net, Net, Net, str]:
    """(vae, text, model, source): the base networks, placed on `mesh`."""
  def velocity_fn(self, graphdef) -> VelocityFn: ...
  def text_fn(self, graphdef) -> Callable: ...
  def decode_fn(self, graphdef) -> Callable:
    """((params, rest), latents) -> frames [B, F, H, W, 3] in [0, 1]."""
  def latent_shape(self) -> tuple[int, ...]: ...
  def model_param_shardings(self, mesh) -> Any: ...
  def reference_params(self, params) -> Any:
    """The KL reference's parameters (own buffers: the training state is donated)."""
  def save_final(self, directory: str, params, model_rest, vae: Net, text: Net,
                 summary: dict) -> None: ...
  def load_trained(self, directory: str, model: Net) -> Net:
    """`model` with the parameters a finished grpo run saved in `directory` (its `final/`)."""

  # Prompts.
  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...
  def text_encoder(self, text: Net, mesh, cache_dir: str | None = None,
                   prompts: Sequence[str] = ()) -> TextEncoder:
    """An encoder of host prompts; `prompts` may be embedded ahead (and cached on disk)."""

  # Process reward model.
  def init_prm(self, model: Net, seed: int) -> Net:
    """A new PRM (its trunk copied from the base model where configured)."""
  def abstract_prm(self) -> Any: ...
  def prm_param_shardings(self, mesh) -> Any: ...
  def load_prm(self, directory: str, mesh) -> Net: ...
  def save_prm(self, directory: str, prm: Net, text: Net, summary: dict) -> None: ...
  def prm_fn(self, graphdef) -> PrmFn: ...


def get(config) -> ModelBundle:
  """The bundle of `config.model_family` (the one place a family is chosen by name)."""
  family = config.get("model_family", "embedded")
  if family == "embedded":
    from euphonium_jax.bundles import embedded
    return embedded.EmbeddedBundle(config)
  if family == "wan":
    from euphonium_jax.bundles import wan
    return wan.WanBundle(config)
  raise ValueError(f"config.model_family = {family!r} is invalid: allowed values are "
                   + ", ".join(map(repr, FAMILIES)))


def run_text_encoder(config, bundle: ModelBundle, text: Net, mesh, prompt_set, workdir: str
                     ) -> TextEncoder:
  """A run's text encoder: a prompt file's prompts (both splits, negatives, the default
  negative prompt) embedded ahead into the disk cache (`data.cache_dir`, default
  WORKDIR/prompt_cache) where the bundle caches, the same for every stage of the run."""
  every = [] if prompt_set.is_world else prompts_lib.every_prompt(
      prompt_set, config.data.negative_prompt or bundle.null_prompt)
  return bundle.text_encoder(text, mesh, prompts=every, cache_dir=os.path.join(
      config.data.cache_dir or workdir, "prompt_cache"))
