"""UMT5 embeddings of a whole prompt set on disk, read back a few rows at a time.

Wan's text encoder (UMT5-XXL, 5.7 GB) is the costliest network to run per prompt and its output
([512, 4096] per prompt) the largest input: a prompt set is embedded once, into a folder of

  tokens.npy   [sum of kept lengths, D]   the kept token rows of every prompt, packed
  offsets.npy  [N + 1] int64              prompt i's rows are tokens[offsets[i]:offsets[i+1]]
  prompts.json                            the prompts, in row order
  meta.json                               fingerprint and sizes, written last (atomically)

and `lookup(prompts)` memory-maps the packed rows and builds the zero-padded `[n, L, D]`
batch an iteration needs, so a prompt set of 100k prompts never sits in memory or on the
device whole. The fingerprint covers the encoder's weights (each safetensors file's header,
size and first and last MiB), the tokenizer's files, the text length, the storage dtype and
the prompts; a cache whose fingerprint, sizes or files do not match is rebuilt, with the reason
printed. Rows are those of `umt5_prompts.prompt_embeds` (diffusers' Wan convention).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Callable, Sequence

import numpy as np

FORMAT = 1
MiB = 1 << 20


def weights_digest(folder: str) -> str:
  """A digest of the safetensors files in `folder`: header, size, first and last MiB each."""
  h = hashlib.sha256()
  for name in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
    path = os.path.join(folder, name)
    size = os.path.getsize(path)
    h.update(f"{name}:{size}".encode())
    with open(path, "rb") as f:
      h.update(f.read(MiB))
      f.seek(max(0, size - MiB))
      h.update(f.read(MiB))
  return h.hexdigest()[:32]


def files_digest(folder: str) -> str:
  """A digest of every file in `folder` (a tokenizer's: small)."""
  h = hashlib.sha256()
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      h.update(name.encode())
      with open(path, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
  return h.hexdigest()[:32]


def fingerprint(prompts: Sequence[str], **ingredients) -> str:
  blob = json.dumps({"format": FORMAT, "prompts": hashlib.sha256(
      "\n".join(prompts).encode()).hexdigest(), **ingredients}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:32]


class PromptCache:
  """The embeddings of `prompts` under `folder` (built by `encode_batch` if not valid)."""

  def __init__(self, folder: str, prompts: Sequence[str], encode_batch: Callable, *,
               max_length: int, fingerprint_: str, dtype: str = "float32",
               batch_size: int = 8, write: bool = True, log=print):
    self.folder, self.max_length = folder, int(max_length)
    unique = list(dict.fromkeys(prompts))
    reason = self._invalid(fingerprint_, len(unique))
    if reason:
      if write:
        log(f"[prompts] embedding {len(unique)} prompts into {folder} ({reason})")
        self._build(unique, encode_batch, fingerprint_, dtype, batch_size)
      else:  # another process writes; this one waits for the shared file system
        raise RuntimeError(f"prompt cache {folder}: {reason}; process 0 builds it")
    self.tokens = np.load(os.path.join(folder, "tokens.npy"), mmap_mode="r")
    self.offsets = np.load(os.path.join(folder, "offsets.npy"))
    with open(os.path.join(folder, "prompts.json")) as f:
      self.row = {p: i for i, p in enumerate(json.load(f))}

  def _invalid(self, fp: str, n: int) -> str:
    meta = os.path.join(self.folder, "meta.json")
    if not os.path.exists(meta):
      return "no cache yet"
    try:
      with open(meta) as f:
        m = json.load(f)
    except (OSError, ValueError) as e:
      return f"meta.json unreadable: {e}"
    if m.get("fingerprint") != fp:
      return "stale: the encoder, tokenizer, text length, dtype or prompts changed"
    try:
      tokens = np.load(os.path.join(self.folder, "tokens.npy"), mmap_mode="r")
      offsets = np.load(os.path.join(self.folder, "offsets.npy"))
    except (OSError, ValueError) as e:
      return f"truncated or missing array file: {e}"
    if offsets.shape != (n + 1,) or int(offsets[-1]) != tokens.shape[0] or \
        tokens.shape[0] != m.get("rows"):
      return f"truncated: {tokens.shape[0]} rows, offsets {offsets.shape}, meta {m.get('rows')}"
    return ""

  def _build(self, prompts, encode_batch, fp, dtype, batch_size) -> None:
    tmp = self.folder.rstrip("/") + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    chunks, lengths = [], []
    for i in range(0, len(prompts), batch_size):
      out = encode_batch(prompts[i:i + batch_size])
      tokens, n = np.asarray(out["tokens"]), np.asarray(out["mask"]).sum(1)
      chunks += [t[:k].astype(dtype) for t, k in zip(tokens, n)]
      lengths += [int(k) for k in n]
    d = chunks[0].shape[-1] if chunks else 0
    tokens = np.concatenate(chunks) if chunks else np.zeros((0, d), dtype)
    np.save(os.path.join(tmp, "tokens.npy"), tokens)
    np.save(os.path.join(tmp, "offsets.npy"), np.concatenate([[0], np.cumsum(lengths)]).astype(
        np.int64))
    with open(os.path.join(tmp, "prompts.json"), "w") as f:
      json.dump(list(prompts), f)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump({"fingerprint": fp, "rows": int(tokens.shape[0]), "prompts": len(prompts),
                 "max_length": self.max_length, "dtype": dtype}, f)
    shutil.rmtree(self.folder, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(self.folder)), exist_ok=True)
    os.replace(tmp, self.folder)

  def lookup(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """{'tokens': float32 [n, L, D] zero past each prompt, 'mask': bool [n, L]}."""
    missing = [p for p in prompts if p not in self.row]
    if missing:
      raise KeyError(f"prompt cache {self.folder} has no embedding of {missing[0]!r}")
    n, d = len(prompts), self.tokens.shape[-1]
    tokens = np.zeros((n, self.max_length, d), np.float32)
    mask = np.zeros((n, self.max_length), bool)
    for j, p in enumerate(prompts):
      lo, hi = self.offsets[self.row[p]], self.offsets[self.row[p] + 1]
      tokens[j, :hi - lo] = self.tokens[lo:hi]
      mask[j, :hi - lo] = True
    return {"tokens": tokens, "mask": mask}
