"""The default configuration and its validation, shared by every stage.

The defaults live in the package (not in `configs/`) so that a user's config file anywhere on
disk can start from them after a plain `pip install`:

  from euphonium_jax import config as config_lib
  def get_config():
    config = config_lib.get_default_config()
    config.pretrain.steps = 100
    return config

`validate(config)` runs before anything compiles. A bad config raises `ConfigError` with one
message that names the key, the value and what is allowed.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Callable, Sequence

import ml_collections

from euphonium_jax.paths import REPO_ROOT, resolve_path  # noqa: F401 (re-exported)

STAGES = ("vae", "pretrain", "prm", "grpo", "evaluate", "sample")
IMPLEMENTED_STAGES = ("vae", "pretrain", "prm", "grpo", "evaluate", "sample")
WAN_STAGES = ("prm", "grpo", "evaluate")  # the stages a Wan run has (no VAE or pretraining)


# Network sizes derived from the world and the other networks (see embedded.network_configs).
DERIVED_KEYS = {
    "vae": ("frames", "resolution", "kl_weight"),
    "model": ("in_channels", "latent_shape", "text_dim", "pooled_dim"),
}


class ConfigError(ValueError):
  """A config value that cannot run: the message names key, value and what is allowed."""


def _error(key: str, value: Any, allowed: str) -> ConfigError:
  return ConfigError(f"config.{key} = {value!r} is invalid: {allowed}.")


def from_file(path: str, relative_to: str | None = None) -> ml_collections.ConfigDict:
  """`get_config()` of the config file `path` (relative to the directory of the file
  `relative_to` when given): lets one config file start from another. `x.py:arg` calls
  `get_config('arg')`, as `--config x.py:arg` does."""
  import importlib.util
  path, _, arg = path.partition(".py:")
  path = path if path.endswith(".py") else path + ".py"
  if relative_to is not None:
    path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
  spec = importlib.util.spec_from_file_location(
      "euphonium_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def as_baseline(config: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  """The same GRPO run with an unguided method: sampling preset `preset` with every sampler
  override cleared (the preset's values), outcome advantages only, no PRM."""
  from euphonium_jax.sampling import config as sampling_config
  config.sampling = sampling_config.default_sampling_config()
  config.sampling.preset = preset
  config.grpo.advantage_mode = "none"
  config.grpo.rewards = tuple(r for r in config.grpo.rewards if r[0] != "prm_final")
  config.init.prm = ""
  return config


def get_default_config() -> ml_collections.ConfigDict:
  """Every key a config may set, with the defaults of the embedded world."""
  from euphonium_jax.models import api as models_api  # Defaults of the networks.
  from euphonium_jax.sampling import config as sampling_config

  c = ml_collections.ConfigDict()
  c.stages = ("vae", "pretrain")
  c.seed = 0

  # The embedded world (euphonium_jax/data/world.py).
  c.world = ml_collections.ConfigDict(dict(frames=8, size=32))

  # Networks: VAE, text encoder, velocity transformer.
  # Sizes that follow from other sections (the VAE's frames and resolution, the model's
  # latent grid and text widths) are not keys: `embedded.network_configs` derives them.
  nets = models_api.default_model_configs()
  for section, derived in DERIVED_KEYS.items():
    for key in derived:
      del nets[section][key]
  c.vae = nets.vae
  c.text = nets.text
  c.model = nets.model

  # Where a stage starts from: a checkpoint directory (or an asset directory) by path; an
  # empty string means "the output of the earlier stage in this workdir".
  c.init = ml_collections.ConfigDict(dict(vae="", pretrain="", prm=""))

  # Device mesh and logical-axis rules (logical parameter axis -> mesh axis or None).
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1), axes=("data", "fsdp")))
  c.sharding = ml_collections.ConfigDict(dict(rules=(
      ("embed", "fsdp"),
      ("mlp", None),
      ("heads", None),
      ("kv", None),
      ("vocab", None),
      ("conv_in", None),
      ("conv_out", "fsdp"),
  )))

  c.vae_train = ml_collections.ConfigDict(dict(
      steps=2500,
      batch_size=16,
      lr=2e-3,
      warmup_steps=100,
      weight_decay=0.0,
      grad_clip=1.0,
      kl_weight=1e-6,
      log_every=50,
      ckpt_every=500,
      eval_clips=256,
  ))

  c.pretrain = ml_collections.ConfigDict(dict(
      steps=6000,
      batch_size=64,
      lr=1e-3,
      warmup_steps=200,
      weight_decay=1e-4,
      grad_clip=1.0,
      ema_decay=0.999,
      time_sampling="logit_normal",  # logit_normal | uniform
      time_shift=1.0,  # t -> shift t / (1 + (shift - 1) t) after sampling
      caption_dropout=0.1,  # for classifier-free guidance at sampling time
      dataset_size=16384,  # clips encoded once and reused; 0 = fresh clips every step
      log_every=50,
      eval_every=1000,
      ckpt_every=250,
  ))

  # Evaluation by Euler ODE sampling on held-out prompts (pretrain evals, `sample` stage).
  c.eval = ml_collections.ConfigDict(dict(
      num_prompts=64,
      split="heldout",
      num_steps=30,
      shift=7.0,
      cfg_scale=1.0,  # classifier-free guidance; 1 = off
      num_videos=16,  # how many go into the video grid / contact sheet
      fps=4,
      # Prompts and noise of the grpo stage's evaluations. Independent of `seed`, so that runs
      # with different training seeds and methods are scored on the same prompts and noise.
      seed=0,
      # The grpo stage's evaluations also sample the same prompts and noise with the training
      # sampler (config.sampling; one sample per prompt, every step SDE): 'guided' with its PRM
      # guidance, 'unguided' with guidance off (the gap between the two is what distillation
      # is meant to close; metrics eval_reward_sde_guided / eval_reward_sde_unguided).
      sde=(),
  ))
  c.sample = ml_collections.ConfigDict(dict(
      prompts=(),  # captions to sample; empty -> `eval.num_prompts` held-out prompts
      num_per_prompt=1,
  ))

  # The prompt set every stage draws from (euphonium_jax/data/prompts.py): 'world' (the
  # embedded world's captions) or a .txt / .jsonl file or a folder with train / test files.
  c.data = ml_collections.ConfigDict(dict(
      prompts="world",
      test_fraction=0.1,  # held out by seed when the prompt set has no test file
      negative_prompt="",  # CFG's negative prompt unless a .jsonl line has 'negative_prompt'
      cache_dir="",  # text-embedding cache (Wan); empty = WORKDIR/prompt_cache
  ))
  # The `evaluate` stage: a model on the prompt set's test split (eval.* sizes and sampler).
  c.evaluate = ml_collections.ConfigDict(dict(
      model="",  # '' = this workdir's grpo/final if finished, else the base; 'base'; or a path
      # to a finished grpo/final (or a workdir holding one)
      rewards=(),  # pixel rewards to report; () = grpo.rewards' (or shapes_fidelity)
      sampler="ode",  # a sampling preset: ode (eval.num_steps, eval.shift) or an SDE one
  ))
  c.sampling = sampling_config.default_sampling_config()
  c.prm = _default_prm_config()
  c.grpo = _default_grpo_config()
  # Which networks the grpo stage trains: the embedded world's, or a Wan2.1 diffusers folder.
  c.model_family = "embedded"
  c.wan = _default_wan_config()
  c.rewards = _default_rewards_config()
  return c


def _default_grpo_config() -> ml_collections.ConfigDict:
  """The `grpo` stage: dual-reward GRPO with the sampler of `config.sampling` (DESIGN.md 4).

  The group size G and whether a group shares one initial noise are `sampling.group_size` /
  `sampling.share_noise_in_group`. One optimiser step trains `samples_per_update` samples
  (x K trained transitions each), computed in `accumulation` micro-batches: in the
  reference's terms, one accumulation step is one micro-batch of samples with all of its
  trained transitions.
  """
  return ml_collections.ConfigDict(dict(
      iterations=100,
      prompts_per_iteration=8,  # x sampling.group_size rollouts per iteration (global)
      split="train",  # the prompts rollouts are drawn from
      # Outcome rewards: (name, weight) pairs; each is group-normalised, clipped and gets its
      # own clipped loss, weighted by weight * outcome_coef. Names are registered rewards
      # (euphonium_jax/rewards) or 'prm_final', the PRM's score of the final clean latent.
      rewards=(("shapes_fidelity", 1.0),),
      advantage_mode="both",  # none (outcome only) | only (process only) | both
      outcome_coef=1.0,
      process_coef=1.0,
      process_source="pre",  # pre | post | delta: which PRM score a transition gets
      adv_clip=5.0,
      adv_std="sample",  # advantages' group std: sample (ddof 1) | population (Flow-GRPO's)
      adv_eps=1e-8,  # added to the group std (Flow-GRPO: 1e-4)
      clip_range=1e-4,  # the ratio's clip: [1 - clip_range, 1 + clip_range]
      kl_coef=0.0,  # exact kernel KL to the frozen initial velocity (0 = off, no copy kept)
      distill_coef=0.0,  # explicit distillation D_k (0 = implicit only, the reference);
      # its target: 'rollout' (the rollout's guided kernel, on-policy: needs kl_coef > 0 as an
      # anchor, alone it drifts: see config validation) | 'frozen' (the guided kernel of a
      # frozen snapshot of the parameters, taken at the start and every
      # teacher_refresh_every iterations; 0 = never refreshed: the initial model's)
      distill_teacher="rollout",
      teacher_refresh_every=0,
      timestep_fraction=0.6,  # trained share of the N - 1 trainable transitions per sample
      step_selection="random",  # random (own subset per sample) | first (steps 0 .. K - 1 in
      # order, Flow-GRPO's); the last transition N - 1 is never trained
      samples_per_update=16,  # samples per optimiser step (global)
      accumulation=1,  # micro-batches per optimiser step
      inner_epochs=1,  # passes over each iteration's rollouts
      cfg_scale=1.0,  # classifier-free guidance of the policy (rollout and update); 1 = off
      score="x0_hat",  # x0_hat (the last step's clean estimate, the reference) | sample
      lr=1e-6, b1=0.9, b2=0.999, weight_decay=1e-4, grad_clip=1.0, warmup_steps=0,
      ema_decay=0.0,  # EMA of the policy for evaluations and the final model (0 = off)
      max_nonfinite=3,  # consecutive skipped (non-finite) updates before the run stops
      eval_every=10,  # iterations between ODE evaluations on config.eval (0 = start/end only)
      log_every=1,
      ckpt_every=10,
  ))


def _default_wan_config() -> ml_collections.ConfigDict:
  """`model_family = 'wan'`: a Wan2.1 text-to-video diffusers folder (see bundles/wan.py)."""
  return ml_collections.ConfigDict(dict(
      path="",  # folder with transformer/, vae/, text_encoder/, tokenizer/
      frames=33, height=240, width=416,  # the video size trained on (frames = 1 + 4k)
      max_text_length=512,  # UMT5 tokens per prompt (Wan pads to 512)
      param_dtype="float32",  # storage dtype of the published weights
      dtype="float32",  # matmul dtype (float32 accumulation)
      remat="none",  # transformer block checkpointing: none | full | dots | dots_saveable
      # attention: auto (query-blocked on CPU; cuDNN on a GPU for bf16 and head sizes it takes,
      # else XLA) | blocked | xla | cudnn (models/layers.py attention, auto_impl)
      attention_impl="auto",
      lora_rank=0,  # 0 = full fine-tuning
      lora_alpha=1.0,
      lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
      lora_dropout=0.0,  # only 0: rollouts and updates must see the same network
  ))


def _check_wan(config) -> None:
  _one_of(config, "model_family", ("embedded", "wan"))
  if config.model_family != "wan":
    return
  from euphonium_jax.bundles import wan as wan_bundle
  from euphonium_jax.models.wan import transformer as wt
  w = config.wan
  if not w.path:
    raise _error("wan.path", w.path, "a Wan2.1 diffusers folder (transformer/, vae/, "
                 "text_encoder/, tokenizer/) is required with model_family='wan'")
  bad = [s for s in config.stages if s not in WAN_STAGES]
  if bad:
    raise _error("stages", tuple(config.stages), f"with model_family='wan' the stages are "
                 f"{WAN_STAGES} (vae, pretrain and sample are stages of the embedded world)")
  try:
    wan_bundle.check_folder(w.path)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _positive(config, ["wan.frames", "wan.height", "wan.width", "wan.max_text_length"])
  if (w.frames - 1) % 4:
    raise _error("wan.frames", w.frames, "must be 1 + 4k (the Wan VAE's chunks)")
  vae = wan_bundle.vae_config(config)
  for key in ("height", "width"):
    f = vae.spatial_factor * 2  # VAE x patch size
    if w[key] % f:
      raise _error(f"wan.{key}", w[key], f"must be divisible by {f} (VAE factor x patch)")
  for key in ("param_dtype", "dtype"):
    _one_of(config, f"wan.{key}", ("float32", "bfloat16"))
  _one_of(config, "wan.remat", ("none", "full", "dots", "dots_saveable"))
  _one_of(config, "wan.attention_impl", ("auto", "blocked", "xla", "cudnn"))
  if w.lora_rank < 0:
    raise _error("wan.lora_rank", w.lora_rank, "must be >= 0 (0 = full fine-tuning)")
  bad = [t for t in w.lora_targets if t not in wt.LORA_TARGETS]
  if bad:
    raise _error("wan.lora_targets", tuple(w.lora_targets), f"each one of {wt.LORA_TARGETS}")
  if w.lora_dropout != 0.0:
    raise _error("wan.lora_dropout", w.lora_dropout, "only 0.0: the update's log-probs must be "
                 "those of the network that drew the rollout")
  n_layers = wan_bundle.transformer_config(config).num_layers
  if "prm" in tuple(config.stages) and not 1 <= config.prm.depth <= n_layers:
    raise _error("prm.depth", config.prm.depth, f"must be in [1, {n_layers}] with "
                 f"model_family='wan' (the PRM trunk is the transformer's first blocks)")
  if config.prm.lora_rank < 0:
    raise _error("prm.lora_rank", config.prm.lora_rank, "must be >= 0 (0 = train the whole PRM)")


def _needs_caption_dropout(config) -> bool:
  """CFG on an embedded model needs one trained with caption dropout (Wan's is CFG-trained)."""
  return config.pretrain.caption_dropout == 0 and config.model_family == "embedded"


def _check_data(config) -> None:
  """The prompt set loads, and every reward can read its prompts."""
  from euphonium_jax.data import prompts as prompts_lib
  from euphonium_jax.rewards import registry
  d = config.data
  try:
    ps = prompts_lib.load(d.prompts if d.prompts == prompts_lib.WORLD else resolve_path(
        d.prompts), seed=config.seed, test_fraction=d.test_fraction)
  except prompts_lib.PromptError as e:
    raise ConfigError(f"config.data.prompts = {d.prompts!r}: {e}") from None
  if ps.is_world:
    return
  stages = tuple(config.stages)
  names = [n for n, _ in config.grpo.rewards] if "grpo" in stages else []
  if "prm" in stages:
    names.append(config.prm.reward)
  if "evaluate" in stages:
    names += list(config.evaluate.rewards)
  for name in names:
    if registry.needs_world_prompts(name):
      raise ConfigError(
          f"the reward {name!r} reads the embedded world's captions (colour, shape, motion), "
          f"but config.data.prompts = {d.prompts!r} is another prompt set: choose a reward that "
          f"scores any video (e.g. jpeg_compressibility) or data.prompts='world'")


def _default_rewards_config() -> ml_collections.ConfigDict:
  """`config.rewards.<name>`: the settings of every configurable reward, at its registered
  defaults (so `--config.rewards.<name>.<key>=...` works). Several servers in one run:
  `config.rewards.remote_<label> = registry.settings('remote', url=...)` in a config file."""
  from euphonium_jax import rewards as rewards_lib  # Registers the built-in rewards.
  return ml_collections.ConfigDict({
      name: rewards_lib.registry.default_settings(name)
      for name in rewards_lib.registry.factory_names()})


def _used_rewards(config) -> list[tuple[str, str]]:
  """(key, reward name) of every reward the configured stages score."""
  stages = tuple(config.stages)
  used = []
  if "grpo" in stages or ("evaluate" in stages and not tuple(config.evaluate.rewards)):
    used += [("grpo.rewards", e[0]) for e in config.grpo.rewards
             if isinstance(e, (tuple, list)) and e and e[0] != "prm_final"]
  if "evaluate" in stages:
    used += [("evaluate.rewards", n) for n in config.evaluate.rewards]
  if "prm" in stages:
    used.append(("prm.reward", config.prm.reward))
  return used


def _check_rewards(config) -> None:
  """Every `config.rewards` section names a configurable reward and holds its keys; every
  reward a stage scores is known and its settings pass its check (a missing weights folder,
  an unknown frame mode, no server address...). All problems in one ConfigError."""
  from euphonium_jax.rewards import registry
  sections = config.rewards
  problems = []
  for name in sections.keys():
    problems += registry.check_settings(name, sections[name], keys_only=True)
  seen = set()
  for key, name in _used_rewards(config):
    if name in seen:
      continue
    seen.add(name)
    if not registry.is_known(name):
      if key == "prm.reward" or (key == "grpo.rewards" and "grpo" in tuple(config.stages)):
        continue  # named by _check_prm / _check_grpo, with their own messages
      known = registry.names() + [f + "_<label>" for f in registry.instance_factories()]
      problems.append(f"config.{key} names {name!r}, which is not a registered reward: "
                      f"known rewards are {', '.join(known)}")
    elif key == "prm.reward" and registry.is_configurable(name):
      problems.append(f"config.prm.reward = {name!r} is invalid: the prm stage labels its "
                      "rollouts with a plain reward (one without settings), e.g. "
                      "shapes_fidelity or jpeg_compressibility")
    elif registry.is_configurable(name):
      if name not in sections:
        problems.append(f"config.{key} names {name!r}, which needs settings: add "
                        f"config.rewards.{name} = registry.settings("
                        f"{registry.base_name(name)!r}, ...) to the config file")
      else:
        problems += [p for p in registry.check_settings(name, sections[name])
                     if p not in problems]
  if problems:
    raise ConfigError("the reward settings cannot run:\n  " + "\n  ".join(problems))


def _default_prm_config() -> ml_collections.ConfigDict:
  """The `prm` stage: a latent process reward model trained on the base model's rollouts."""
  from ml_collections import config_dict
  return ml_collections.ConfigDict(dict(
      # Network: the first `depth` (K) blocks of the video transformer, a learned-query
      # attention pool, an MLP head. width / heads 0 = the velocity model's (required with
      # init_from_base, which copies the base model's patch/time embeddings and K blocks).
      depth=2, width=0, heads=0, num_queries=4, head_width=128, init_from_base=True,
      # Wan only: LoRA adapters on the trunk (0 = train the whole PRM); the head is trained.
      lora_rank=0, lora_alpha=1.0,
      sigmoid_output=False,  # the PRM function returns sigmoid(logit) instead of the logit
      reward="shapes_fidelity",  # the outcome reward that labels the rollouts
      # Rollout data: unguided SDE rollouts of the base model on training prompts, every
      # step's latent kept, the decoded final clean estimate scored; cached in chunks.
      data=ml_collections.ConfigDict(dict(
          num_prompts=512, group_size=8, chunk_prompts=16, split="train",
          sampler="dance_grpo",  # a sampling preset; its guidance is always switched off
          num_steps=16, shift=5.0, eta=config_dict.placeholder(float),  # None = preset's
          share_noise=False,  # one initial noise per group (GRPO's setting) or independent
          cfg_scale=1.0,  # classifier-free guidance of the base model (1 = off)
      )),
      # Training on (x_t, t, text) -> reward.
      loss="regression",  # regression | bce | bradley_terry (pairs within a group and step)
      # Training states: the stored rollout states x_t; or the rollout's clean estimate x0
      # noised afresh at the same t, (1 - t) x0 + t eps (unlimited noise augmentation; its
      # regression optimum is E[r | x_t] of the interpolation, the memoryless value); or both.
      states="both",  # rollout | renoised | both (half and half)
      # The regression label: reward | log (log(reward + log_eps)) | quantile (the reward's
      # rank among the training rollouts, in (0, 1): what rank correlation measures).
      target="quantile",
      log_eps=1e-3,
      bce_threshold=0.5,  # bce labels: reward > threshold
      bt_margin=0.0,  # bradley_terry pairs: r_i > r_j + margin
      steps=800, batch_size=64, lr=3e-4, warmup_steps=100, weight_decay=1e-4,
      grad_clip=1.0, log_every=50, ckpt_every=500,
      # Quality report on held-out prompts (WORKDIR/prm/report.{json,png}).
      report=ml_collections.ConfigDict(dict(
          split="heldout", num_prompts=32,  # rollouts: num_prompts x data.group_size
          time_buckets=(0.0, 0.25, 0.5, 0.75, 1.0),  # bucket edges of t for the correlations
          guidance_t=0.5,  # the guidance check starts from the grid step nearest this t
          guidance_step=0.05,  # RMS per latent element of the gradient / random step
          ode_steps=8,  # Euler ODE steps that finish the perturbed states
      )),
  ))


# --------------------------------------------------------------------------- Schema checks

# Keys whose default is None (or an empty tuple), with the types they accept.
_FREE_TYPES = {
    "sampling.grid": (list, tuple),
    "prm.data.eta": (int, float),
    "sample.prompts": (list, tuple),
}


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _all_finite(value) -> bool:
  """False if `value`, or any number nested in it (tuples, lists), is inf or nan."""
  if isinstance(value, (tuple, list)):
    return all(_all_finite(v) for v in value)
  return not _is_number(value) or math.isfinite(value)


def _type_name(t) -> str:
  return t.__name__ if isinstance(t, type) else "/".join(x.__name__ for x in t)


def _check_schema(config, reference, prefix: str = "") -> None:
  for key in config.keys():
    path = f"{prefix}{key}"
    if path == "rewards":
      continue  # its own check (_check_rewards): sections may be added (remote_<label>)
    if key not in reference:
      allowed = ", ".join(sorted(reference.keys()))
      raise ConfigError(
          f"config.{path} is an unknown key: allowed keys under "
          f"{'config.' + prefix[:-1] if prefix else 'config'} are {allowed}.")
    value, default = config[key], reference[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        raise _error(path, value, "expected a group of settings (ConfigDict)")
      _check_schema(ml_collections.ConfigDict(value), default, path + ".")
      continue
    if not _all_finite(value):
      raise _error(path, value, "every number must be finite (inf and nan never run)")
    if path in _FREE_TYPES:
      if value is not None and not isinstance(value, _FREE_TYPES[path]):
        raise _error(path, value, f"expected None or {_type_name(_FREE_TYPES[path])}")
      continue
    if default is None:
      continue
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
      continue
    if expected in (tuple, list) and isinstance(value, (tuple, list)):
      continue
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
      raise _error(path, value, f"expected type {expected.__name__}, got {type(value).__name__}")


# ---------------------------------------------------------------------------- Value checks


def _get(config, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


# Every numeric check requires a finite number: `inf > 0` and `nan` pass comparisons alone.


def _finite(value) -> bool:
  return _is_number(value) and math.isfinite(value)


def _positive(config, keys: Sequence[str]) -> None:
  for key in keys:
    value = _get(config, key)
    if not (_finite(value) and value > 0):
      raise _error(key, value, "must be > 0 (and finite)")


def _non_negative(config, keys: Sequence[str]) -> None:
  for key in keys:
    value = _get(config, key)
    if not (_finite(value) and value >= 0):
      raise _error(key, value, "must be >= 0 (and finite)")


def _in_range(config, key: str, lo: float, hi: float, inclusive_hi: bool = True) -> None:
  value = _get(config, key)
  ok = _finite(value) and (lo <= value <= hi if inclusive_hi else lo <= value < hi)
  if not ok:
    raise _error(key, value, f"must be in [{lo}, {hi}{']' if inclusive_hi else ')'}")


def _one_of(config, key: str, allowed: Sequence[Any]) -> None:
  value = _get(config, key)
  if value not in allowed:
    raise _error(key, value, f"allowed values are {', '.join(map(repr, allowed))}")


def _check_stages(config) -> None:
  stages = tuple(config.stages)
  if not stages:
    raise _error("stages", stages, f"name at least one of {', '.join(STAGES)}")
  for s in stages:
    if s not in STAGES:
      raise _error("stages", stages, f"each stage must be one of {', '.join(STAGES)}")
    if s not in IMPLEMENTED_STAGES:
      raise _error("stages", stages,
                   f"stage {s!r} is not implemented yet; available: {', '.join(IMPLEMENTED_STAGES)}")
  if len(set(stages)) != len(stages):
    raise _error("stages", stages, "each stage may appear once")


def _check_init_paths(config) -> None:
  for key in config.init.keys():
    path = config.init[key]
    if path and not os.path.exists(resolve_path(path)):
      raise _error(f"init.{key}", path, "the checkpoint path does not exist")
  stages = tuple(config.stages)
  # A stage that needs an earlier stage's output must get it from this run or from a path.
  if "pretrain" in stages and "vae" not in stages and not config.init.vae:
    raise _error("init.vae", config.init.vae,
                 "the pretrain stage needs a VAE: run the 'vae' stage first or give its "
                 "checkpoint path (e.g. 'assets/embedded')")
  for stage in ("sample", "prm", "grpo", "evaluate"):
    if config.get("model_family") == "wan":
      continue  # the flow model is config.wan.path's transformer
    if stage in stages and "pretrain" not in stages and not config.init.pretrain:
      raise _error("init.pretrain", config.init.pretrain,
                   f"the {stage} stage needs a flow model: run 'pretrain' first or give its "
                   "checkpoint path (e.g. 'assets/embedded')")


def _check_mesh(config, num_devices: int) -> None:
  shape, axes = tuple(config.mesh.shape), tuple(config.mesh.axes)
  if len(shape) != len(axes):
    raise _error("mesh.shape", shape, f"needs one size per axis of config.mesh.axes={axes}")
  for required in ("data", "fsdp"):
    if required not in axes:
      raise _error("mesh.axes", axes, f"must include the axis {required!r}")
  if sum(1 for s in shape if s == -1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise _error("mesh.shape", shape, "sizes must be positive, with at most one -1 (fill)")
  known = 1
  for s in shape:
    known *= s if s > 0 else 1
  if (-1 in shape and num_devices % known) or (-1 not in shape and known != num_devices):
    raise _error("mesh.shape", shape,
                 f"the sizes must multiply to the device count ({num_devices})")
  for rule in config.sharding.rules:
    if len(rule) != 2 or (rule[1] is not None and not set(
        rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)) <= set(axes)):
      raise _error("sharding.rules", rule,
                   f"each rule is (logical_name, mesh axis in {axes} or None)")


def _check_batches(config, num_devices: int) -> None:
  """Every stage's batches split over the data-parallel axes: checked before the first stage
  runs, not when the stage that needs them starts (the grpo sizes: _check_grpo)."""
  shape = tuple(config.mesh.shape)
  dp = _data_parallel_size(config, num_devices)
  stages = tuple(config.stages)
  batches = []
  if "vae" in stages:
    batches.append(("vae_train.batch_size", config.vae_train.batch_size, "per step"))
  if "pretrain" in stages:
    batches.append(("pretrain.batch_size", config.pretrain.batch_size, "per step"))
  if "prm" in stages:
    d = config.prm.data
    batches += [("prm.batch_size", config.prm.batch_size, "per step"),
                ("prm.data.chunk_prompts", d.chunk_prompts * d.group_size,
                 f"rollouts per chunk (x prm.data.group_size={d.group_size})")]
  for key, n, what in batches:
    if _is_number(n) and n > 0 and n % dp:
      raise _error(key, _get(config, key), f"gives {n} {what}, which must be divisible by "
                   f"the data-parallel size {dp} (mesh {shape} on {num_devices} devices)")


def _check_world_and_nets(config) -> None:
  from euphonium_jax.data import world
  _positive(config, ["world.frames", "world.size", "vae.latent_channels", "model.width",
                     "model.depth", "model.heads", "text.width", "text.depth",
                     "text.max_length"])
  if config.world.frames < 2:
    raise _error("world.frames", config.world.frames, "must be >= 2 (motion needs frames)")
  if config.world.size < 16:
    raise _error("world.size", config.world.size, "must be >= 16 pixels")
  down_s = 2 ** (len(config.vae.channels) - 1)
  down_t = 2 if config.vae.temporal_downsample else 1
  if config.world.size % down_s:
    raise _error("world.size", config.world.size,
                 f"must be divisible by the VAE's spatial factor {down_s}")
  if config.world.frames % down_t:
    raise _error("world.frames", config.world.frames,
                 f"must be divisible by the VAE's temporal factor {down_t} "
                 "(config.vae.temporal_downsample=True)")
  latent = (config.world.frames // down_t, config.world.size // down_s,
            config.world.size // down_s)
  patch = tuple(config.model.patch_size)
  if len(patch) != 3 or any(p <= 0 for p in patch):
    raise _error("model.patch_size", patch, "three positive sizes (time, height, width)")
  for name, n, p in zip(("frames", "height", "width"), latent, patch):
    if n % p:
      raise _error("model.patch_size", patch,
                   f"the latent {name} ({n}) must be divisible by the patch size ({p})")
  if config.model.width % config.model.heads:
    raise _error("model.heads", config.model.heads,
                 f"must divide config.model.width={config.model.width}")
  if config.text.width % config.text.heads:
    raise _error("text.heads", config.text.heads,
                 f"must divide config.text.width={config.text.width}")
  _one_of(config, "model.dtype", ("float32", "bfloat16"))
  _one_of(config, "vae.dtype", ("float32", "bfloat16"))
  _one_of(config, "model.remat", ("none", "full", "dots"))
  _one_of(config, "model.pos_embed", ("sincos", "learned"))
  _one_of(config, "model.attention_impl", ("xla", "cudnn", "auto", "blocked"))
  if len(config.vae.channels) < 2 or any(ch <= 0 for ch in config.vae.channels):
    raise _error("vae.channels", config.vae.channels,
                 "at least two positive widths (the spatial factor is 2 ** (levels - 1))")
  if config.text.vocab_size < len(set(w.lower() for w in world.vocabulary())) + 3:
    raise _error("text.vocab_size", config.text.vocab_size,
                 "must hold the world's vocabulary plus [PAD], [UNK] and [CLS]")


def _check_training(config) -> None:
  for section in ("vae_train", "pretrain"):
    _positive(config, [f"{section}.steps", f"{section}.batch_size", f"{section}.lr",
                       f"{section}.log_every", f"{section}.ckpt_every"])
    _non_negative(config, [f"{section}.{k}" for k in ("warmup_steps", "weight_decay",
                                                      "grad_clip")])
  # Adam's moment decays: b = 1 never forgets the first gradient (and b2 = 1 divides by 0).
  for key in ("grpo.b1", "grpo.b2"):
    _in_range(config, key, 0.0, 1.0, inclusive_hi=False)
  if config.pretrain.dataset_size < 0:
    raise _error("pretrain.dataset_size", config.pretrain.dataset_size,
                 "must be >= 0 (0 = render and encode fresh clips every step)")
  _positive(config, ["pretrain.eval_every", "pretrain.time_shift", "eval.num_prompts",
                     "eval.num_steps", "eval.shift", "eval.fps", "vae_train.eval_clips",
                     "sample.num_per_prompt"])
  _in_range(config, "pretrain.ema_decay", 0.0, 1.0, inclusive_hi=False)
  _in_range(config, "pretrain.caption_dropout", 0.0, 1.0, inclusive_hi=False)
  _one_of(config, "pretrain.time_sampling", ("logit_normal", "uniform"))
  _one_of(config, "eval.split", ("train", "heldout", "all"))
  if config.eval.cfg_scale < 0:
    raise _error("eval.cfg_scale", config.eval.cfg_scale, "must be >= 0 (1 = off)")
  if config.eval.cfg_scale != 1.0 and _needs_caption_dropout(config):
    raise _error("eval.cfg_scale", config.eval.cfg_scale,
                 "classifier-free guidance needs a model trained with "
                 "config.pretrain.caption_dropout > 0")


def _check_prm(config) -> None:
  from euphonium_jax import sampling
  from euphonium_jax.rewards import registry
  from euphonium_jax.rl import prm_losses
  p = config.prm
  _positive(config, ["prm.num_queries", "prm.head_width", "prm.steps", "prm.batch_size",
                     "prm.lr", "prm.log_every", "prm.ckpt_every", "prm.data.num_prompts",
                     "prm.data.group_size", "prm.data.chunk_prompts", "prm.data.num_steps",
                     "prm.data.shift", "prm.report.num_prompts", "prm.report.ode_steps"])
  _non_negative(config, [f"prm.{k}" for k in ("depth", "width", "heads", "warmup_steps",
                                               "weight_decay", "grad_clip",
                                               "report.guidance_step")])
  width = p.width or config.model.width
  heads = p.heads or config.model.heads
  if width % heads:
    raise _error("prm.heads", p.heads, f"must divide the PRM width {width} (0 = model.heads)")
  if p.init_from_base and config.model_family == "embedded":
    for key, ours, base in (("width", width, config.model.width),
                            ("heads", heads, config.model.heads)):
      if ours != base:
        raise _error(f"prm.{key}", p[key], f"must be 0 or model.{key}={base} with "
                     "prm.init_from_base=True (the trunk is a copy of the base model's)")
    if p.depth > config.model.depth:
      raise _error("prm.depth", p.depth, f"must be <= model.depth={config.model.depth} with "
                   "prm.init_from_base=True (the trunk copies the base model's first blocks)")
  _one_of(config, "prm.loss", prm_losses.LOSSES)
  _one_of(config, "prm.states", ("rollout", "renoised", "both"))
  _one_of(config, "prm.target", ("reward", "log", "quantile"))
  _positive(config, ["prm.log_eps"])
  if p.reward not in registry.names():
    raise _error("prm.reward", p.reward, f"registered rewards are {', '.join(registry.names())}")
  _one_of(config, "prm.data.sampler", sampling.PRESETS)
  _one_of(config, "prm.data.split", ("train", "heldout", "all"))
  _one_of(config, "prm.report.split", ("train", "heldout", "all"))
  if p.data.num_prompts % p.data.chunk_prompts:
    raise _error("prm.data.num_prompts", p.data.num_prompts,
                 f"must be a multiple of prm.data.chunk_prompts={p.data.chunk_prompts}")
  if p.loss == "bradley_terry" and p.batch_size % p.data.group_size:
    raise _error("prm.batch_size", p.batch_size, "must be a multiple of prm.data.group_size="
                 f"{p.data.group_size} with prm.loss='bradley_terry' (whole groups per batch)")
  if p.loss == "bradley_terry" and p.data.group_size < 2:
    raise _error("prm.data.group_size", p.data.group_size,
                 "must be >= 2 with prm.loss='bradley_terry' (pairs within a group)")
  if p.data.eta is not None and p.data.eta < 0:
    raise _error("prm.data.eta", p.data.eta, "must be >= 0 (None = the preset's)")
  if p.data.cfg_scale < 0:
    raise _error("prm.data.cfg_scale", p.data.cfg_scale, "must be >= 0 (1 = off)")
  if p.data.cfg_scale != 1.0 and _needs_caption_dropout(config):
    raise _error("prm.data.cfg_scale", p.data.cfg_scale, "classifier-free guidance needs a "
                 "model trained with config.pretrain.caption_dropout > 0")
  edges = tuple(p.report.time_buckets)
  if len(edges) < 2 or any(not 0.0 <= e <= 1.0 for e in edges) or any(
      a >= b for a, b in zip(edges, edges[1:])):
    raise _error("prm.report.time_buckets", edges,
                 "at least two strictly increasing bucket edges in [0, 1]")
  _in_range(config, "prm.report.guidance_t", 0.0, 1.0, inclusive_hi=False)


def _data_parallel_size(config, num_devices: int) -> int:
  """Devices along the batch axes ('data', 'fsdp') of the configured mesh."""
  shape, axes = list(config.mesh.shape), tuple(config.mesh.axes)
  known = 1
  for s in shape:
    known *= s if s > 0 else 1
  shape = [num_devices // known if s == -1 else s for s in shape]
  size = 1
  for s, a in zip(shape, axes):
    size *= s if a in ("data", "fsdp") else 1
  return size


def _check_grpo(config, num_devices: int | None = None) -> None:
  from euphonium_jax import sampling
  from euphonium_jax.rewards import registry
  from euphonium_jax.rl import grpo
  g = config.grpo
  _positive(config, ["grpo.iterations", "grpo.prompts_per_iteration", "grpo.adv_clip",
                     "grpo.clip_range", "grpo.samples_per_update", "grpo.accumulation",
                     "grpo.inner_epochs", "grpo.lr", "grpo.max_nonfinite", "grpo.log_every",
                     "grpo.ckpt_every"])
  for key in ("outcome_coef", "process_coef", "kl_coef", "distill_coef", "weight_decay",
              "grad_clip", "warmup_steps", "eval_every"):
    if _get(config, f"grpo.{key}") < 0:
      raise _error(f"grpo.{key}", _get(config, f"grpo.{key}"), "must be >= 0")
  _in_range(config, "grpo.ema_decay", 0.0, 1.0, inclusive_hi=False)
  _one_of(config, "grpo.advantage_mode", grpo.ADVANTAGE_MODES)
  _one_of(config, "grpo.process_source", grpo.PROCESS_SOURCES)
  _one_of(config, "grpo.adv_std", grpo.ADV_STDS)
  _one_of(config, "grpo.step_selection", grpo.STEP_SELECTIONS)
  if not g.adv_eps > 0:
    raise _error("grpo.adv_eps", g.adv_eps, "must be > 0 (added to the group std of the "
                 "advantages; 1e-8 by default, Flow-GRPO uses 1e-4)")
  _one_of(config, "grpo.split", ("train", "heldout", "all"))
  _one_of(config, "grpo.score", ("x0_hat", "sample"))
  _in_range(config, "grpo.timestep_fraction", 0.0, 1.0)
  if not g.timestep_fraction > 0:
    raise _error("grpo.timestep_fraction", g.timestep_fraction, "must be in (0, 1]")
  rewards = tuple(g.rewards)
  names = tuple(registry.names()) + ("prm_final",)
  if not rewards and g.advantage_mode != "only":
    raise _error("grpo.rewards", rewards, "name at least one (name, weight) outcome reward "
                 "unless grpo.advantage_mode = 'only'")
  for entry in rewards:
    if (not isinstance(entry, (tuple, list)) or len(entry) != 2
        or (entry[0] not in names and not registry.is_known(entry[0]))
        or not isinstance(entry[1], (int, float)) or entry[1] < 0):
      raise _error("grpo.rewards", rewards, "(name, weight >= 0) pairs with names from "
                   + ", ".join(names))
  if not 0 < g.clip_range < 1:
    raise _error("grpo.clip_range", g.clip_range, "must be in (0, 1)")
  if g.cfg_scale < 0:
    raise _error("grpo.cfg_scale", g.cfg_scale, "must be >= 0 (1 = off)")
  if g.cfg_scale != 1.0 and _needs_caption_dropout(config):
    raise _error("grpo.cfg_scale", g.cfg_scale, "classifier-free guidance needs a model "
                 "trained with config.pretrain.caption_dropout > 0")
  try:
    sampler = sampling.sampler_config_from(config.sampling)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if sampler.group_size < 2:
    raise _error("sampling.group_size", sampler.group_size,
                 "must be >= 2 for GRPO (the advantage is normalised within a group)")
  batch = g.prompts_per_iteration * sampler.group_size
  if batch % g.samples_per_update:
    raise _error("grpo.samples_per_update", g.samples_per_update,
                 f"must divide the rollouts per iteration, grpo.prompts_per_iteration x "
                 f"sampling.group_size = {batch}")
  if g.samples_per_update % g.accumulation:
    raise _error("grpo.accumulation", g.accumulation,
                 f"must divide grpo.samples_per_update = {g.samples_per_update}")
  if num_devices is not None:
    dp = _data_parallel_size(config, num_devices)
    for key, n in (("grpo.prompts_per_iteration", batch),
                   ("grpo.samples_per_update", g.samples_per_update // g.accumulation)):
      if n % dp:
        raise _error(key, _get(config, key), f"gives {n} samples per "
                     f"{'iteration' if key.endswith('iteration') else 'micro-batch'}, which must "
                     f"be divisible by the data-parallel size {dp} (mesh {tuple(config.mesh.shape)} "
                     f"on {num_devices} devices)")
  arrs = sampling.grid_arrays(sampler)
  if (arrs.g[:-1] <= 0).any():
    raise _error("sampling.schedule", sampler.schedule, "GRPO trains stochastic transitions: "
                 "g(t) must be > 0 on steps 0 .. N - 2 (not 'ode', nor eta = 0)")
  if sampler.num_steps < 2:
    raise _error("sampling.num_steps", sampler.num_steps, "must be >= 2 for GRPO (the last "
                 "transition is never trained)")
  if sampler.windowed and arrs.guided.any():  # guidance acts inside the SDE window only
    first, last = sampler.window.bounds(sampler.num_steps)
    guided = [i for i, on in enumerate(arrs.guided.tolist()) if on]
    if not any(first <= i < last + sampler.window.size for i in guided):
      raise _error("sampling.window.range_start", sampler.window.range_start,
                   f"guidance acts only on SDE steps, and no guided step "
                   f"({guided}) lies in the steps the window can "
                   f"cover ([{first}, {last + sampler.window.size})): move the window range or "
                   "sampling.guidance.start / end")
  if g.distill_coef > 0 and not arrs.guided.any():
    raise _error("grpo.distill_coef", g.distill_coef, "distillation acts on guided steps; "
                 "sampling.guidance.mode is 'off'")
  _one_of(config, "grpo.distill_teacher", ("rollout", "frozen"))
  if g.teacher_refresh_every < 0 or int(g.teacher_refresh_every) != g.teacher_refresh_every:
    raise _error("grpo.teacher_refresh_every", g.teacher_refresh_every,
                 "an integer >= 0 (iterations between teacher snapshots; 0 = never)")
  if g.distill_teacher == "frozen" and g.distill_coef == 0:
    raise _error("grpo.distill_teacher", g.distill_teacher, "a frozen teacher is the target "
                 "of explicit distillation: set grpo.distill_coef > 0 (or use 'rollout')")
  if g.teacher_refresh_every and g.distill_teacher != "frozen":
    raise _error("grpo.teacher_refresh_every", g.teacher_refresh_every,
                 "refreshes the frozen teacher: set grpo.distill_teacher = 'frozen'")
  if g.distill_coef > 0 and g.kl_coef == 0 and g.distill_teacher == "rollout":
    raise _error("grpo.distill_coef", g.distill_coef, "explicit distillation needs an anchor: "
                 "set grpo.kl_coef > 0 too, or grpo.distill_teacher = 'frozen'. On-policy, "
                 "D_k pulls the unguided kernel to the current policy's guided one, so alone it "
                 "adds the guidance shift again every iteration and drifts without bound; with "
                 "the KL to the frozen reference the optimum is the reference's guided kernel")
  sde_evals = tuple(config.eval.sde)
  if len(set(sde_evals)) != len(sde_evals) or not set(sde_evals) <= {"guided", "unguided"}:
    raise _error("eval.sde", sde_evals, "a tuple of distinct 'guided' / 'unguided' (the "
                 "training sampler with and without its PRM guidance)")
  if "guided" in sde_evals and not arrs.guided.any():
    raise _error("eval.sde", sde_evals, "'guided' evaluates the training sampler's PRM "
                 "guidance, but sampling.guidance.mode is 'off' (or guides no step)")
  uses_prm = (arrs.scored.any() or g.advantage_mode != "none"
              or any(e[0] == "prm_final" for e in rewards))
  stages = tuple(config.stages)
  if uses_prm and "prm" not in stages and not config.init.prm:
    raise _error("init.prm", config.init.prm, "this GRPO config needs a PRM (guidance, "
                 "process advantages or the 'prm_final' reward): run the 'prm' stage first or "
                 "give its checkpoint path (e.g. 'assets/embedded/prm')")
  if g.advantage_mode != "none" and not arrs.scored.any():
    raise _error("grpo.advantage_mode", g.advantage_mode, "process advantages need PRM scores "
                 "during the rollout: enable guidance or sampling.score_unguided_steps")


def validate(config, num_devices: int | None = None) -> None:
  """Raises ConfigError (key, value, what is allowed) for any config that cannot run."""
  import jax  # Only for the device count.
  from euphonium_jax.sampling import config as sampling_config

  _check_schema(config, get_default_config())
  _check_stages(config)
  _check_wan(config)
  _check_data(config)
  _check_rewards(config)
  _check_world_and_nets(config)
  _check_training(config)
  _check_mesh(config, jax.device_count() if num_devices is None else num_devices)
  _check_init_paths(config)
  _check_prm(config)
  _check_batches(config, jax.device_count() if num_devices is None else num_devices)
  if "grpo" in tuple(config.stages):
    _check_grpo(config, jax.device_count() if num_devices is None else num_devices)
  try:
    sampling_config.sampler_config_from(config.sampling)
  except ValueError as e:
    raise ConfigError(str(e)) from None
