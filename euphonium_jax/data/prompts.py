"""Prompt sets for every stage: the embedded world's captions, or a user's txt / jsonl / folder.

`load(spec)` reads `config.data.prompts`:

  'world'          train = captions of `world.combos('train')`, test = of `world.combos('heldout')`
  PATH.txt         one prompt a line (surrounding whitespace stripped, blank lines skipped)
  PATH.jsonl       one JSON object a line with a non-empty string `prompt`; its other fields are
                   kept as that prompt's metadata (blank lines skipped)
  FOLDER/          train.txt or train.jsonl (required), test.txt or test.jsonl (optional): the
                   layout of Flow-GRPO's datasets (train.txt / test.txt)

A single file, or a folder without a test file, is split: a seeded permutation holds out
`round(test_fraction * n)` prompts (at least 1 and at most n - 1); each split keeps file order.
A set of one prompt with no test file is refused: evaluation needs a held-out prompt that
training never sees. Duplicate lines are kept (a file may weight a prompt by repeating it).
The spec 'world' always means the world; write './world' for a file or folder named so.

Which prompts an iteration trains on is `iteration_indices(...)`, a pure numpy function of
(seed, iteration), so every process and a resumed run draw the same prompts. Permutations come
from a counter-based hash (splitmix64) and a stable argsort, not from numpy's generators, so
they are also the same across numpy versions and platforms.

Bad input raises `PromptError`, whose message reads `FILE[:LINE]: problem; what is allowed`.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np

from euphonium_jax.data import world

WORLD = "world"
SPLITS = ("train", "test")
SPLIT_ALIASES = {"train": "train", "test": "test", "heldout": "test"}
EXTENSIONS = (".txt", ".jsonl")
ALLOWED_SPECS = ("'world', a .txt file (one prompt a line), a .jsonl file (one JSON object a line "
                 "with a string 'prompt'), or a folder with train.txt or train.jsonl (and "
                 "optionally test.txt or test.jsonl)")
JSONL_EXAMPLE = '{"prompt": "a red circle moving left", ...}'

# Domain tags keep the training stream, the evaluation draw and the held-out split independent.
_TAG_STREAM, _TAG_EVAL, _TAG_SPLIT = 1, 2, 3


class PromptError(ValueError):
  """An unusable prompt source: the message names the file (and line), problem, what is allowed."""


@dataclasses.dataclass(frozen=True, repr=False)
class PromptSet:
  """Train and test prompts of one source, each with per-prompt metadata (`{}` for txt / world).

  `source` is 'world' or the absolute path that was read.
  """
  source: str
  train: tuple[str, ...]
  test: tuple[str, ...]
  train_meta: tuple[dict, ...]
  test_meta: tuple[dict, ...]
  is_world: bool = False

  def __post_init__(self):
    for name in SPLITS:
      prompts, meta = getattr(self, name), getattr(self, f"{name}_meta")
      if len(prompts) != len(meta):
        raise ValueError(f"PromptSet({self.source!r}): {len(prompts)} {name} prompts but "
                         f"{len(meta)} {name}_meta entries; there must be one dict per prompt")

  def split(self, name: str) -> tuple[tuple[str, ...], tuple[dict, ...]]:
    """(prompts, meta) of split `name`: 'train' or 'test' ('heldout' is an alias of 'test')."""
    if name not in SPLIT_ALIASES:
      raise PromptError(f"{self.source}: split {name!r} is not one of "
                        f"{tuple(SPLIT_ALIASES)} ('heldout' means 'test')")
    name = SPLIT_ALIASES[name]
    return getattr(self, name), getattr(self, f"{name}_meta")

  def fingerprint(self, split: str | None = None) -> str:
    """16 hex digits of sha256 over the prompts of both splits (or of `split` only), for caches.

    Depends on the prompts and on which split holds each, not on the path or the metadata.
    """
    names = SPLITS if split is None else (SPLIT_ALIASES.get(split, split),)
    h = hashlib.sha256()
    for name in names:
      prompts, _ = self.split(name)
      h.update(json.dumps([name, len(prompts)]).encode())
      h.update(json.dumps(prompts, ensure_ascii=False).encode())
    return h.hexdigest()[:16]

  def __repr__(self) -> str:
    return (f"PromptSet(source={self.source!r}, train={len(self.train)}, test={len(self.test)}, "
            f"is_world={self.is_world})")


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------

def _read_lines(path: str) -> list[str]:
  """The lines of a UTF-8 file (a leading BOM dropped); a byte that is not UTF-8 names its line."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise PromptError(f"{path}: cannot be read ({e.strerror}); the file must be readable") from e
  if data.startswith(codecs.BOM_UTF8):
    data = data[len(codecs.BOM_UTF8):]
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    raise PromptError(
        f"{path}:{line}: byte {data[e.start:e.start + 1]!r} at column {column} is not UTF-8 "
        f"({e.reason}); prompt files must be UTF-8 text") from None
  return text.split("\n")


def _no_prompts(path: str, kind: str) -> PromptError:
  what = "prompt a line" if kind == ".txt" else f"JSON object a line, {JSONL_EXAMPLE}"
  return PromptError(f"{path}: no prompts (the file is empty or has only blank lines); "
                     f"a {kind} file needs at least one {what}")


def _read_txt(path: str) -> tuple[list[str], list[dict]]:
  prompts = [s for s in (line.strip() for line in _read_lines(path)) if s]
  if not prompts:
    raise _no_prompts(path, ".txt")
  return prompts, [{} for _ in prompts]


def _read_jsonl(path: str) -> tuple[list[str], list[dict]]:
  prompts, meta = [], []
  for number, line in enumerate(_read_lines(path), 1):
    line = line.strip()
    if not line:
      continue
    where = f"{path}:{number}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise PromptError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be "
                        f"one JSON object, {JSONL_EXAMPLE}") from None
    if not isinstance(obj, dict):
      raise PromptError(f"{where}: is a JSON {type(obj).__name__} ({line[:60]}), not an object; "
                        f"each line must be one JSON object, {JSONL_EXAMPLE}")
    if "prompt" not in obj:
      raise PromptError(f"{where}: has no 'prompt' field (fields: {sorted(obj)[:10]}); each line "
                        f"must be one JSON object with a string 'prompt', {JSONL_EXAMPLE}")
    prompt = obj.pop("prompt")
    if not isinstance(prompt, str):
      raise PromptError(f"{where}: 'prompt' has type {type(prompt).__name__} ({prompt!r:.60}); "
                        f"it must be a non-empty string")
    prompt = prompt.strip()
    if not prompt:
      raise PromptError(f"{where}: 'prompt' is empty; it must be a non-empty string")
    prompts.append(prompt)
    meta.append(obj)
  if not prompts:
    raise _no_prompts(path, ".jsonl")
  return prompts, meta


def _read_file(path: str) -> tuple[list[str], list[dict]]:
  ext = os.path.splitext(path)[1].lower()
  if ext == ".txt":
    return _read_txt(path)
  if ext == ".jsonl":
    return _read_jsonl(path)
  raise PromptError(f"{path}: a file ending in {ext or '(no extension)'!r} is not a prompt "
                    f"source; allowed: {ALLOWED_SPECS}")


def _folder_file(folder: str, stem: str, required: bool) -> str | None:
  """The path of FOLDER/STEM.txt or FOLDER/STEM.jsonl; both at once is ambiguous."""
  found = [os.path.join(folder, stem + ext) for ext in EXTENSIONS
           if os.path.isfile(os.path.join(folder, stem + ext))]
  if len(found) > 1:
    raise PromptError(f"{folder}: holds both {stem}.txt and {stem}.jsonl, so which one is the "
                      f"{stem} split is ambiguous; keep exactly one of them")
  if not found and required:
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "") if names else "nothing"
    raise PromptError(f"{folder}: folder has no train.txt or train.jsonl (it holds: {shown}); "
                      f"a prompt folder needs train.txt or train.jsonl, and optionally test.txt "
                      f"or test.jsonl")
  return found[0] if found else None


# ---------------------------------------------------------------------------------------------
# Deterministic permutations (numpy only, the same on every process and numpy version)
# ---------------------------------------------------------------------------------------------

_U64 = np.uint64


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
  x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
  return x ^ (x >> _U64(31))


def _permutation(n: int, *words: int) -> np.ndarray:
  """int32 [n]: a permutation of range(n), a pure function of (n, words)."""
  h = np.zeros(1, np.uint64)
  for w in words:
    h = _mix(h ^ np.asarray([w % 2**64], np.uint64))
  keys = _mix(np.arange(n, dtype=np.uint64) * _U64(0x9E3779B97F4A7C15) + h)
  return np.argsort(keys, kind="stable").astype(np.int32)


def _check_int(name: str, value: Any, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
  return int(value)


def iteration_indices(num_prompts: int, n: int, seed: int, iteration: int) -> np.ndarray:
  """int32 [n]: indices of the prompts of `iteration` (a pure function of its arguments).

  The stream of indices is epoch 0's permutation of range(num_prompts), then epoch 1's, ...
  (epoch e seeded by (seed, e)); iteration i takes stream positions [i * n, (i + 1) * n).
  Each epoch covers every prompt once; only the epochs that iteration i touches are computed.
  """
  num_prompts = _check_int("num_prompts", num_prompts, 1)
  n = _check_int("n", n, 1)
  seed = _check_int("seed", seed, -(2**63))
  iteration = _check_int("iteration", iteration, 0)
  start, stop = iteration * n, (iteration + 1) * n
  first, last = start // num_prompts, (stop - 1) // num_prompts
  stream = np.concatenate([_permutation(num_prompts, _TAG_STREAM, seed, e)
                           for e in range(first, last + 1)])
  offset = start - first * num_prompts
  return stream[offset:offset + n]


def eval_indices(num_prompts: int, n: int, seed: int) -> np.ndarray:
  """int32 [min(n, num_prompts)]: prompts of a split to evaluate on.

  The first n of a permutation seeded by `seed`; all of them, in order, when n >= num_prompts.
  """
  num_prompts = _check_int("num_prompts", num_prompts, 1)
  n = _check_int("n", n, 1)
  seed = _check_int("seed", seed, -(2**63))
  if n >= num_prompts:
    return np.arange(num_prompts, dtype=np.int32)
  return _permutation(num_prompts, _TAG_EVAL, seed)[:n]


def _hold_out(path: str, prompts: list[str], meta: list[dict], seed: int,
              test_fraction: float) -> tuple[tuple, tuple, tuple, tuple]:
  """(train, test, train_meta, test_meta): a seeded held-out fraction, each split in file order."""
  n = len(prompts)
  if n < 2:
    raise PromptError(
        f"{path}: has 1 prompt and no test file, so no prompt can be held out for evaluation; "
        f"give at least 2 prompts, or a folder with train.txt|train.jsonl and test.txt|test.jsonl")
  n_test = min(max(int(round(test_fraction * n)), 1), n - 1)
  held = np.zeros(n, bool)
  held[_permutation(n, _TAG_SPLIT, seed)[:n_test]] = True
  test_idx, train_idx = np.flatnonzero(held).tolist(), np.flatnonzero(~held).tolist()
  return (tuple(prompts[i] for i in train_idx), tuple(prompts[i] for i in test_idx),
          tuple(meta[i] for i in train_idx), tuple(meta[i] for i in test_idx))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def world_prompts() -> PromptSet:
  """The embedded world: train = captions of its training combos, test = of its held-out combos."""
  train = tuple(world.captions(world.combos("train")))
  test = tuple(world.captions(world.combos("heldout")))
  return PromptSet(WORLD, train, test, tuple({} for _ in train), tuple({} for _ in test),
                   is_world=True)


def load(spec: str, *, seed: int = 0, test_fraction: float = 0.1) -> PromptSet:
  """The prompt set of `spec` ('world', a .txt / .jsonl file or a folder; see the module doc).

  `seed` and `test_fraction` (in (0, 1)) choose the held-out prompts when there is no test file.
  """
  if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not (
      0.0 < test_fraction < 1.0):
    raise PromptError(f"{spec}: test_fraction = {test_fraction!r} is invalid; it must be a number "
                      f"in (0, 1), the fraction of prompts held out when there is no test file")
  seed = _check_int("seed", seed, -(2**63))
  if not isinstance(spec, str) or not spec.strip():
    raise PromptError(f"prompt source {spec!r} is invalid; allowed: {ALLOWED_SPECS}")
  if spec == WORLD:
    return world_prompts()
  path = os.path.abspath(os.path.expanduser(spec))
  if not os.path.exists(path):
    raise PromptError(f"{path}: does not exist (from {spec!r}); allowed: {ALLOWED_SPECS}")
  if os.path.isdir(path):
    train_path = _folder_file(path, "train", required=True)
    test_path = _folder_file(path, "test", required=False)
    prompts, meta = _read_file(train_path)
    if test_path is not None:
      test, test_meta = _read_file(test_path)
      return PromptSet(path, tuple(prompts), tuple(test), tuple(meta), tuple(test_meta))
    source_file = train_path
  else:
    prompts, meta = _read_file(path)
    source_file = path
  train, test, train_meta, test_meta = _hold_out(source_file, prompts, meta, seed, test_fraction)
  return PromptSet(path, train, test, train_meta, test_meta)


def every_prompt(prompt_set: PromptSet, *extra: str) -> list[str]:
  """Every distinct prompt a run may encode: both splits, their `negative_prompt` fields and
  `extra` (e.g. the default negative prompt), in a fixed order (a text cache's key)."""
  negs = [m["negative_prompt"] for m in prompt_set.train_meta + prompt_set.test_meta
          if isinstance(m.get("negative_prompt"), str)]
  return list(dict.fromkeys(list(prompt_set.train + prompt_set.test) + negs + list(extra)))
