"""Orbax checkpoints: atomic, finite, verified saves, exact resume, and the shipped assets.

A stage writes `WORKDIR/<stage>/checkpoints/<step>/` with an orbax `CheckpointManager`
(atomic: a step directory appears only once complete) and, once finished,
`WORKDIR/<stage>/final/` holding the arrays later stages need (e.g. EMA parameters) plus a
`DONE` marker. Restoring goes into abstract targets (`jax.ShapeDtypeStruct`s carrying
`NamedSharding`s), so each array lands directly on its devices.

Integrity. Nothing non-finite is saved: `save` and `save_final` first run one fused
all-finite reduction over the state and refuse (naming the leaves) if it fails. After orbax
has finished a save, process 0 writes `integrity.json` into the saved directory: the size and
sha256 of every file orbax wrote, for all processes' shards (the files of a multi-host save
all lie under that directory on the shared filesystem, so one process can digest them; the
record is written atomically, after the save, so a step without one was cut short). Restoring
checks the files against the record before orbax reads a byte: a missing, truncated or
altered file is named, that step is moved to `<stage>/damaged_checkpoints/` and the previous
kept step is used; with none intact, `CheckpointError`. On several processes process 0
verifies and broadcasts the step it chose, so all restore the same one.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

DONE = "DONE"
INTEGRITY = "integrity.json"
CONFIG = "config.json"
# Orbax's own bookkeeping (timestamps), not array data: left out of the digest.
_UNHASHED = (INTEGRITY, INTEGRITY + ".tmp", "_CHECKPOINT_METADATA")


class CheckpointError(RuntimeError):
  """No intact checkpoint to restore; the message names every damaged one and why."""


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs with the shardings of a concrete or abstract pytree."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def step_dir(mgr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mgr.directory), str(step))


# ---------------------------------------------------------------------------- Finiteness


def _inexact(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


@jax.jit
def _all_finite(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def nonfinite_leaves(tree: Any) -> list[str]:
  """Paths (`jax.tree_util.keystr`) of the floating leaves holding a NaN or inf.

  One fused reduction and one host read of a scalar when all is finite (the usual case).
  """
  named = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(tree) if _inexact(x)]
  if not named:
    return []
  try:
    if bool(_all_finite([x for _, x in named])):
      return []
  except ValueError:  # Leaves committed to different devices: one reduction each.
    pass
  flags = jax.device_get([jnp.all(jnp.isfinite(x)) for _, x in named])
  return [jax.tree_util.keystr(p) for (p, _), ok in zip(named, flags) if not ok]


def _refuse_nonfinite(tree: Any, what: str) -> None:
  bad = nonfinite_leaves(tree)
  if bad:
    shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
    raise FloatingPointError(
        f"refusing to save {what}: non-finite values in {shown}. Nothing was written; the "
        "previous checkpoint is kept (a non-finite update should have been skipped: check "
        "the learning rate, b1/b2 and the loss).")


# -------------------------------------------------------------------------------- Digest


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      h.update(chunk)
  return h.hexdigest()


def _files(directory: str) -> list[str]:
  out = []
  for root, _, names in os.walk(directory):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), directory)
      if rel not in _UNHASHED:
        out.append(rel)
  return sorted(out)


def layout(tree: Any) -> dict[str, list]:
  """`{keystr: [shape, dtype]}` of a concrete or abstract pytree: what a restore must match."""
  return {jax.tree_util.keystr(p): [list(x.shape), str(x.dtype)]
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def write_digest(directory: str, tree_layout: dict | None = None) -> dict:
  """Writes `directory/integrity.json`: size and sha256 of every file below it, and the
  state's `layout` when given (atomically)."""
  rels = _files(directory)
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    hashes = list(pool.map(lambda r: _sha256(os.path.join(directory, r)), rels))
  record = {"format": 1, "algorithm": "sha256", "finite": True,
            "files": {r: [os.path.getsize(os.path.join(directory, r)), h]
                      for r, h in zip(rels, hashes)}}
  if tree_layout is not None:
    record["layout"] = tree_layout
  tmp = os.path.join(directory, INTEGRITY + ".tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(directory, INTEGRITY))
  return record


def verify(directory: str) -> str | None:
  """None when every file of `directory` matches its `integrity.json`, else the problem."""
  try:
    with open(os.path.join(directory, INTEGRITY)) as f:
      files = json.load(f)["files"]
  except FileNotFoundError:
    return (f"{INTEGRITY} is missing (the run stopped between writing the checkpoint and its "
            "digest, or an older version wrote it)")
  except (ValueError, KeyError, TypeError) as e:
    return f"{INTEGRITY} is unreadable ({e})"
  problems, to_hash = [], []
  for rel, (size, digest) in sorted(files.items()):
    path = os.path.join(directory, rel)
    if not os.path.isfile(path):
      problems.append(f"{rel} is missing")
    elif os.path.getsize(path) != size:
      problems.append(f"{rel} has {os.path.getsize(path)} bytes, {size} were saved "
                      "(truncated or overwritten)")
    else:
      to_hash.append((rel, digest))
  if not problems:
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
      got = list(pool.map(lambda r: _sha256(os.path.join(directory, r[0])), to_hash))
    problems = [f"{rel} differs from what was saved (sha256 mismatch)"
                for (rel, digest), h in zip(to_hash, got) if h != digest]
  if not problems:
    return None
  return "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4
                                    else "")


# ------------------------------------------------------------------------- Multi-process


def _is_primary() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _agree(value: int) -> int:
  """Process 0's `value` on every process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


# ---------------------------------------------------------------------- Save / restore


def save(mgr: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> None:
  """Saves a finite `state` at `step` (else FloatingPointError, nothing written), then its
  digest."""
  _refuse_nonfinite(state, f"step {step} to {mgr.directory}")
  saved = mgr.save(step, args=ocp.args.StandardSave(state), force=force)
  mgr.wait_until_finished()
  if saved is not False and _is_primary():
    write_digest(step_dir(mgr, step), layout(state))
  _sync(f"euphonium_digest_{step}")


def last_intact_step(mgr: ocp.CheckpointManager) -> int | None:
  """The newest step whose files match their digest (this process's view), or None."""
  for step in sorted(mgr.all_steps(), reverse=True):
    if verify(step_dir(mgr, step)) is None:
      return step
  return None


def restore_latest(mgr: ocp.CheckpointManager, abstract_state: Any,
                   layout_hints: dict[str, str] | None = None) -> tuple[int, Any] | None:
  """(step, state) of the newest intact checkpoint, or None when the directory holds none.

  Damaged newer steps are named and moved to `damaged_checkpoints/` beside the directory
  (they would block saving those steps again); with none intact, CheckpointError. A chosen
  step whose arrays differ from `abstract_state` in names, shapes or dtypes is a
  CheckpointError naming them and, through `layout_hints` (top-level key -> the setting that
  makes it), what changed the layout.
  """
  steps = sorted(mgr.all_steps(), reverse=True)
  if not steps:
    return None
  chosen, damaged = -1, []
  if _is_primary():
    for step in steps:
      problem = verify(step_dir(mgr, step))
      if problem is None:
        chosen = step
        break
      damaged.append((step, problem))
  chosen = _agree(chosen)
  if chosen < 0:
    detail = "; ".join(f"step {s}: {p}" for s, p in damaged) or "see process 0's log"
    raise CheckpointError(
        f"no intact checkpoint in {mgr.directory} ({detail}). Move that directory away to "
        "start the stage afresh, or put back an intact copy.")
  if damaged:
    aside = os.path.join(os.path.dirname(str(mgr.directory)), "damaged_checkpoints")
    os.makedirs(aside, exist_ok=True)
    for step, problem in damaged:
      dest = os.path.join(aside, f"{step}-{int(time.time())}")
      shutil.move(step_dir(mgr, step), dest)
      print(f"[checkpoint] step {step} in {mgr.directory} is damaged: {problem}; moved to "
            f"{dest}; using step {chosen}")
  _sync("euphonium_restore_choice")
  if abstract_state is not None:
    _check_layout(step_dir(mgr, chosen), abstract_state, layout_hints or {})
  if chosen != steps[0]:
    mgr.reload()
  return chosen, mgr.restore(chosen, args=ocp.args.StandardRestore(abstract_state))


def _check_layout(directory: str, abstract_state: Any, hints: dict[str, str]) -> None:
  """CheckpointError when the saved state's arrays (names, shapes, dtypes) differ from what
  this run builds: one message naming the differences, the settings that decide them
  (`hints`: top-level state key -> setting) and what to do. Records without a layout
  (written before it was kept) are not checked here; orbax's restore then decides."""
  try:
    with open(os.path.join(directory, INTEGRITY)) as f:
      saved = json.load(f).get("layout")
  except (OSError, ValueError):
    return
  if saved is None:
    return
  want = layout(abstract_state)
  missing = [k for k in want if k not in saved]
  extra = [k for k in saved if k not in want]
  changed = [k for k in want if k in saved and want[k] != saved[k]]
  if not (missing or extra or changed):
    return
  top = lambda k: k.split("]")[0].strip("[]'\"") if k.startswith("[") else k
  parts, settings = [], []
  for label, keys in (("arrays this run needs but the checkpoint lacks", missing),
                      ("arrays in the checkpoint this run does not build", extra)):
    if keys:
      groups = sorted({top(k) for k in keys})
      parts.append(f"{label}: {len(keys)} under {', '.join(repr(g) for g in groups)}")
      settings += [hints[g] for g in groups if g in hints]
  for k in changed[:4]:
    parts.append(f"{k} was saved as {saved[k][1]}{tuple(saved[k][0])}, this run builds "
                 f"{want[k][1]}{tuple(want[k][0])}")
  if len(changed) > 4:
    parts.append(f"and {len(changed) - 4} more arrays of another shape or dtype")
  why = (f" The setting that decides this: {'; '.join(dict.fromkeys(settings))}." if settings
         else " A model, LoRA or optimiser setting differs from the run that saved it.")
  raise CheckpointError(
      f"the checkpoint {directory} holds a differently laid-out state: {'; '.join(parts)}."
      f"{why} Resume with the settings of the run that saved it (runs.jsonl in the workdir "
      "records each run's config), or start this configuration in a new workdir.")


# ---------------------------------------------------------------------------- Final


def save_final(directory: str, tree: dict[str, Any], info: dict[str, Any],
               config_json: str | None = None) -> None:
  """Writes a finished stage's finite arrays (atomically, via orbax), their digest, `info`,
  the run's resolved config (`config_json`, e.g. `config.to_json_best_effort()`) and then
  the DONE marker."""
  directory = os.path.abspath(directory)
  _refuse_nonfinite(tree, f"the final arrays to {directory}")
  ckptr = ocp.StandardCheckpointer()
  path = os.path.join(directory, "arrays")
  ckptr.save(path, tree, force=True)
  ckptr.wait_until_finished()
  if _is_primary():
    write_digest(path)
    with open(os.path.join(directory, "info.json"), "w") as f:
      json.dump(info, f, indent=2, sort_keys=True, default=_jsonable)
    if config_json is not None:
      with open(os.path.join(directory, CONFIG), "w") as f:
        f.write(config_json)
    with open(os.path.join(directory, DONE), "w") as f:
      f.write("done\n")
  _sync("euphonium_save_final")


def is_done(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, DONE))


def load_final(directory: str, abstract_tree: Any | None = None) -> dict[str, Any]:
  """Restores `save_final`'s arrays; into `abstract_tree`'s shardings when given.

  Arrays with a digest (all that `save_final` writes) are verified first; the shipped
  assets predate digests and load unverified.
  """
  directory = os.path.abspath(directory)
  if not is_done(directory):
    raise FileNotFoundError(
        f"{directory} holds no finished checkpoint (no {DONE} marker): was its stage "
        "interrupted? Re-run that stage or point the config at a finished one.")
  path = os.path.join(directory, "arrays")
  if os.path.exists(os.path.join(path, INTEGRITY)):
    problem = verify(path)
    if problem is not None:
      raise CheckpointError(
          f"{path} is damaged: {problem}. Re-run the stage that wrote it (delete "
          f"{directory} first) or restore an intact copy.")
  ckptr = ocp.StandardCheckpointer()
  if abstract_tree is None:
    # Host numpy arrays: readable whatever device topology wrote them (8 forced CPU devices,
    # several processes, one GPU), and placeable by the caller with any sharding.
    meta = ckptr.metadata(path).item_metadata.tree
    return ocp.PyTreeCheckpointer().restore(path, restore_args=jax.tree.map(
        lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta))
  return ckptr.restore(path, abstract_tree)


def read_info(directory: str) -> dict[str, Any]:
  with open(os.path.join(directory, "info.json")) as f:
    return json.load(f)


def _jsonable(x):
  if isinstance(x, (np.generic,)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)
