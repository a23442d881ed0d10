"""Outcome rewards by name: `fn(frames [B, T, H, W, 3] in [0, 1], prompts) -> float32 [B]`.

A reward may also take `metadata` (one dict per prompt: the other fields of a `.jsonl` prompt
set's line); `call` hands it over to those that do. A reward registered with
`world_prompts=True` parses the embedded world's captions and refuses other prompt sets.

The table below is the module's one piece of state on purpose: it is filled once, at import
time, by the `@register` decorators of the reward modules, and only read afterwards.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import jax
import numpy as np

RewardFn = Callable[[jax.Array, Sequence[str]], jax.Array]

_REWARDS: dict[str, RewardFn] = {}
_WORLD_ONLY: set[str] = set()


def register(name: str, world_prompts: bool = False) -> Callable[[RewardFn], RewardFn]:
  """Decorator: register a reward under `name` (a second, different reward of that name
  raises). `world_prompts`: it reads the embedded world's captions (colour, shape, motion)."""

  def decorator(fn: RewardFn) -> RewardFn:
    old = _REWARDS.get(name)
    same = old is not None and (old.__module__, old.__qualname__) == (fn.__module__,
                                                                      fn.__qualname__)
    if old is not None and not same:
      raise ValueError(f"reward {name!r} is already registered "
                       f"({old.__module__}.{old.__qualname__})")
    _REWARDS[name] = fn
    if world_prompts:
      _WORLD_ONLY.add(name)
    return fn

  return decorator


def get(name: str) -> RewardFn:
  """The reward registered as `name`; ValueError listing the known names otherwise."""
  if name not in _REWARDS:
    raise ValueError(f"unknown reward {name!r}; known rewards: {names()}")
  return _REWARDS[name]


def names() -> list[str]:
  """Sorted names of the registered rewards."""
  return sorted(_REWARDS)


def needs_world_prompts(name: str) -> bool:
  """Whether the reward parses the embedded world's captions (and so refuses other sets)."""
  return name in _WORLD_ONLY


def call(name: str, frames, prompts: Sequence[str], metadata: Sequence[dict] | None = None
         ) -> Any:
  """The reward `name` on a batch; `metadata` goes to rewards that take it."""
  fn = get(name)
  try:
    takes = "metadata" in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    takes = False
  if takes:
    return fn(frames, prompts, metadata=list(metadata) if metadata is not None else None)
  return fn(frames, prompts)


def score(name: str, frames, prompts: Sequence[str], metadata: Sequence[dict] | None = None,
          who: str = "grpo", kind: str = "outcome reward") -> np.ndarray:
  """`call` checked for a run: float32 `[B]`; a reward that raises or returns another shape
  stops the run with one error naming it (a run must not go on with a made-up reward)."""
  try:
    row = np.asarray(call(name, frames, prompts, metadata), np.float32)
  except Exception as e:
    raise RuntimeError(f"[{who}] the {kind} {name!r} raised {type(e).__name__}: {e}") from e
  if row.shape != (len(prompts),):
    raise RuntimeError(f"[{who}] the {kind} {name!r} returned shape {row.shape}, expected "
                       f"({len(prompts)},)")
  return row
