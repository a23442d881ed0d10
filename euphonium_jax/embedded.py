"""The embedded world's model bundle: build, load and call its VAE, text encoder and flow model.

Every stage that touches the embedded world goes through here, so that "which networks, from
which checkpoint, with which prompts" has one answer. Networks are built without eager
sharding (their parameters carry logical axis names; `parallel.state_shardings` maps them).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from euphonium_jax import checkpoint
from euphonium_jax.data import world
from euphonium_jax.models import api as models_api
from euphonium_jax.models import prm as models_prm
from euphonium_jax.models import text as text_lib

NULL_PROMPT = ""  # the unconditional caption (classifier-free guidance, caption dropout)


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


@dataclasses.dataclass(frozen=True)
class PromptTable:
  """Token ids of every caption of the world, indexed by combo, plus the null caption.

  Lets a jitted step turn attribute triples into text inputs without leaving the device.
  """
  ids: np.ndarray  # int32 [num_combos + 1, L]; the last row is the null caption
  mask: np.ndarray  # bool [num_combos + 1, L]

  @property
  def null_index(self) -> int:
    return self.ids.shape[0] - 1


def combo_index(attrs: jax.Array) -> jax.Array:
  """[n, 3] (colour, shape, direction) -> [n] index into `PromptTable` rows."""
  ns, nd = len(world.SHAPES), len(world.DIRECTIONS)
  return attrs[..., 0] * (ns * nd) + attrs[..., 1] * nd + attrs[..., 2]


def tokenizer(config):
  return text_lib.build_tokenizer(world.vocabulary(), max_length=config.text.max_length)


def all_captions() -> list[str]:
  """Every caption of the world, in `combo_index` order."""
  everything = [(c, s, d) for c in range(len(world.COLOURS)) for s in range(len(world.SHAPES))
                for d in range(len(world.DIRECTIONS))]
  return world.captions(np.asarray(everything, np.int32))


def prompt_table(config) -> PromptTable:
  caps = all_captions() + [NULL_PROMPT]
  ids, mask = text_lib.tokenize(tokenizer(config), caps, config.text.max_length)
  return PromptTable(ids=ids, mask=mask)


def tokenize(config, prompts) -> tuple[np.ndarray, np.ndarray]:
  return text_lib.tokenize(tokenizer(config), list(prompts), config.text.max_length)


# ------------------------------------------------------------------------------ Loading


def bundle(config):
  """The model bundle of `config.model_family`: this module, or `wan_bundle` (same calls)."""
  if config.get("model_family", "embedded") == "wan":
    from euphonium_jax import wan_bundle
    return wan_bundle
  import sys
  return sys.modules[__name__]


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
  from euphonium_jax import training
  return training.param_shardings(abstract("model", config), mesh, config.sharding.rules)


def reference_params(config, params):
  """The KL reference: a frozen copy of the starting parameters (own buffers)."""
  return jax.tree.map(jnp.copy, params)


def save_final(directory: str, state_params, model_rest, vae, text, summary, config) -> None:
  checkpoint.save_final(directory, {
      "model": {"params": state_params, "rest": model_rest},
      "vae": {"params": vae[1], "rest": vae[2]},
      "text": {"params": text[1], "rest": text[2]},
  }, summary)


def vae_dir(config, workdir: str) -> str:
  return checkpoint_dir(config.init.vae, workdir, "vae")


def flow_dir(config, workdir: str) -> str:
  return checkpoint_dir(config.init.pretrain, workdir, "pretrain")


def prm_dir(config, workdir: str) -> str:
  return checkpoint_dir(config.init.prm, workdir, "prm")


def checkpoint_dir(init_path: str, workdir: str, stage: str) -> str:
  """A finished stage's directory: from the config's path, else this workdir's stage."""
  if init_path:
    from euphonium_jax.config import resolve_path
    path = resolve_path(init_path)
    sub = os.path.join(path, stage)
    return sub if checkpoint.is_done(sub) else path
  return os.path.join(workdir, stage, "final")


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
    params = _match(params, entry["params"])
    rest = _match(rest, entry["rest"])
  except (KeyError, ValueError) as e:
    raise ValueError(
        f"the {kind} checkpoint in {directory} does not match config.{kind} "
        f"(different sizes?): {e}") from None
  return graphdef, params, rest


def _match(template, restored, path: str = ""):
  """`restored` arranged as `template` (orbax returns list indices as string keys)."""
  if isinstance(template, dict):
    if not isinstance(restored, dict):
      raise ValueError(f"{path or 'root'}: expected a group, found an array")
    missing = [k for k in template if k not in restored and str(k) not in restored]
    if missing or len(restored) != len(template):
      raise ValueError(f"{path or 'root'}: checkpoint keys {sorted(map(str, restored))} "
                       f"!= model keys {sorted(map(str, template))}")
    return {k: _match(v, restored[k] if k in restored else restored[str(k)], f"{path}/{k}")
            for k, v in template.items()}
  if tuple(template.shape) != tuple(np.shape(restored)):
    raise ValueError(f"{path}: checkpoint shape {np.shape(restored)} != model shape "
                     f"{tuple(template.shape)}")
  return jnp.asarray(restored, template.dtype)


# -------------------------------------------------------------------------- Pure calls
# The adapters of models/api.py turn graphdefs into pure functions of a (params, rest) tuple:
#   velocity((params, rest), x_t, t, text), text_fn((params, rest), ids, mask),
#   encode((params, rest), frames), decode((params, rest), z), prm((params, rest), x_t, t, text).
velocity_fn = models_api.make_velocity_fn
text_fn = models_api.make_text_fn
encode_fn = models_api.make_encode_fn
decode_fn = models_api.make_decode_fn
prm_fn = models_prm.make_prm_fn  # prm((params, rest), x_t, t, text) -> [B]


def cfg_velocity(velocity: Callable, scale: float, null_text: dict[str, jax.Array]):
  """Classifier-free guidance: v_u + scale (v_c - v_u); scale 1 is the plain velocity."""
  if scale == 1.0:
    return velocity

  def fn(params, x, t, text):
    b = x.shape[0]
    null = jax.tree.map(lambda a: jnp.broadcast_to(a[:1], (b,) + a.shape[1:]), null_text)
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), text, null)
    v = velocity(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    return v[b:] + scale * (v[:b] - v[b:])
  return fn


def latent_shape(config) -> tuple[int, int, int, int]:
  """(T', h, w, C) of the VAE latent for the configured world."""
  return tuple(network_configs(config).model.latent_shape) + (config.vae.latent_channels,)
