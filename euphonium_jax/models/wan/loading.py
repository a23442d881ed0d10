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
device. Missing, unexpected, mis-shaped (stacked layers included) and wrongly typed tensors
are one error naming every offending key, found from the safetensors headers before any
tensor is read; ``check_headers`` validates a folder that way (a truncated file is named).
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
  index = _index_file(folder)
  if index:
    shards = sorted(set(_weight_map(folder, index).values()))
    missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
    if missing:
      raise WeightsError(f'{folder}: {index} names shards that are missing: {missing}')
    return [os.path.join(folder, s) for s in shards]
  files = sorted(f for f in os.listdir(folder) if f.endswith('.safetensors'))
  if len(files) != 1:
    raise WeightsError(f'{folder}: expected one *.safetensors file or a *.safetensors.index.json'
                       f', found {files}')
  return [os.path.join(folder, files[0])]


def _index_file(folder: str) -> str | None:
  index = [f for f in os.listdir(folder) if f.endswith('.safetensors.index.json')]
  if len(index) > 1:
    raise WeightsError(f'{folder}: several index files {sorted(index)}; keep one')
  return index[0] if index else None


def _weight_map(folder: str, index: str) -> dict[str, str]:
  path = os.path.join(folder, index)
  try:
    with open(path) as f:
      weight_map = json.load(f)['weight_map']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise WeightsError(f'{path}: not a readable safetensors index with a "weight_map" ({e}); '
                       're-download it') from None
  if not isinstance(weight_map, dict):
    raise WeightsError(f'{path}: "weight_map" must map tensor names to shard files')
  return weight_map


def read_config(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{folder}: no config.json')
  with open(path) as f:
    return json.load(f)


# Bytes per element of each safetensors dtype; a floating parameter is read from FLOAT_DTYPES.
DTYPE_BYTES = {'BOOL': 1, 'U8': 1, 'I8': 1, 'F8_E5M2': 1, 'F8_E4M3': 1, 'I16': 2, 'U16': 2,
               'F16': 2, 'BF16': 2, 'I32': 4, 'U32': 4, 'F32': 4, 'I64': 8, 'U64': 8, 'F64': 8}
FLOAT_DTYPES = ('F32', 'BF16', 'F16', 'F64')
_MAX_HEADER = 100_000_000  # the safetensors library refuses longer headers


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor of a safetensors header: where it is, its dtype name and reference shape."""
  file: str
  dtype: str  # a safetensors dtype name, e.g. 'BF16'
  shape: tuple[int, ...]
  start: int  # absolute byte range of its data in the file
  end: int


def _file_header(path: str) -> tuple[dict[str, TensorInfo], list[str]]:
  """({name: TensorInfo}, problems) of one safetensors file, from its header alone.

  Checks what the format promises: an 8-byte little-endian header length, a JSON header, and
  tensors of known dtypes whose byte ranges match their shapes and cover the data exactly
  (a file cut short by an interrupted download fails the last check).
  """
  fix = 're-download it'
  try:
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
      head = f.read(8)
      n = int.from_bytes(head, 'little') if len(head) == 8 else None
      if n is None or n > size - 8 or n > _MAX_HEADER:
        what = (f'{size} bytes, shorter than the 8-byte header length' if n is None else
                f'a header length of {n} bytes, over the format\'s 100 MB' if n > _MAX_HEADER
                else f'{size} bytes, but its header alone needs {8 + n}')
        return {}, [f'{path}: truncated or not a safetensors file ({what}); {fix}']
      header = json.loads(f.read(n))
  except OSError as e:
    return {}, [f'{path}: cannot be read ({e.strerror or e}); check the file and its permissions']
  except ValueError as e:
    return {}, [f'{path}: the safetensors header is not valid JSON ({e}); {fix}']
  if not isinstance(header, dict):
    return {}, [f'{path}: the safetensors header is not a JSON object; {fix}']
  infos, problems, data_size, covered = {}, [], size - 8 - n, 0
  for name, meta in header.items():
    if name == '__metadata__':
      continue
    try:
      dtype, shape = meta['dtype'], tuple(int(s) for s in meta['shape'])
      start, end = (int(o) for o in meta['data_offsets'])
    except (KeyError, TypeError, ValueError):
      problems.append(f'{path}: tensor {name!r} has a malformed header entry {meta!r}; {fix}')
      continue
    if dtype not in DTYPE_BYTES:
      problems.append(f'{path}: tensor {name!r} has the unknown dtype {dtype!r} (known: '
                      f'{", ".join(DTYPE_BYTES)})')
      continue
    nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES[dtype]
    if any(s < 0 for s in shape) or not 0 <= start <= end or end - start != nbytes:
      problems.append(f'{path}: tensor {name!r}: data_offsets [{start}, {end}] do not hold '
                      f'{dtype} {list(shape)} ({nbytes} bytes); {fix}')
      continue
    covered = max(covered, end)
    infos[name] = TensorInfo(path, dtype, shape, 8 + n + start, 8 + n + end)
  if not problems and covered != data_size:
    how = 'truncated' if covered > data_size else 'longer than its header says'
    problems.append(f'{path}: {how}: the header places tensor data up to byte {8 + n + covered},'
                    f' the file has {size} bytes; {fix}')
  return infos, problems


def read_headers(files: Sequence[str]) -> dict[str, TensorInfo]:
  """{name: TensorInfo} of every tensor in `files`, reading headers only (no tensor data).

  Raises one WeightsError naming every truncated, unreadable or inconsistent file and every
  tensor name that two files both hold.
  """
  infos, problems = {}, []
  for path in files:
    got, bad = _file_header(path)
    problems += bad
    for name, info in got.items():
      if name in infos:
        problems.append(f'tensor {name!r} is in both {infos[name].file} and {path}; '
                        'a tensor must be in one shard')
      infos[name] = info
  if problems:
    raise WeightsError(f'{len(problems)} problem(s) in the safetensors files: '
                       + '; '.join(problems))
  return infos


def check_headers(folder: str) -> dict[str, TensorInfo]:
  """Validates a weights folder from its safetensors headers alone (seconds, no tensor data):
  every file readable and exactly as long as its header says, every tensor of a sharded
  index in the shard the index names. Returns {name: TensorInfo}; raises one WeightsError
  (or FileNotFoundError for a missing folder) naming every problem."""
  files = safetensors_files(folder)
  infos = read_headers(files)
  index = _index_file(folder)
  if index:
    wrong = [f'{name} (index: {shard}, found: '
             f'{os.path.basename(infos[name].file) if name in infos else "in no shard"})'
             for name, shard in sorted(_weight_map(folder, index).items())
             if name not in infos or os.path.basename(infos[name].file) != shard]
    if wrong:
      raise WeightsError(f'{os.path.join(folder, index)} does not match the shards\' headers for '
                         f'{len(wrong)} tensor(s): {wrong}; re-download the folder')
  return infos


class TensorReader:
  """Lazy name -> float32 numpy reader over one or more safetensors files.

  Every header is checked first (``read_headers``: a truncated file is named before anything
  is read). The safetensors library reads every dtype numpy has; bfloat16 (the dtype of many
  published checkpoints) is read from the file's header offsets as ml_dtypes.bfloat16.
  """

  def __init__(self, files: Sequence[str]):
    self._infos = read_headers(files)
    self._open: dict[str, Any] = {}
    self.folder = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files]
                                     ) if files else ''

  def keys(self) -> list[str]:
    return list(self._infos)

  def infos(self) -> dict[str, TensorInfo]:
    """{name: TensorInfo}: dtypes and shapes from the headers, nothing read."""
    return dict(self._infos)

  def __getitem__(self, name: str) -> np.ndarray:
    info = self._infos[name]
    if info.dtype not in FLOAT_DTYPES:
      raise WeightsError(f'{name} in {info.file}: dtype {info.dtype}, a floating parameter '
                         f'needs one of {", ".join(FLOAT_DTYPES)}')
    if info.dtype != 'F64':
      return np.asarray(self._raw(info), np.float32)
    from safetensors import safe_open  # a dependency of transformers and diffusers
    if info.file not in self._open:
      self._open[info.file] = safe_open(info.file, framework='numpy')
    return np.asarray(self._open[info.file].get_tensor(name), np.float32)

  @staticmethod
  def _raw(info: TensorInfo) -> np.ndarray:
    import ml_dtypes  # a dependency of jax
    dtypes = {'BF16': ml_dtypes.bfloat16, 'F16': np.float16, 'F32': np.float32}
    raw = np.memmap(info.file, dtype=np.uint8, mode='r', offset=info.start,
                    shape=(info.end - info.start,))
    return raw.view(dtypes[info.dtype]).reshape(info.shape)


def open_folder(folder: str) -> TensorReader:
  return TensorReader(safetensors_files(folder))


# -------------------------------------------------------------------------- Conversion


@dataclasses.dataclass
class _Faults:
  """Everything wrong between a set of tensors and a model, for one WeightsError."""
  missing: list = dataclasses.field(default_factory=list)  # our paths (or layers of one)
  unexpected: list = dataclasses.field(default_factory=list)  # reference names, no rule
  extra: list = dataclasses.field(default_factory=list)  # converted paths, no parameter
  shape: list = dataclasses.field(default_factory=list)
  dtype: list = dataclasses.field(default_factory=list)
  bad_paths: set = dataclasses.field(default_factory=set)  # already reported paths

  def __bool__(self) -> bool:
    return bool(self.missing or self.unexpected or self.extra or self.shape or self.dtype)

  def error(self, where: str = '') -> WeightsError:
    parts = []
    for title, items in (('missing from the weights', self.missing),
                         ('unexpected reference tensors', self.unexpected),
                         ('converted tensors with no parameter', self.extra),
                         ('shape mismatches', self.shape), ('wrong dtypes', self.dtype)):
      if items:
        parts.append(f'{title} ({len(items)}): {list(items)}')
    where = f'weights in {where}' if where else 'weights'
    return WeightsError(f'{where} do not fit the model; ' + '; '.join(parts))


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


def _assemble(names, match, item, stack, model: Mapping[str, tuple] | None = None
              ) -> tuple[dict[str, Any], _Faults]:
  """Shared by ``convert``, ``convert_shapes`` and ``load_state``: single and layer-stacked
  entries, and every fault found on the way (unreadable or wrongly typed tensors, layers
  missing from a stack, layers of another shape). ``model`` ({our path: shape}), when known,
  gives each stack's layer count and layer shape; else the largest index and the majority."""
  single, stacked, faults = {}, {}, _Faults()
  for name in names:
    m = match(name)
    if m is None:
      faults.unexpected.append(name)
      continue
    if m == 'ignore':
      continue
    path, layout, layer = m
    try:
      x = item(name, layout)
    except WeightsError as e:
      faults.dtype.append(str(e))
      faults.bad_paths.add(path)
      continue
    if layer is None:
      single[path] = x
    else:
      stacked.setdefault(path, {})[layer] = (name, x)
  model = model or {}
  for path, by_layer in stacked.items():
    want = tuple(model[path]) if len(model.get(path, ())) >= 1 else None
    n = max(max(by_layer) + 1, want[0] if want else 0)
    gaps = [i for i in range(n) if i not in by_layer]
    if gaps:
      faults.missing.append(f'{path}: layers {gaps} (the weights have {sorted(by_layer)})')
      faults.bad_paths.add(path)
    differ = _odd_layers(by_layer, want[1:] if want else None)
    if differ:
      faults.shape.append(f'{path}: layers differ in shape: {differ}')
      faults.bad_paths.add(path)
    if path not in faults.bad_paths:
      single[path] = stack([by_layer[i][1] for i in range(n)])
  return single, faults


def _odd_layers(by_layer: Mapping[int, tuple[str, Any]], want: tuple | None) -> str:
  """'' if the layers of a stack agree (with `want`, the model's layer shape, when some do);
  else the layers that differ, each with its reference name and shape (our layout)."""
  shapes = {i: tuple(getattr(x, 'shape', x)) for i, (_, x) in sorted(by_layer.items())}
  values = list(shapes.values())
  if len(set(values)) == 1:
    return ''  # all alike: a wrong shape for all of them is the stack's mismatch (``_fit``)
  if want is not None and want in values:
    common, other = want, "the model's layers are"
  else:
    common = max(values, key=values.count)
    other = 'the other layers are'
    if values.count(common) * 2 <= len(values):  # no majority: name every layer
      return ', '.join(f'{by_layer[i][0]} {v}' for i, v in shapes.items())
  odd = ', '.join(f'{by_layer[i][0]} {v}' for i, v in shapes.items() if v != common)
  return f'{odd}; {other} {common}'


def _raise_stack_faults(faults: _Faults) -> None:
  stack_faults = _Faults(missing=faults.missing, shape=faults.shape, dtype=faults.dtype)
  if stack_faults:
    if faults.unexpected:  # often the cause: a renamed tensor leaves a gap
      stack_faults.unexpected = faults.unexpected
    raise stack_faults.error()


def convert(names: Iterable[str], get: Callable[[str], np.ndarray], rules: Sequence[Rule],
            ignore: Sequence[str] = ()) -> tuple[dict[str, np.ndarray], list[str]]:
  """Reference tensors -> ({our path: array}, unexpected reference names).

  Names matching a pattern in ``ignore`` are skipped (e.g. buffers). Layers are stacked in
  index order; gaps in the indices and layers of different shapes are one WeightsError
  naming every such path.
  """
  arrays, faults = _assemble(names, _matcher(rules, ignore),
                             lambda n, lay: to_ours(get(n), lay), np.stack)
  _raise_stack_faults(faults)
  return arrays, faults.unexpected


def _shape_item(shapes: Mapping[str, Sequence[int]]):
  def item(name, layout):
    shape = tuple(shapes[name])
    perm = PERMUTATIONS.get(layout)
    return shape if perm is None or len(shape) != len(perm) else tuple(shape[i] for i in perm)
  return item


def _stack_shapes(xs):
  return (len(xs),) + tuple(xs[0])


def convert_shapes(shapes: Mapping[str, Sequence[int]], rules: Sequence[Rule],
                   ignore: Sequence[str] = ()) -> tuple[dict[str, tuple], list[str]]:
  """``convert`` on shapes only (no tensor read or allocated): for real-size checks."""
  converted, faults = _assemble(shapes, _matcher(rules, ignore), _shape_item(shapes),
                                _stack_shapes)
  _raise_stack_faults(faults)
  return converted, faults.unexpected


def flat_abstract(abstract_state: nnx.State) -> dict[str, Any]:
  """{'/'-joined path: abstract leaf} of an nnx.State (``nnx.eval_shape`` output)."""
  flat = nnx.to_flat_state(abstract_state)
  return {'/'.join(str(p) for p in path): leaf for path, leaf in flat}


def _fit(flat, arrays_shapes: Mapping[str, tuple], faults: _Faults) -> _Faults:
  """Adds to `faults` every parameter of `flat` (nnx flat state) with no tensor, every
  converted tensor with no parameter, and every shape mismatch."""
  keys = ['/'.join(str(p) for p in path) for path, _ in flat]
  faults.missing += [k for k in keys if k not in arrays_shapes and k not in faults.bad_paths]
  faults.extra += sorted(set(arrays_shapes) - set(keys))
  faults.shape += [f'{k}: weights {tuple(arrays_shapes[k])}, model {tuple(leaf.shape)}'
                   for k, (_, leaf) in zip(keys, flat) if k in arrays_shapes
                   and tuple(arrays_shapes[k]) != tuple(leaf.shape)]
  return faults


def check_state(abstract_state: nnx.State, infos: Mapping[str, TensorInfo],
                rules: Sequence[Rule], *, ignore: Sequence[str] = (), where: str = '') -> None:
  """Raises one WeightsError naming every missing, unexpected, mis-shaped (stacked layers
  included) or wrongly typed tensor, from header information alone (``read_headers``)."""
  flat = nnx.to_flat_state(abstract_state)
  floating = {'/'.join(str(p) for p in path): jnp.issubdtype(leaf.dtype, jnp.floating)
              for path, leaf in flat}
  match = _matcher(rules, ignore)

  def item(name, layout):
    m, info = match(name), infos[name]
    is_float = info.dtype in FLOAT_DTYPES
    if floating.get(m[0], is_float) != is_float:
      need = ', '.join(FLOAT_DTYPES) if not is_float else 'an integer dtype'
      raise WeightsError(f'{name} in {os.path.basename(info.file)}: dtype {info.dtype}, '
                         f'{m[0]} needs {need}')
    return _shape_item({name: info.shape})(name, layout)

  model = {k: tuple(leaf.shape) for k, leaf in flat_abstract(abstract_state).items()}
  shapes, faults = _assemble(infos, match, item, _stack_shapes, model)
  if _fit(flat, shapes, faults):
    raise faults.error(where)


def place(abstract_state: nnx.State, arrays: Mapping[str, np.ndarray], *, mesh=None,
          rules=(), dtype=jnp.float32, unexpected: Sequence[str] = (),
          faults: _Faults | None = None, where: str = '') -> nnx.State:
  """Fills an abstract nnx.State with ``arrays``, each placed with its NamedSharding.

  Raises WeightsError listing every missing path, every array with no parameter
  (``unexpected`` reference names included) and every shape mismatch, with the faults
  ``convert`` found on the way (``load_state`` passes them).
  """
  flat = nnx.to_flat_state(abstract_state)
  keys = ['/'.join(str(p) for p in path) for path, _ in flat]
  faults = faults if faults is not None else _Faults()
  faults.unexpected = list(faults.unexpected) + [u for u in unexpected
                                                 if u not in faults.unexpected]
  if _fit(flat, {k: tuple(a.shape) for k, a in arrays.items()}, faults):
    raise faults.error(where)
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
  """``convert`` + ``place``: a published folder's tensors into our (sharded) state.

  A reader with header information (``TensorReader.infos``) is checked against the model
  before any tensor is read; either way every fault is named in one WeightsError.
  """
  where = getattr(reader, 'folder', '')
  if hasattr(reader, 'infos'):
    check_state(abstract_state, reader.infos(), rules, ignore=ignore, where=where)
  model = {k: tuple(leaf.shape) for k, leaf in flat_abstract(abstract_state).items()}
  arrays, faults = _assemble(reader.keys(), _matcher(rules, ignore),
                             lambda n, lay: to_ours(reader[n], lay), np.stack, model)
  return place(abstract_state, arrays, mesh=mesh, rules=logical_rules, dtype=dtype,
               faults=faults, where=where)
