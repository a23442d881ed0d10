"""Reading published weight folders into NNX models: name tables, layouts, sharded placement.

A model's table is a list of ``Rule``s. Each maps reference tensor names (a regular expression
over the PyTorch name; a group named ``layer`` marks a scanned block index) to the path of our
parameter ('/'-separated) and says how the layout changes:

  layout     reference shape            ours
  'linear'   [out, in]                  [in, out]              (nnx.Linear kernel)
  'conv3d'   [out, in, kt, kh, kw]      [kt, kh, kw, in, out]
  'conv2d'   [out, in, kh, kw]          [kh, kw, in, out]
  'same'     any                        unchanged (biases, norms, tables, embeddings)

Tensors whose names carry a ``layer`` group are stacked along a new leading axis in layer
order (the layout of ``nnx.vmap``-built, ``nnx.scan``-applied blocks).

Loading never builds the model in memory first: ``nnx.eval_shape`` gives the abstract state,
each tensor is read on the host, converted, checked against its abstract shape and placed with
the ``NamedSharding`` from its logical axis names, so the whole model never sits on one
device. Missing, unexpected and mis-shaped tensors are one error naming every offending key.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from euphonium_jax import parallel

LAYOUTS = ('linear', 'conv3d', 'conv2d', 'same')


@dataclasses.dataclass(frozen=True)
class Rule:
  ref: str  # regular expression, fully matched against the reference name
  ours: str  # our parameter path, '/'-separated; may use the regex's groups as {name}
  layout: str = 'same'

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f'Rule({self.ref!r}): layout {self.layout!r} not in {LAYOUTS}')


class WeightsError(ValueError):
  """Weights that do not fit the model; the message lists every offending key."""


# Axis permutation from the reference layout to ours, per layout ('same': none).
PERMUTATIONS = {'linear': (1, 0), 'conv3d': (2, 3, 4, 1, 0), 'conv2d': (2, 3, 1, 0)}


def to_ours(x: np.ndarray, layout: str) -> np.ndarray:
  perm = PERMUTATIONS.get(layout)
  if perm is None or x.ndim != len(perm):
    return x  # 'same', or a wrong rank left as is so that ``place`` names the mismatch
  return np.transpose(x, perm)


def to_reference(x: np.ndarray, layout: str) -> np.ndarray:
  """Inverse of ``to_ours`` (for exports such as LoRA adapters)."""
  perm = PERMUTATIONS.get(layout)
  return x if perm is None else np.transpose(x, np.argsort(perm))


# ----------------------------------------------------------------------------- Reading


def safetensors_files(folder: str) -> list[str]:
  """The weight files of a diffusers/transformers folder: a sharded index or the single file."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'weights folder {folder!r} does not exist')
  index = [f for f in os.listdir(folder) if f.endswith('.safetensors.index.json')]
  if len(index) > 1:
    raise WeightsError(f'{folder}: several index files {sorted(index)}')
  if index:
    with open(os.path.join(folder, index[0])) as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
    if missing:
      raise WeightsError(f'{folder}: {index[0]} names shards that are missing: {missing}')
    return [os.path.join(folder, s) for s in shards]
  files = sorted(f for f in os.listdir(folder) if f.endswith('.safetensors'))
  if len(files) != 1:
    raise WeightsError(f'{folder}: expected one *.safetensors file or a *.safetensors.index.json'
                       f', found {files}')
  return [os.path.join(folder, files[0])]


def read_config(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{folder}: no config.json')
  with open(path) as f:
    return json.load(f)


class TensorReader:
  """Lazy name -> float32 numpy reader over one or more safetensors files.

  The safetensors library reads every dtype numpy has; bfloat16 (the dtype of many published
  checkpoints) is read from the file's header offsets as ml_dtypes.bfloat16.
  """

  def __init__(self, files: Sequence[str]):
    from safetensors import safe_open  # a dependency of transformers and diffusers
    self._where: dict[str, tuple[str, Any]] = {}
    for f in files:
      h = safe_open(f, framework='numpy')
      for k in h.keys():
        self._where[k] = (f, h)
    self._headers: dict[str, tuple[int, dict]] = {}

  def keys(self) -> list[str]:
    return list(self._where)

  def __getitem__(self, name: str) -> np.ndarray:
    path, h = self._where[name]
    try:
      x = h.get_tensor(name)
    except (TypeError, ValueError):
      x = self._raw(path, name)
    return np.asarray(x, np.float32)

  def _raw(self, path: str, name: str) -> np.ndarray:
    import ml_dtypes  # a dependency of jax
    if path not in self._headers:
      with open(path, 'rb') as f:
        n = int.from_bytes(f.read(8), 'little')
        self._headers[path] = (8 + n, json.loads(f.read(n)))
    base, header = self._headers[path]
    meta = header[name]
    dtypes = {'BF16': ml_dtypes.bfloat16, 'F16': np.float16, 'F32': np.float32}
    if meta['dtype'] not in dtypes:
      raise WeightsError(f'tensor {name} in {path}: dtype {meta["dtype"]} is not supported')
    start, end = meta['data_offsets']
    raw = np.memmap(path, dtype=np.uint8, mode='r', offset=base + start, shape=(end - start,))
    return raw.view(dtypes[meta['dtype']]).reshape(meta['shape'])


def open_folder(folder: str) -> TensorReader:
  return TensorReader(safetensors_files(folder))


# -------------------------------------------------------------------------- Conversion


def _matcher(rules: Sequence[Rule], ignore: Sequence[str]):
  """-> match(name) = (our path, layout, layer index or None) | 'ignore' | None."""
  compiled = [(re.compile(r.ref), r) for r in rules]
  ignore_re = [re.compile(p) for p in ignore]

  def match(name: str):
    if any(p.fullmatch(name) for p in ignore_re):
      return 'ignore'
    for pat, rule in compiled:
      m = pat.fullmatch(name)
      if m is not None:
        groups = m.groupdict()
        layer = int(groups['layer']) if 'layer' in groups else None
        return rule.ours.format(**groups), rule.layout, layer
    return None

  return match


def _assemble(names, match, item, stack):
  """Shared by ``convert`` and ``convert_shapes``: single and layer-stacked entries."""
  single, stacked, unexpected = {}, {}, []
  for name in names:
    m = match(name)
    if m is None:
      unexpected.append(name)
      continue
    if m == 'ignore':
      continue
    path, layout, layer = m
    x = item(name, layout)
    if layer is None:
      single[path] = x
    else:
      stacked.setdefault(path, {})[layer] = x
  for path, by_layer in stacked.items():
    n = max(by_layer) + 1
    gaps = [i for i in range(n) if i not in by_layer]
    if gaps:
      raise WeightsError(f'{path}: layers {gaps} missing from the weights (have {sorted(by_layer)})')
    shapes = {i: tuple(getattr(x, 'shape', x)) for i, x in sorted(by_layer.items())}
    if len(set(shapes.values())) > 1:
      raise WeightsError(f'{path}: layers differ in shape {shapes}')
    single[path] = stack([by_layer[i] for i in range(n)])
  return single, unexpected


def convert(names: Iterable[str], get: Callable[[str], np.ndarray], rules: Sequence[Rule],
            ignore: Sequence[str] = ()) -> tuple[dict[str, np.ndarray], list[str]]:
  """Reference tensors -> ({our path: array}, unexpected reference names).

  Names matching a pattern in ``ignore`` are skipped (e.g. buffers). Layers are stacked in
  index order; a gap in the indices is an error naming the missing layers.
  """
  return _assemble(names, _matcher(rules, ignore), lambda n, lay: to_ours(get(n), lay),
                   np.stack)


def convert_shapes(shapes: Mapping[str, Sequence[int]], rules: Sequence[Rule],
                   ignore: Sequence[str] = ()) -> tuple[dict[str, tuple], list[str]]:
  """``convert`` on shapes only (no tensor read or allocated): for real-size checks."""
  def item(name, layout):
    shape = tuple(shapes[name])
    perm = PERMUTATIONS.get(layout)
    return shape if perm is None else tuple(shape[i] for i in perm)
  return _assemble(shapes, _matcher(rules, ignore), item,
                   lambda xs: (len(xs),) + tuple(xs[0]))


def flat_abstract(abstract_state: nnx.State) -> dict[str, Any]:
  """{'/'-joined path: abstract leaf} of an nnx.State (``nnx.eval_shape`` output)."""
  flat = nnx.to_flat_state(abstract_state)
  return {'/'.join(str(p) for p in path): leaf for path, leaf in flat}


def place(abstract_state: nnx.State, arrays: Mapping[str, np.ndarray], *, mesh=None,
          rules=(), dtype=jnp.float32, unexpected: Sequence[str] = ()) -> nnx.State:
  """Fills an abstract nnx.State with ``arrays``, each placed with its NamedSharding.

  Raises WeightsError listing every missing path, every array with no parameter
  (``unexpected`` reference names included) and every shape mismatch.
  """
  flat = nnx.to_flat_state(abstract_state)
  keys = ['/'.join(str(p) for p in path) for path, _ in flat]
  missing = [k for k in keys if k not in arrays]
  extra = sorted(set(arrays) - set(keys))
  wrong = [f'{k}: weights {arrays[k].shape}, model {tuple(leaf.shape)}'
           for k, (_, leaf) in zip(keys, flat) if k in arrays
           and tuple(arrays[k].shape) != tuple(leaf.shape)]
  if missing or extra or wrong or unexpected:
    parts = []
    if missing:
      parts.append(f'missing from the weights ({len(missing)}): {missing}')
    if unexpected:
      parts.append(f'unexpected reference tensors ({len(unexpected)}): {list(unexpected)}')
    if extra:
      parts.append(f'converted tensors with no parameter ({len(extra)}): {extra}')
    if wrong:
      parts.append(f'shape mismatches ({len(wrong)}): {wrong}')
    raise WeightsError('weights do not fit the model; ' + '; '.join(parts))
  shardings = None
  if mesh is not None:
    shardings = nnx.to_flat_state(parallel.state_shardings(abstract_state, mesh, rules))
  leaves = []
  for i, (k, (path, leaf)) in enumerate(zip(keys, flat)):
    x = arrays[k].astype(jnp.dtype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating)
                         else leaf.dtype)
    if shardings is not None:
      sh = shardings[i][1]
      sh = sh.get_value() if isinstance(sh, nnx.Variable) else sh
      arr = jax.make_array_from_callback(x.shape, sh, lambda idx, x=x: x[idx])
    else:
      arr = jnp.asarray(x)
    leaves.append((path, leaf.replace(arr) if hasattr(leaf, 'replace') else arr))
  return nnx.from_flat_state(leaves)


def load_state(abstract_state: nnx.State, reader, rules: Sequence[Rule], *, ignore=(),
               mesh=None, logical_rules=(), dtype=jnp.float32) -> nnx.State:
  """``convert`` + ``place``: a published folder's tensors into our (sharded) state."""
  arrays, unexpected = convert(reader.keys(), reader.__getitem__, rules, ignore)
  return place(abstract_state, arrays, mesh=mesh, rules=logical_rules, dtype=dtype,
               unexpected=unexpected)
