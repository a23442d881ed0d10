"""A chunked, fingerprinted on-disk cache of generated arrays (e.g. rollouts for the PRM).

Layout of a cache directory (plain `.npz` files a user can open with `numpy.load`):

  cache.json          the fingerprint, what went into it (readable), the chunk files
  chunk_00000.npz     the arrays of chunk 0 plus its `fingerprint` (a string array)
  chunk_00001.npz     ...

`load_or_make(directory, fingerprint, num_chunks, make_chunk)` returns the concatenation of
every chunk, reading the chunks that exist and match, making (and writing) the others.
Chunk i is a pure function of i (its caller derives the key from i), so an interrupted
generation resumes, and asking for more chunks reuses the ones already made.

Never silently stale: a chunk whose fingerprint differs (made by another base model, reward
or config) is regenerated, and so is a chunk that cannot be read (truncated, corrupt, or
missing arrays); each case is reported on stdout with the file and the reason. Writes of
chunks and of the manifest are atomic (a temporary file, then `os.replace`), so an
interruption never leaves a half file. Each chunk carries its own fingerprint, so the chunks
alone decide what is reused: a lost or unreadable `cache.json` is rebuilt from them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import zipfile
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tqdm

MANIFEST = "cache.json"
_FINGERPRINT_KEY = "fingerprint"


def digest_arrays(tree: Any) -> str:
  """sha256 hex of every array leaf of a nested dict/list (bytes, dtype, shape; sorted keys)."""
  h = hashlib.sha256()

  def visit(node, path):
    if isinstance(node, Mapping):
      for k in sorted(node, key=str):
        visit(node[k], f"{path}/{k}")
    elif isinstance(node, (list, tuple)):
      for i, v in enumerate(node):
        visit(v, f"{path}/{i}")
    else:
      a = np.ascontiguousarray(np.asarray(node))
      h.update(f"{path}:{a.dtype}:{a.shape};".encode())
      h.update(a.tobytes())

  visit(tree, "")
  return h.hexdigest()


def fingerprint(ingredients: Mapping[str, Any]) -> str:
  """A short sha256 of a JSON-serialisable dict (keys sorted): the identity of a cache."""
  text = json.dumps(ingredients, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def chunk_path(directory: str, index: int) -> str:
  return os.path.join(directory, f"chunk_{index:05d}.npz")


def write_chunk(directory: str, index: int, arrays: Mapping[str, np.ndarray],
                fp: str) -> str:
  """Writes chunk `index` atomically with its fingerprint; returns its path."""
  if _FINGERPRINT_KEY in arrays:
    raise ValueError(f"a cached array may not be named {_FINGERPRINT_KEY!r}")
  os.makedirs(directory, exist_ok=True)
  path = chunk_path(directory, index)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()},
           **{_FINGERPRINT_KEY: np.asarray(fp)})
  os.replace(tmp, path)
  return path


def read_chunk(path: str, fp: str, keys: Sequence[str]) -> tuple[dict | None, str]:
  """(arrays, "") for a readable chunk of fingerprint `fp` holding `keys`, else (None, why)."""
  if not os.path.exists(path):
    return None, "missing"
  try:
    with np.load(path, allow_pickle=False) as f:
      found = str(f[_FINGERPRINT_KEY]) if _FINGERPRINT_KEY in f.files else None
      if found != fp:
        return None, f"made with a different fingerprint ({found} != {fp})"
      missing = [k for k in keys if k not in f.files]
      if missing:
        return None, f"lacks the arrays {missing}"
      return {k: f[k] for k in keys}, ""
  except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as e:
    return None, f"unreadable (truncated or corrupt: {type(e).__name__}: {e})"


def load_or_make(directory: str, fp: str, num_chunks: int,
                 make_chunk: Callable[[int], Mapping[str, np.ndarray]], *,
                 keys: Sequence[str], ingredients: Mapping[str, Any] | None = None,
                 write: bool = True, desc: str = "rollouts",
                 progress: bool = True) -> dict[str, np.ndarray]:
  """The arrays of chunks 0..num_chunks-1, concatenated along axis 0 (see module doc).

  keys: the arrays every chunk holds (a chunk lacking one is regenerated).
  ingredients: what the fingerprint was made from, written to `cache.json` for people.
  write: False on processes that must not write (the chunks are still made in memory).
  """
  manifest = os.path.join(directory, MANIFEST)
  old, why = _read_manifest(manifest)
  if old is None or old.get("fingerprint") != fp:
    if why:
      print(f"[cache] {manifest} is {why}: rebuilding it from the chunks' own fingerprints")
    stale = {path: found for path, found in _chunk_fingerprints(directory).items()
             if found is not None and found != fp}
    if stale:
      print(f"[cache] {len(stale)} chunk(s) in {directory} were made by a different base "
            f"model, reward or config (fingerprint {sorted(set(stale.values()))} != {fp}): "
            "regenerating" + (", removing the old ones" if write else ""))
      if write:
        for path in stale:
          os.remove(path)
  if write:
    _write_json(manifest, {"fingerprint": fp, "num_chunks": num_chunks, "keys": list(keys),
                           "ingredients": dict(ingredients or {})})
  chunks: list[dict | None] = []
  todo = []
  for i in range(num_chunks):
    arrays, why = read_chunk(chunk_path(directory, i), fp, keys)
    if arrays is None and why != "missing":
      print(f"[cache] {chunk_path(directory, i)} is {why}: regenerating it")
    chunks.append(arrays)
    if arrays is None:
      todo.append(i)
  if todo:
    print(f"[cache] {num_chunks - len(todo)}/{num_chunks} chunks of {desc} found in "
          f"{directory}; making {len(todo)}")
  for i in tqdm.tqdm(todo, desc=desc, disable=not progress or not todo):
    arrays = {k: np.asarray(v) for k, v in make_chunk(i).items()}
    missing = [k for k in keys if k not in arrays]
    if missing:
      raise ValueError(f"make_chunk({i}) did not return the arrays {missing}")
    if write:
      write_chunk(directory, i, arrays, fp)
    chunks[i] = {k: arrays[k] for k in keys}
  return {k: np.concatenate([c[k] for c in chunks], axis=0) for k in keys}


def _read_manifest(path: str) -> tuple[dict | None, str]:
  """(manifest, "") if readable; (None, "") if absent; (None, why) if unreadable."""
  if not os.path.exists(path):
    return None, ""
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    return None, f"unreadable ({type(e).__name__}: {e})"
  if not isinstance(manifest, dict):
    return None, "not a JSON object"
  return manifest, ""


def _chunk_fingerprints(directory: str) -> dict[str, str | None]:
  """{chunk path: the fingerprint stored in it, or None if it cannot be read}."""
  out = {}
  for path in sorted(glob.glob(os.path.join(directory, "chunk_*.npz"))):
    if path.endswith(".tmp.npz"):
      continue
    try:
      with np.load(path, allow_pickle=False) as f:
        out[path] = str(f[_FINGERPRINT_KEY]) if _FINGERPRINT_KEY in f.files else None
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError):
      out[path] = None
  return out


def _write_json(path: str, value: Mapping[str, Any]) -> None:
  """Writes `value` as JSON atomically: a temporary file in the same directory, then
  `os.replace`, so a reader sees the old file or the new one, never a torn one."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1, sort_keys=True, default=str)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
