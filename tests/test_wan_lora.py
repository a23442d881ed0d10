"""LoRA on the Wan transformer: adapters only in the optimiser state, adapters-off reference,
merge, and an export that diffusers loads (load_lora_adapter) with the same output."""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from test_wan_transformer import _inputs, _reference_out, _tiny_reference  # noqa: E402

from euphonium_jax.models.wan import lora  # noqa: E402
from euphonium_jax.models.wan import transformer as wt  # noqa: E402

TARGETS = wt.LORA_TARGETS  # all six projections


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("wan_lora"))
  ref = _tiny_reference(path, seed=1)
  graphdef, state, cfg = wt.load_wan_transformer(path, lora_rank=4, lora_alpha=8.0,
                                                 lora_targets=TARGETS)
  graphdef, adapters, frozen = lora.split_trainable(graphdef, state)
  # Random adapters (B = 0 at init would make every check below trivial).
  keys = iter(jax.random.split(jax.random.key(3), 64))
  adapters = jax.tree.map(lambda a: 0.2 * jax.random.normal(next(keys), a.shape), adapters)
  return path, ref, graphdef, adapters, frozen


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, states, x, t, text):
  return nnx.merge(graphdef, *states)(x, t, {"tokens": text})


def _run(graphdef, *states):
  """One compiled forward per graphdef (and state structure), reused across the tests."""
  return np.asarray(_forward(graphdef, states, *_inputs()))


def test_fresh_adapters_leave_the_published_model(tmp_path):
  path = str(tmp_path)
  ref = _tiny_reference(path, seed=2)
  graphdef, state, _ = wt.load_wan_transformer(path, lora_rank=4, lora_targets=TARGETS)
  want = _reference_out(ref, *_inputs())
  np.testing.assert_allclose(_run(graphdef, state), want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_only_adapters_are_trainable(setup):
  _, _, graphdef, adapters, frozen = setup
  leaves = nnx.to_flat_state(adapters)
  assert leaves and all(isinstance(v, wt.LoRAParam) for _, v in leaves)
  n = sum(v[...].size for _, v in leaves)
  # 2 layers x (2 attentions x 4 projections of 32 -> 32, ffn 32 -> 64 and 64 -> 32), rank 4.
  assert n == 2 * (8 * 4 * (32 + 32) + 4 * (32 + 64) + 4 * (64 + 32))
  opt = optax.adamw(1e-3).init(nnx.to_pure_dict(adapters))
  assert sum(x.size for x in jax.tree.leaves(opt)) == 2 * n + 1  # mu, nu, count
  x, t, text = _inputs()
  loss = lambda a: jnp.mean(nnx.merge(graphdef, a, frozen)(x, t, {"tokens": text}) ** 2)
  g = jax.grad(loss)(adapters)
  assert float(jnp.abs(g["blocks"]["attn1"]["lora"]["to_q"]["a"][...]).max()) > 0


def test_reference_is_the_base_and_merge_is_exact(setup):
  path, ref, graphdef, adapters, frozen = setup
  base = _reference_out(ref, *_inputs())
  with_adapters = _run(graphdef, adapters, frozen)
  assert np.abs(with_adapters - base).max() > 1e-2 * np.abs(base).max()  # adapters matter
  off = _run(graphdef, adapters, lora.reference_state(frozen))
  np.testing.assert_allclose(off, base, rtol=0, atol=2e-5 * np.abs(base).max())
  merged = lora.merge(nnx.merge_state(adapters, frozen))
  np.testing.assert_allclose(_run(graphdef, merged), with_adapters, rtol=0,
                             atol=2e-5 * np.abs(with_adapters).max())


def test_export_loads_in_diffusers(setup, tmp_path):
  path, ref, graphdef, adapters, frozen = setup
  ours = _run(graphdef, adapters, frozen)
  tensors = lora.export(nnx.merge_state(adapters, frozen), str(tmp_path / "lora.safetensors"))
  assert "transformer.blocks.1.attn2.to_out.0.lora_B.weight" in tensors
  assert tensors["transformer.blocks.0.ffn.net.0.proj.lora_A.weight"].shape == (4, 32)
  ref.load_lora_adapter(str(tmp_path / "lora.safetensors"), prefix="transformer",
                        adapter_name="grpo")
  got = _reference_out(ref, *_inputs())
  ref.delete_adapters("grpo")
  np.testing.assert_allclose(got, ours, rtol=0, atol=2e-5 * np.abs(ours).max())
