"""The model-bundle protocol: both families implement every call, chosen by name in one
place; and no module of the package imports another in a cycle (imports inside functions
included)."""
import ast
import inspect
import os

import pytest

from euphonium_jax import bundles
from euphonium_jax import config as config_lib
from euphonium_jax.bundles import embedded as embedded_bundle
from euphonium_jax.bundles import wan as wan_bundle

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "euphonium_jax")


def protocol_methods():
  return {name: fn for name, fn in vars(bundles.ModelBundle).items()
          if callable(fn) and not name.startswith("_")}


@pytest.mark.parametrize("cls", [embedded_bundle.EmbeddedBundle, wan_bundle.WanBundle])
def test_bundle_implements_the_protocol(cls):
  methods = protocol_methods()
  assert set(methods) == {  # networks, prompts and the PRM
      "load_networks", "velocity_fn", "text_fn", "decode_fn", "latent_shape",
      "model_param_shardings", "reference_params", "save_final", "load_trained", "tokenize",
      "text_encoder", "init_prm", "abstract_prm", "prm_param_shardings", "load_prm",
      "save_prm", "prm_fn"}
  for name, proto in methods.items():
    impl = getattr(cls, name, None)
    assert callable(impl), f"{cls.__name__} lacks {name}"
    want = [p for p in inspect.signature(proto).parameters]
    got = [p for p in inspect.signature(impl).parameters]
    assert got == want, (cls.__name__, name, got, want)
  for attr in ("family", "null_prompt"):
    assert isinstance(getattr(cls, attr), str)


def test_bundle_chosen_by_family():
  c = config_lib.get_default_config()
  b = bundles.get(c)
  assert isinstance(b, embedded_bundle.EmbeddedBundle) and isinstance(b, bundles.ModelBundle)
  assert b.family == "embedded" and b.latent_shape() == (8, 8, 8, 4)
  c.model_family = "wan"
  assert isinstance(bundles.get(c), wan_bundle.WanBundle)
  c.model_family = "flux"
  with pytest.raises(ValueError, match="model_family = 'flux' is invalid"):
    bundles.get(c)


def _imports(path: str, module: str) -> set[str]:
  """Every euphonium_jax module `module` imports, at any depth of its code."""
  tree = ast.parse(open(path).read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("euphonium_jax")}
    elif isinstance(node, ast.ImportFrom) and node.module:
      base = node.module
      if node.level:  # relative
        base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
      if base.startswith("euphonium_jax"):
        for a in node.names:
          out.add(f"{base}.{a.name}")
  return out


def test_no_import_cycle():
  modules = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
        modules[rel.removesuffix(".__init__")] = path
  graph = {}
  for name, path in modules.items():
    deps = set()
    for imp in _imports(path, name):
      # `from pkg import mod` names a module; `from mod import fn` names the module itself.
      target = imp if imp in modules else imp.rsplit(".", 1)[0]
      if target in modules and target != name and not name.startswith(target + "."):
        deps.add(target)
    graph[name] = deps
  assert "euphonium_jax.bundles.wan" in graph["euphonium_jax.config"]  # imports are seen
  state, stack = {}, []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for d in sorted(graph[n]):
      if state.get(d) == 1:
        cycle = stack[stack.index(d):] + [d]
        raise AssertionError("import cycle: " + " -> ".join(cycle))
      if d not in state:
        visit(d)
    stack.pop()
    state[n] = 2

  for n in sorted(graph):
    if n not in state:
      visit(n)
