"""The embedded world's networks: build, load and call its VAE, text encoder, flow model and PRM.

Every stage that touches the embedded world's networks goes through here, so that "which
networks, from which checkpoint" has one answer; `bundles/embedded.py` presents them through
the `ModelBundle` protocol the grpo, prm and evaluate stages use. Networks are built without eager
sharding (their parameters carry logical axis names; `parallel.state_shardings` maps them).
"""

from __future__ import annotations

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from euphonium_jax import checkpoint, paths, training
from euphonium_jax.bundles import common
from euphonium_jax.data import prompt_table as prompt_table_lib
from euphonium_jax.data import world
from euphonium_jax.models import api as models_api
from euphonium_jax.models import prm as models_prm
from euphonium_jax.models import text as text_lib

NULL_PROMPT = prompt_table_lib.NULL_PROMPT


def network_configs(config) -> ml_collections.ConfigDict:
  """config.{vae,text,model} with the sizes derived from the world filled in."""
  nets = ml_collections.ConfigDict({k: config[k].to_dict() for k in ("vae", "text", "model")})
  down_t = 2 if config.vae.temporal_downsample else 1
  down_s = 2 ** (len(config.vae.channels) - 1)
  nets.vae.frames = config.world.frames
  nets.vae.resolution = config.world.size
  nets.vae.kl_weight = config.vae_train.kl_weight
  nets.model.in_channels = config.vae.latent_channels
  nets.model.latent_shape = (config.world.frames // down_t, config.world.size // down_s,
                             config.world.size // down_s)
  nets.model.text_dim = config.text.width
  nets.model.pooled_dim = config.text.pooled_dim
  models_api.validate_model_configs(nets)
  return nets


def prm_network_config(config) -> ml_collections.ConfigDict:
  """The PRM's flat network config: the velocity model's keys with config.prm's sizes."""
  cfg = ml_collections.ConfigDict(network_configs(config).model.to_dict())
  p = config.prm
  cfg.update(depth=p.depth, width=p.width or cfg.width, heads=p.heads or cfg.heads,
             num_queries=p.num_queries, head_width=p.head_width)
  return cfg


def build(kind: str, config, seed: int = 0) -> nnx.Module:
  """A freshly initialised network: kind in {'vae', 'text', 'model', 'prm'}."""
  if kind == "prm":
    with nnx.use_eager_sharding(False):
      return models_prm.make_prm(prm_network_config(config), nnx.Rngs(seed))
  make = {"vae": models_api.make_vae, "text": models_api.make_text_encoder,
          "model": models_api.make_dit}[kind]
  with nnx.use_eager_sharding(False):
    return make(network_configs(config)[kind], nnx.Rngs(seed))


def abstract(kind: str, config) -> nnx.Module:
  """The network's shapes only (nothing allocated)."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: build(kind, config))


def split_params(module: nnx.Module):
  """(graphdef, params as a pure dict, other state as a pure dict)."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


# ------------------------------------------------------------------------------- Prompts


def tokenizer(config):
  return text_lib.build_tokenizer(world.vocabulary(), max_length=config.text.max_length)


def tokenize(config, prompts) -> tuple[np.ndarray, np.ndarray]:
  return text_lib.tokenize(tokenizer(config), list(prompts), config.text.max_length)


def prompt_table(config) -> prompt_table_lib.PromptTable:
  """Every caption of the world and the null caption, tokenised (the pretrain stage's)."""
  return prompt_table_lib.build(lambda prompts: tokenize(config, prompts))


# ------------------------------------------------------------------------------ Loading


def load_networks(config, workdir: str, mesh):
  """(vae, text, model) (graphdef, params, rest) triples from the flow model's finished stage
  (vae and text replicated: small), and that directory."""
  source = flow_dir(config, workdir)
  tree = checkpoint.load_final(source)
  vae, text, model = (load(k, config, source, tree) for k in ("vae", "text", "model"))
  rep = NamedSharding(mesh, P())
  vae, text = ((n[0],) + jax.device_put(n[1:], rep) for n in (vae, text))
  return vae, text, model, source


def model_param_shardings(config, mesh):
  return training.param_shardings(abstract("model", config), mesh, config.sharding.rules)


def reference_params(config, params):
  """The KL reference: a frozen copy of the starting parameters (own buffers)."""
  return jax.tree.map(jnp.copy, params)


def save_final(directory: str, state_params, model_rest, vae, text, summary, config) -> None:
  checkpoint.save_final(directory, {
      "model": {"params": state_params, "rest": model_rest},
      "vae": {"params": vae[1], "rest": vae[2]},
      "text": {"params": text[1], "rest": text[2]},
  }, summary, config_json=config.to_json_best_effort(indent=2))


def vae_dir(config, workdir: str) -> str:
  return checkpoint_dir(config.init.vae, workdir, "vae")


def flow_dir(config, workdir: str) -> str:
  return checkpoint_dir(config.init.pretrain, workdir, "pretrain")


def prm_dir(config, workdir: str) -> str:
  return checkpoint_dir(config.init.prm, workdir, "prm")


def checkpoint_dir(init_path: str, workdir: str, stage: str) -> str:
  """A finished stage's directory: from the config's path, else this workdir's stage."""
  return paths.stage_source(init_path, workdir, stage)


def load(kind: str, config, directory: str, tree: dict | None = None):
  """(graphdef, params, rest) of a network restored from a finished stage directory.

  `tree`: the directory's arrays when already read (`checkpoint.load_final`).
  """
  graphdef, params, rest = split_params(abstract(kind, config))
  tree = checkpoint.load_final(directory) if tree is None else tree
  if kind not in tree:
    raise ValueError(f"{directory} holds no {kind!r} network (it has {sorted(tree)})")
  entry = tree[kind]
  try:
    params = common.match_tree(params, entry["params"])
    rest = common.match_tree(rest, entry["rest"])
  except (KeyError, ValueError) as e:
    raise ValueError(
        f"the {kind} checkpoint in {directory} does not match config.{kind} "
        f"(different sizes?): {e}") from None
  return graphdef, params, rest


# -------------------------------------------------------------------------- Pure calls
# The adapters of models/api.py turn graphdefs into pure functions of a (params, rest) tuple:
#   velocity((params, rest), x_t, t, text), text_fn((params, rest), ids, mask),
#   encode((params, rest), frames), decode((params, rest), z), prm((params, rest), x_t, t, text).
velocity_fn = models_api.make_velocity_fn
text_fn = models_api.make_text_fn
encode_fn = models_api.make_encode_fn
decode_fn = models_api.make_decode_fn
prm_fn = models_prm.make_prm_fn  # prm((params, rest), x_t, t, text) -> [B]


def latent_shape(config) -> tuple[int, int, int, int]:
  """(T', h, w, C) of the VAE latent for the configured world."""
  return tuple(network_configs(config).model.latent_shape) + (config.vae.latent_channels,)
