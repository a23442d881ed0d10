"""The embedded world as a `ModelBundle`: the shipped VAE, text encoder, flow model and PRM
(`euphonium_jax/embedded.py` builds and loads them; this class presents them to the stages)."""
from __future__ import annotations

from typing import Sequence

import jax

from euphonium_jax import checkpoint, embedded, parallel, training
from euphonium_jax.models import prm as models_prm


def _place_like(tree, like):
  return jax.tree.map(lambda a, b: jax.device_put(a, b.sharding) if hasattr(b, "sharding")
                      else a, tree, like)


class EmbeddedBundle:
  family = "embedded"
  null_prompt = embedded.NULL_PROMPT

  def __init__(self, config):
    self.config = config

  # ---------------------------------------------------------------------------- Networks

  def load_networks(self, workdir: str, mesh):
    self._workdir = workdir
    return embedded.load_networks(self.config, workdir, mesh)

  def velocity_fn(self, graphdef):
    return embedded.velocity_fn(graphdef)

  def text_fn(self, graphdef):
    return embedded.text_fn(graphdef)

  def decode_fn(self, graphdef):
    return embedded.decode_fn(graphdef)

  def latent_shape(self) -> tuple[int, ...]:
    return tuple(embedded.latent_shape(self.config))

  def model_param_shardings(self, mesh):
    return embedded.model_param_shardings(self.config, mesh)

  def reference_params(self, params):
    return embedded.reference_params(self.config, params)

  def save_final(self, directory: str, params, model_rest, vae, text, summary) -> None:
    embedded.save_final(directory, params, model_rest, vae, text, summary, self.config)

  def load_trained(self, directory: str, model):
    """A finished run's `final/` holds all three networks; the model's, placed as `model`'s."""
    g, p, r = embedded.load("model", self.config, directory)
    return g, _place_like(p, model[1]), _place_like(r, model[2])

  # ----------------------------------------------------------------------------- Prompts

  def tokenize(self, prompts: Sequence[str]):
    return embedded.tokenize(self.config, prompts)

  def text_encoder(self, text, mesh, cache_dir: str | None = None, prompts: Sequence[str] = ()):
    """Tokenise on the host, encode with the (small, replicated) text encoder per call."""
    del cache_dir, prompts  # a forward of the tiny encoder costs less than a cache read
    program = jax.jit(embedded.text_fn(text[0]), out_shardings=parallel.replicated(mesh))

    def encode(prompts: Sequence[str]):
      ids, mask = self.tokenize(list(prompts))
      return program(text[1:], ids, mask)
    return encode

  # --------------------------------------------------------------------------------- PRM

  def init_prm(self, model, seed: int):
    """A fresh LatentPRM, initialised in one program; trunk from the base if configured."""
    graphdef = embedded.split_params(self.abstract_prm())[0]
    params, rest = jax.jit(lambda: embedded.split_params(
        embedded.build("prm", self.config, seed=seed))[1:])()
    if self.config.prm.init_from_base:
      params = models_prm.init_from_base(params, model[1])
    return graphdef, params, rest

  def abstract_prm(self):
    return embedded.abstract("prm", self.config)

  def prm_param_shardings(self, mesh):
    return training.param_shardings(self.abstract_prm(), mesh, self.config.sharding.rules)

  def load_prm(self, directory: str, mesh):
    g, p, r = embedded.load("prm", self.config, directory)
    return (g,) + tuple(jax.device_put((p, r), parallel.replicated(mesh)))

  def save_prm(self, directory: str, prm, text, summary: dict) -> None:
    """The PRM and the text encoder its inputs come from (a self-contained `init.prm`)."""
    checkpoint.save_final(directory, {"prm": {"params": prm[1], "rest": prm[2]},
                                      "text": {"params": text[1], "rest": text[2]}}, summary,
                          config_json=self.config.to_json_best_effort(indent=2))

  def prm_fn(self, graphdef):
    return embedded.prm_fn(graphdef)

