"""Outcome rewards by name: `fn(frames [B, T, H, W, 3] in [0, 1], prompts) -> float32 [B]`.

The table below is the module's one piece of state on purpose: it is filled once, at import
time, by the `@register` decorators of the reward modules, and only read afterwards.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax

RewardFn = Callable[[jax.Array, Sequence[str]], jax.Array]

_REWARDS: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
  """Decorator: register a reward under `name` (a second, different reward of that name raises)."""

  def decorator(fn: RewardFn) -> RewardFn:
    old = _REWARDS.get(name)
    same = old is not None and (old.__module__, old.__qualname__) == (fn.__module__,
                                                                      fn.__qualname__)
    if old is not None and not same:
      raise ValueError(f"reward {name!r} is already registered ({old.__module__}.{old.__qualname__})")
    _REWARDS[name] = fn
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
