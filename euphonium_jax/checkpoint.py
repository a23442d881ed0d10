"""Orbax checkpoints: atomic saves, exact resume, and the small shipped assets.

A stage writes `WORKDIR/<stage>/checkpoints/<step>/` with an orbax `CheckpointManager`
(atomic: a step directory appears only once complete) and, once finished,
`WORKDIR/<stage>/final/` holding the arrays later stages need (e.g. EMA parameters) plus a
`DONE` marker. Restoring goes into abstract targets (`jax.ShapeDtypeStruct`s carrying
`NamedSharding`s), so each array lands directly on its devices.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

DONE = "DONE"


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs with the shardings of a concrete or abstract pytree."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def save(mgr: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> None:
  mgr.save(step, args=ocp.args.StandardSave(state), force=force)
  mgr.wait_until_finished()


def restore_latest(mgr: ocp.CheckpointManager, abstract_state: Any) -> tuple[int, Any] | None:
  """(step, state) of the newest checkpoint, or None when the directory holds none."""
  step = mgr.latest_step()
  if step is None:
    return None
  return step, mgr.restore(step, args=ocp.args.StandardRestore(abstract_state))


def save_final(directory: str, tree: dict[str, Any], info: dict[str, Any]) -> None:
  """Writes a finished stage's arrays (atomically, via orbax) and then the DONE marker."""
  directory = os.path.abspath(directory)
  ckptr = ocp.StandardCheckpointer()
  path = os.path.join(directory, "arrays")
  ckptr.save(path, tree, force=True)
  ckptr.wait_until_finished()
  with open(os.path.join(directory, "info.json"), "w") as f:
    json.dump(info, f, indent=2, sort_keys=True, default=_jsonable)
  with open(os.path.join(directory, DONE), "w") as f:
    f.write("done\n")


def is_done(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, DONE))


def load_final(directory: str, abstract_tree: Any | None = None) -> dict[str, Any]:
  """Restores `save_final`'s arrays; into `abstract_tree`'s shardings when given."""
  directory = os.path.abspath(directory)
  if not is_done(directory):
    raise FileNotFoundError(
        f"{directory} holds no finished checkpoint (no {DONE} marker): was its stage "
        "interrupted? Re-run that stage or point the config at a finished one.")
  ckptr = ocp.StandardCheckpointer()
  path = os.path.join(directory, "arrays")
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
