"""Device mesh, logical-axis rules and the shardings of parameters and batches.

Parameters carry logical axis names (`nnx.with_partitioning(init, ('embed', 'mlp'))`); the
config's rules table maps each logical name to a mesh axis (or None = replicated). Batches
are split over every data-parallel axis (`data` and `fsdp`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices=None) -> Mesh:
  """A mesh over all devices; one size may be -1 (whatever the others leave)."""
  devices = jax.devices() if devices is None else devices
  shape = list(shape)
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} does not multiply to {len(devices)} devices")
  return jax.make_mesh(tuple(shape), tuple(axes), axis_types=(AxisType.Auto,) * len(axes),
                       devices=devices)


def mesh_from_config(config) -> Mesh:
  return make_mesh(config.mesh.shape, config.mesh.axes)


def logical_to_mesh(spec: Sequence[Any], rules: Sequence[Sequence[Any]], mesh: Mesh,
                    shape: Sequence[int]) -> P:
  """Maps a spec of logical names to mesh axes; an axis that does not divide is replicated."""
  table = {name: axis for name, axis in rules}
  used, out = set(), []
  for dim, name in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axis = table.get(name) if name is not None else None
    axes = () if axis is None else (tuple(axis) if isinstance(axis, (tuple, list)) else (axis,))
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if not axes or used & set(axes) or dim % size:
      out.append(None)
      continue
    used |= set(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out)


def state_shardings(abstract_state: nnx.State | Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a (possibly abstract) nnx.State, from its logical-axis metadata."""
  specs = nnx.get_partition_spec(abstract_state)

  def one(spec, leaf):
    shape = getattr(leaf, "shape", ())
    spec = spec if isinstance(spec, P) else P()
    return NamedSharding(mesh, logical_to_mesh(spec, rules, mesh, shape))

  return jax.tree.map(one, specs, abstract_state,
                      is_leaf=lambda x: isinstance(x, P) or x is None)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def batch_size_ok(batch_size: int, mesh: Mesh) -> bool:
  n = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))
  return batch_size % n == 0


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))


def shard_batch(tree, mesh: Mesh):
  """Places every array of a batch pytree with its leading dimension split."""
  return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x))), tree)


def global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global jax.Array from a host array every process holds in full (its own shards are
  taken from it): works on one process and on several."""
  host = np.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-process, sharded) array on every process."""
  if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
