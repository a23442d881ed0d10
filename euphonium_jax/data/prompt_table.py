"""The embedded world's captions as a table a jitted step can index: one row per
(colour, shape, direction) combination, in `combo_index` order, plus the null caption.

The pretrain stage draws attribute triples on the device and turns them into text inputs
without leaving it (caption dropout picks the null row). Tokenising is the caller's: the
table holds what a tokenizer made of `captions()`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from euphonium_jax.data import world

NULL_PROMPT = ""  # the unconditional caption (classifier-free guidance, caption dropout)


@dataclasses.dataclass(frozen=True)
class PromptTable:
  """Token ids of every caption of the world, indexed by combo, plus the null caption."""
  ids: np.ndarray  # int32 [num_combos + 1, L]; the last row is the null caption
  mask: np.ndarray  # bool [num_combos + 1, L]

  @property
  def null_index(self) -> int:
    return self.ids.shape[0] - 1


def combo_index(attrs: jax.Array) -> jax.Array:
  """[n, 3] (colour, shape, direction) -> [n] index into `PromptTable` rows."""
  ns, nd = len(world.SHAPES), len(world.DIRECTIONS)
  return attrs[..., 0] * (ns * nd) + attrs[..., 1] * nd + attrs[..., 2]


def all_captions() -> list[str]:
  """Every caption of the world, in `combo_index` order."""
  everything = [(c, s, d) for c in range(len(world.COLOURS)) for s in range(len(world.SHAPES))
                for d in range(len(world.DIRECTIONS))]
  return world.captions(np.asarray(everything, np.int32))


def build(tokenize: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]) -> PromptTable:
  """The table from a tokenizer `prompts -> (ids [n, L], mask [n, L])`."""
  ids, mask = tokenize(all_captions() + [NULL_PROMPT])
  return PromptTable(ids=np.asarray(ids, np.int32), mask=np.asarray(mask, bool))
