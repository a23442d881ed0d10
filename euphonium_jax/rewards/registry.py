"""Outcome rewards by name: `fn(frames [B, T, H, W, 3] in [0, 1], prompts) -> float32 [B]`.

Two kinds of entries:

- a plain reward, `@register(name)` on the function itself (no settings);
- a configurable reward, `@register_factory(name, defaults=...)` on a factory
  `factory(settings: ConfigDict) -> RewardFn`. Its settings live in `config.rewards.<name>`
  (filled with `defaults` by the config module), are checked before anything compiles
  (`check_settings`), and `build(name, settings)` makes the ready reward once per run.

A factory registered with `instances=True` (the remote reward) may be used under several
names in one run: `<name>_<label>` (e.g. `remote_judge`, `remote_aesthetic`), each with its
own `config.rewards.<name>_<label>` section (`settings(name, **values)` makes one).

A reward may also take `metadata` (one dict per prompt: the other fields of a `.jsonl` prompt
set's line); `call` hands it over to those that do. A reward registered with
`world_prompts=True` parses the embedded world's captions and refuses other prompt sets. An
`on_device` reward takes the decoded frames as a (possibly batch-sharded) jax.Array and
returns a jax float32 [B] computed by jitted JAX code; the others get numpy arrays. An
`io_bound` reward waits on something outside the process (a server): a stage scores it in a
thread, concurrently with the other rewards.

The tables below are the module's one piece of state on purpose: they are filled once, at
import time, by the decorators of the reward modules, and only read afterwards.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

RewardFn = Callable[[jax.Array, Sequence[str]], jax.Array]
CheckFn = Callable[[ml_collections.ConfigDict], list]


class RewardError(RuntimeError):
  """A reward that could not score a batch (it raised, or returned the wrong shape)."""


@dataclasses.dataclass(frozen=True)
class Factory:
  """A configurable reward: `factory(settings) -> RewardFn` with its settings' defaults."""
  factory: Callable[[ml_collections.ConfigDict], RewardFn]
  defaults: dict
  check: CheckFn | None = None
  instances: bool = False


_REWARDS: dict[str, RewardFn] = {}
_FACTORIES: dict[str, Factory] = {}
_WORLD_ONLY: set[str] = set()
_ON_DEVICE: set[str] = set()
_IO_BOUND: set[str] = set()


def _same(a, b) -> bool:
  return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _claim(name: str, fn) -> None:
  """Refuses a second, different entry under `name` (re-importing a module is fine)."""
  old = _REWARDS.get(name) or (_FACTORIES[name].factory if name in _FACTORIES else None)
  if old is not None and not _same(old, fn):
    raise ValueError(f"reward {name!r} is already registered "
                     f"({old.__module__}.{old.__qualname__})")
  if not name or not name.isidentifier():
    raise ValueError(f"reward name {name!r} must be a Python identifier (it is a config key: "
                     f"config.rewards.{name})")


def _flags(name: str, world_prompts: bool, on_device: bool, io_bound: bool) -> None:
  for table, on in ((_WORLD_ONLY, world_prompts), (_ON_DEVICE, on_device),
                    (_IO_BOUND, io_bound)):
    if on:
      table.add(name)


def register(name: str, world_prompts: bool = False, on_device: bool = False
             ) -> Callable[[RewardFn], RewardFn]:
  """Decorator: register a plain reward under `name` (a second, different reward of that
  name raises). `world_prompts`: it reads the embedded world's captions (colour, shape,
  motion). `on_device`: it takes and returns jax arrays (see the module docstring)."""

  def decorator(fn: RewardFn) -> RewardFn:
    _claim(name, fn)
    _REWARDS[name] = fn
    _flags(name, world_prompts, on_device, False)
    return fn

  return decorator


def register_factory(name: str, *, defaults: dict, world_prompts: bool = False,
                     on_device: bool = False, check: CheckFn | None = None,
                     io_bound: bool = False, instances: bool = False):
  """Decorator: register `factory(settings: ConfigDict) -> RewardFn` under `name`.

  `defaults`: every settings key with its default (the types the keys accept).
  `check(settings) -> list[str]`: problems found before anything compiles, each naming
  `rewards.<name>.<key>`, the value and what is allowed. `io_bound`: scored in a thread.
  `instances`: the factory may also be used as `<name>_<label>` (several in one run); a
  factory with a `name` keyword is told the name it is built under."""
  defaults = dict(defaults)
  for key, value in defaults.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      raise ValueError(f"reward {name!r}: settings are flat; {key!r} is a group")

  def decorator(factory):
    _claim(name, factory)
    _FACTORIES[name] = Factory(factory, defaults, check, instances)
    _flags(name, world_prompts, on_device, io_bound)
    return factory

  return decorator


def base_name(name: str) -> str | None:
  """The registered entry `name` stands for: itself, or the instance-taking factory `f` of
  a name `f_<label>`; None for an unknown name."""
  if name in _REWARDS or name in _FACTORIES:
    return name
  for f in sorted(_FACTORIES, key=len, reverse=True):
    if _FACTORIES[f].instances and name.startswith(f + "_") and len(name) > len(f) + 1:
      return f
  return None


def _base(name: str) -> str:
  base = base_name(name)
  if base is None:
    raise ValueError(f"unknown reward {name!r}; known rewards: {names()}" + (
        f" (and {', '.join(f + '_<label>' for f in instance_factories())})"
        if instance_factories() else ""))
  return base


def is_known(name: str) -> bool:
  """Whether `name` is a registered reward or an instance name of an instance factory."""
  return base_name(name) is not None


def get(name: str) -> RewardFn:
  """The plain reward registered as `name` (a configurable one: its factory); ValueError
  listing the known names otherwise."""
  base = _base(name)
  return _REWARDS[base] if base in _REWARDS else _FACTORIES[base].factory


def names() -> list[str]:
  """Sorted names of the registered rewards, plain and configurable."""
  return sorted(set(_REWARDS) | set(_FACTORIES))


def factory_names() -> list[str]:
  """Sorted names of the configurable rewards (those with a `config.rewards` section)."""
  return sorted(_FACTORIES)


def instance_factories() -> list[str]:
  """Sorted names of the configurable rewards that may be used as `<name>_<label>`."""
  return sorted(f for f, e in _FACTORIES.items() if e.instances)


def is_configurable(name: str) -> bool:
  return is_known(name) and _base(name) in _FACTORIES


def needs_world_prompts(name: str) -> bool:
  """Whether the reward parses the embedded world's captions (and so refuses other sets)."""
  return is_known(name) and _base(name) in _WORLD_ONLY


def is_on_device(name: str) -> bool:
  """Whether the reward takes the frames as a jax.Array and returns a jax [B] (jitted)."""
  return is_known(name) and _base(name) in _ON_DEVICE


def is_io_bound(name: str) -> bool:
  """Whether the reward waits on something outside the process (scored in a thread)."""
  return is_known(name) and _base(name) in _IO_BOUND


def default_settings(name: str) -> ml_collections.ConfigDict:
  """A fresh ConfigDict of the registered defaults of the configurable reward `name`."""
  base = _base(name)
  if base not in _FACTORIES:
    raise ValueError(f"reward {name!r} takes no settings (it is a plain reward)")
  return ml_collections.ConfigDict(dict(_FACTORIES[base].defaults))


def settings(name: str, **values) -> ml_collections.ConfigDict:
  """The defaults of `name` with `values` set: a `config.rewards.<name>` section. Unknown
  keys raise (ValueError naming them and the allowed keys)."""
  s = default_settings(name)
  bad = sorted(set(values) - set(s.keys()))
  if bad:
    raise ValueError(f"reward {name!r} has no settings {bad}; allowed: {sorted(s.keys())}")
  s.update(values)
  return s


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _type_problem(key: str, value, default) -> str | None:
  """Why `value` cannot stand where the default is `default` (None if it can)."""
  if isinstance(value, (tuple, list)):
    if any(_is_number(v) and not math.isfinite(v) for v in value):
      return f"{key} = {value!r} is invalid: every number must be finite"
  elif _is_number(value) and not math.isfinite(value):
    return f"{key} = {value!r} is invalid: every number must be finite"
  if default is None:
    return None
  expected = type(default)
  if expected is float and _is_number(value):
    return None
  if expected in (tuple, list) and isinstance(value, (tuple, list)):
    return None
  if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
    return (f"{key} = {value!r} is invalid: expected type {expected.__name__}, got "
            f"{type(value).__name__}")
  return None


def check_settings(name: str, settings_: Any, keys_only: bool = False) -> list[str]:
  """Problems of `settings_` (a `config.rewards.<name>` section) as human-readable lines,
  each naming `config.rewards.<name>.<key>`, the value and what is allowed: unknown keys,
  wrong types, non-finite numbers, then (unless `keys_only`) the factory's own check."""
  prefix = f"config.rewards.{name}"
  if not is_known(name):
    return [f"{prefix} is not a reward: the configurable rewards are "
            f"{', '.join(factory_names())}" + (
                f" (and {', '.join(f + '_<label>' for f in instance_factories())})"
                if instance_factories() else "")]
  base = _base(name)
  if base not in _FACTORIES:
    return [f"{prefix}: the reward {name!r} takes no settings (a plain reward)"]
  entry = _FACTORIES[base]
  if not isinstance(settings_, (dict, ml_collections.ConfigDict)):
    return [f"{prefix} = {settings_!r} is invalid: expected a group of settings (ConfigDict)"]
  given = dict(settings_.items()) if hasattr(settings_, "items") else dict(settings_)
  problems = []
  for key in sorted(set(given) - set(entry.defaults)):
    problems.append(f"{prefix}.{key} is an unknown key: the settings of {base!r} are "
                    f"{', '.join(sorted(entry.defaults))}")
  typed = [p for key in sorted(set(given) & set(entry.defaults))
           if (p := _type_problem(f"{prefix}.{key}", given[key], entry.defaults[key]))]
  problems += typed
  if typed or keys_only or entry.check is None:
    return problems  # the factory's check may assume the types
  full = ml_collections.ConfigDict(dict(entry.defaults))
  full.update({k: v for k, v in given.items() if k in entry.defaults})
  return problems + [p.replace(f"rewards.{base}.", f"rewards.{name}.")
                     for p in entry.check(full)]


def build(name: str, settings_: Any = None) -> RewardFn:
  """The ready reward `name`: a plain reward as registered; a configurable one made by its
  factory from `settings_` over the defaults (weights are loaded here, once). Settings that
  fail `check_settings` raise ValueError listing every problem."""
  base = _base(name)
  if base in _REWARDS:
    if settings_:
      raise ValueError(f"reward {name!r} takes no settings (a plain reward)")
    return _REWARDS[base]
  s = default_settings(base)
  if settings_ is not None:
    s.update(dict(settings_.items()) if hasattr(settings_, "items") else dict(settings_))
  problems = check_settings(name, s)
  if problems:
    raise ValueError("; ".join(problems))
  factory = _FACTORIES[base].factory
  try:
    takes_name = "name" in inspect.signature(factory).parameters
  except (TypeError, ValueError):
    takes_name = False
  fn = factory(s, name=name) if takes_name else factory(s)
  return _Named(name, fn)


class _Named:
  """A built reward that knows its name (for error messages), calling through to `fn`."""

  def __init__(self, name: str, fn: RewardFn):
    self.reward_name, self.fn = name, fn
    try:
      self.takes_metadata = "metadata" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
      self.takes_metadata = False

  def __call__(self, frames, prompts, metadata=None):
    if self.takes_metadata:
      return self.fn(frames, prompts, metadata=metadata)
    return self.fn(frames, prompts)

  def close(self) -> None:
    if hasattr(self.fn, "close"):
      self.fn.close()

  def __repr__(self) -> str:
    return f"<reward {self.reward_name}>"


def reward_name(reward: str | RewardFn) -> str:
  """The name of a reward given by name or as a built function."""
  if isinstance(reward, str):
    return reward
  return getattr(reward, "reward_name", getattr(reward, "__name__", repr(reward)))


def call(reward: str | RewardFn, frames, prompts: Sequence[str],
         metadata: Sequence[dict] | None = None) -> Any:
  """The reward (a name, or a function from `build`) on a batch; `metadata` goes to rewards
  that take it. A configurable reward given by name must be built first."""
  if isinstance(reward, str):
    if is_configurable(reward):
      raise ValueError(f"reward {reward!r} is configurable: build it from its settings "
                       f"(registry.build({reward!r}, config.rewards.{reward})) and call that")
    fn = get(reward)
  else:
    fn = reward
  meta = list(metadata) if metadata is not None else None
  if isinstance(fn, _Named):
    return fn(frames, prompts, meta)
  try:
    takes = "metadata" in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    takes = False
  if takes:
    return fn(frames, prompts, metadata=meta)
  return fn(frames, prompts)


def score(reward: str | RewardFn, frames, prompts: Sequence[str],
          metadata: Sequence[dict] | None = None, who: str = "grpo",
          kind: str = "outcome reward", as_jax: bool = False, name: str | None = None
          ) -> np.ndarray:
  """`call` checked for a run: float32 `[B]`; a reward that raises or returns another shape
  stops the run with one RewardError naming it (a run must not go on with a made-up reward).
  `as_jax`: keep an on-device reward's jax result on the device (shape checked, no sync).
  `name`: the name it was registered (and configured) under, for the message."""
  name = name or reward_name(reward)
  try:
    out = call(reward, frames, prompts, metadata)
    row = out if as_jax and isinstance(out, jax.Array) else np.asarray(out, np.float32)
  except Exception as e:
    raise RewardError(f"[{who}] the {kind} {name!r} raised {type(e).__name__}: {e}") from e
  if tuple(row.shape) != (len(prompts),):
    raise RewardError(f"[{who}] the {kind} {name!r} returned shape {tuple(row.shape)}, "
                      f"expected ({len(prompts)},)")
  return row


def build_many(names: Sequence[str], sections: Any = None) -> dict[str, RewardFn]:
  """{name: ready reward} for the registered names among `names` (others, such as the PRM's
  'prm_final', are left out), each configurable one built from `sections[name]` (the
  `config.rewards` ConfigDict) once."""
  out = {}
  for name in names:
    if name in out or not is_known(name):
      continue
    section = None
    if is_configurable(name):
      section = sections[name] if sections is not None and name in sections else None
    out[name] = build(name, section)
  return out


def score_many(built: dict[str, RewardFn], frames, prompts: Sequence[str],
               metadata: Sequence[dict] | None = None, who: str = "grpo",
               kind: str = "outcome reward", to_host: Callable = np.asarray,
               concurrent: bool = True) -> dict[str, np.ndarray]:
  """Every reward of `built` on one batch: {name: float32 [B]} (checked as `score`).

  `frames`: the decoded videos, a jax.Array (on the device, possibly sharded) or numpy.
  On-device rewards are dispatched first on the device array (asynchronously); io-bound ones
  (remote) run in threads, all at once, with the host copy; the other host rewards run here
  meanwhile. `to_host` makes a full host copy of a (sharded) array. The first failing
  reward, in the order of `built`, raises its RewardError once every reward has returned.
  `concurrent=False` scores one after another (for comparison)."""
  from concurrent import futures
  device_names = [n for n in built if is_on_device(n)]
  host = None
  if len(device_names) < len(built):
    host = np.asarray(to_host(frames), np.float32)
  pending: dict[str, Any] = {}
  for n in device_names:
    dev = frames if isinstance(frames, jax.Array) else jax.numpy.asarray(frames)
    pending[n] = score(built[n], dev, prompts, metadata, who, kind, as_jax=True, name=n)
  threaded = [n for n in built if is_io_bound(n) and n not in pending] if concurrent else []
  errors: dict[str, BaseException] = {}
  with futures.ThreadPoolExecutor(max(1, len(threaded))) as pool:
    jobs = {n: pool.submit(score, built[n], host, prompts, metadata, who, kind, name=n)
            for n in threaded}
    for n in built:
      if n in pending or n in jobs:
        continue
      try:
        pending[n] = score(built[n], host, prompts, metadata, who, kind, name=n)
      except RewardError as e:
        errors[n] = e
    for n, job in jobs.items():
      try:
        pending[n] = job.result()
      except RewardError as e:
        errors[n] = e
  for n in built:
    if n in errors:
      raise errors[n]
  return {n: np.asarray(to_host(pending[n]), np.float32).reshape(len(prompts)) for n in built}
