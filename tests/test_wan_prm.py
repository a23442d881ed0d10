"""Wan PRM: output shapes, gradient in x_t, init from the base transformer (trunk features equal
the base's first K blocks, in ours and in diffusers), LoRA split, loading, real-size shapes."""
import dataclasses
import os
import shutil
import sys

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from test_wan_transformer import WAN_1_3B, _tiny_reference  # noqa: E402

from euphonium_jax import parallel, training  # noqa: E402
from euphonium_jax.models.wan import loading  # noqa: E402
from euphonium_jax.models.wan import prm as wp  # noqa: E402
from euphonium_jax.models.wan import transformer as wt  # noqa: E402

K, Q, HEAD = 1, 2, 16  # the tiny base has 2 layers, inner_dim 32, text_dim 32


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 3, 4, 4, 16)).astype(np.float32)
  t = np.array([0.73, 0.05], np.float32)
  tokens = rng.standard_normal((2, 7, 32)).astype(np.float32)
  tokens[1, 4:] = 0.0  # padded positions are zeros, as the Wan pipeline makes them
  mask = np.arange(7)[None] < np.array([[7], [4]])
  return x, t, tokens, mask


def _flat(tree, prefix=()):
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, prefix + (key,)).items()}
  return {'/'.join(map(str, prefix)): tree}


MESH_RULES = (("embed", "fsdp"), ("mlp", None), ("heads", None), ("layers", None))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The tiny diffusers base (random, perturbed), loaded; a K=1 PRM loaded by load_prm_init
  on an FSDP mesh from a copy of its folder WITHOUT blocks >= K and the output layers (so
  they are never read), then gathered to one device for the checks."""
  from safetensors.numpy import load_file, save_file
  path = str(tmp_path_factory.mktemp("wan_prm"))
  ref = _tiny_reference(path, seed=4)
  base_gd, base_state, cfg = wt.load_wan_transformer(path)
  pruned = str(tmp_path_factory.mktemp("wan_prm_trunk"))
  shutil.copy(os.path.join(path, "config.json"), pruned)
  f = "diffusion_pytorch_model.safetensors"
  tensors = load_file(os.path.join(path, f))
  keep = {k: v for k, v in tensors.items() if not (
      k.startswith(("blocks.1.", "proj_out.")) or k == "scale_shift_table")}
  assert len(tensors) - len(keep) == 27 + 3
  save_file(keep, os.path.join(pruned, f))
  prm_cfg = wp.WanPRMConfig(cfg, depth=K, num_queries=Q, head_width=HEAD)
  mesh = parallel.make_mesh((1, 8), ("data", "fsdp"))
  gd, sharded = wp.load_prm_init(pruned, prm_cfg, mesh=mesh, logical_rules=MESH_RULES, seed=1)
  state = jax.device_put(sharded, jax.devices()[0])
  return dict(path=path, pruned=pruned, ref=ref, base_gd=base_gd, base_state=base_state,
              cfg=cfg, base=nnx.to_pure_dict(base_state), prm_cfg=prm_cfg, gd=gd,
              sharded=sharded, state=state, fn=jax.jit(wp.make_prm_fn(gd)))


def test_output_shape_with_and_without_mask(tiny):
  x, t, tokens, mask = _inputs()
  fn, state = tiny["fn"], tiny["state"]
  plain = fn(state, x, t, {"tokens": tokens})
  masked = fn(state, x, t, {"tokens": tokens, "mask": mask})
  assert plain.shape == masked.shape == (2,)
  assert plain.dtype == masked.dtype == jnp.float32
  # Row 0's mask is all ones: same text mean. Row 1 drops 3 padded (projected: non-zero) tokens.
  np.testing.assert_allclose(masked[0], plain[0], rtol=1e-6, atol=1e-6)
  assert abs(float(masked[1] - plain[1])) > 1e-4


def test_gradient_in_x_matches_finite_difference(tiny):
  x, t, tokens, mask = _inputs()
  text = {"tokens": tokens, "mask": mask}
  fn, state = tiny["fn"], tiny["state"]
  g = jax.jit(jax.grad(lambda x: fn(state, x, t, text).sum()))(x)
  v = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
  v /= np.linalg.norm(v)
  eps = 0.1  # |x| ~ 39; smaller steps lose digits to float32 rounding (1e-2: rel 2e-3)
  fd = float((fn(state, x + eps * v, t, text) - fn(state, x - eps * v, t, text)).sum()) / (2 * eps)
  ad = float(jnp.vdot(g, v))
  rel = abs(fd - ad) / abs(ad)
  assert abs(ad) > 1e-3 and rel < 1e-2, (ad, fd, rel)  # measured: ad 7.62e-3, rel 1.2e-4


def test_init_from_base_copies_the_trunk_and_matches_the_first_k_blocks(tiny):
  x, t, tokens, _ = _inputs()
  text = {"tokens": tokens}
  # init_from_base on pure dicts (a random PRM) == the trunk load_prm_init read (fixture).
  loaded = nnx.to_pure_dict(tiny["state"])
  rng = np.random.default_rng(2)
  fresh = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), loaded)
  prm = _flat(wp.init_from_base(fresh, tiny["base"]))
  base, fresh, loaded = _flat(tiny["base"]), _flat(fresh), _flat(loaded)
  trunk = [k for k in prm if k.split("/")[0] in wp.TRUNK_KEYS]
  assert len(trunk) == len([k for k in base if k.split("/")[0] in wp.TRUNK_KEYS]) == 39
  for k in trunk:  # 12 embedder leaves, 27 block leaves (the base's first K)
    want = base[k][:K] if k.startswith("blocks/") else base[k]
    assert prm[k].shape == want.shape and np.array_equal(prm[k], want), k
    assert np.array_equal(loaded[k], want), k
  for k in prm:
    if k.split("/")[0] in wp.HEAD_KEYS:
      assert np.array_equal(prm[k], fresh[k]), k

  # Trunk tokens after K blocks == the base's own modules run for K blocks (no scan).
  def both(prm_state, base_state):
    feats = nnx.merge(tiny["gd"], prm_state).features(x, t, text)
    model = nnx.merge(tiny["base_gd"], base_state)
    h, ctx, _, temb6, rope, _ = model.embed(x, t, text)
    bgd, bstate = nnx.split(model.blocks)
    for i in range(K):
      block = nnx.merge(bgd, jax.tree.map(lambda a: a[i], bstate))
      h = block(h, ctx, temb6, rope, model.lora_scale[...])
    return feats, h
  feats, h = jax.jit(both)(tiny["state"], tiny["base_state"])
  assert feats.shape == (2, 3 * 2 * 2, 32)
  np.testing.assert_allclose(feats, h, rtol=0, atol=1e-6 * float(jnp.abs(h).max()))

  # And diffusers' hidden states after its block K-1 (a forward hook).
  got = {}

  def hook(mod, args, out):
    got["h"] = out.detach().numpy().copy()

  handle = tiny["ref"].blocks[K - 1].register_forward_hook(hook)
  with torch.no_grad():
    tiny["ref"](torch.from_numpy(x).permute(0, 4, 1, 2, 3), timestep=torch.from_numpy(1000 * t),
                encoder_hidden_states=torch.from_numpy(tokens), return_dict=False)
  handle.remove()
  np.testing.assert_allclose(feats, got["h"], rtol=0, atol=2e-5 * np.abs(got["h"]).max())


def test_init_from_base_names_missing_and_misshaped_keys(tiny):
  fresh, base = nnx.to_pure_dict(tiny["state"]), tiny["base"]
  missing = jax.tree.map(lambda a: a, base)
  del missing["time_proj"]["kernel"]
  with pytest.raises(ValueError, match="'time_proj/kernel'"):
    wp.init_from_base(fresh, missing)
  bad = jax.tree.map(lambda a: a, base)
  bad["blocks"]["attn1"]["to_q"]["kernel"] = np.zeros((2, 32, 16), np.float32)
  with pytest.raises(ValueError, match=r"'blocks/attn1/to_q/kernel' has shape \(2, 32, 16\)"):
    wp.init_from_base(fresh, bad)
  with pytest.raises(ValueError, match="'text_embedder'"):
    wp.init_from_base(fresh, {k: v for k, v in base.items() if k != "text_embedder"})


def test_config_errors_name_the_key(tiny):
  with pytest.raises(ValueError, match=r"depth=3: .* base.num_layers=2"):
    wp.WanPRMConfig(tiny["cfg"], depth=3)
  with pytest.raises(ValueError, match="depth=0"):
    wp.WanPRMConfig(tiny["cfg"], depth=0)
  with pytest.raises(ValueError, match="num_queries=0"):
    wp.WanPRMConfig(tiny["cfg"], depth=K, num_queries=0)


def _head_count(d, q, hw):
  """queries + pool (4 projections with bias, q/k RMSNorm) + pool LayerNorm + MLP."""
  return q * d + 4 * (d * d + d) + 2 * d + 2 * d + (q + 2) * d * hw + hw + hw + 1


def test_lora_trainable_split_and_zero_b_adapters(tiny):
  x, t, tokens, mask = _inputs()
  text = {"tokens": tokens, "mask": mask}
  rank, targets = 2, ("to_q", "ffn.net.2")  # in both attentions and the FFN
  cfg = dataclasses.replace(tiny["cfg"], lora_rank=rank, lora_alpha=4.0, lora_targets=targets)
  # Fresh adapters (B = 0) from load_prm_init; the head as the no-LoRA PRM's, by key.
  gd, state = wp.load_prm_init(tiny["pruned"], wp.WanPRMConfig(
      cfg, depth=K, num_queries=Q, head_width=HEAD), seed=2)
  module = nnx.merge(gd, state)
  state = nnx.state(module)
  plain = nnx.to_pure_dict(tiny["state"])
  pure = wp.init_from_base(nnx.to_pure_dict(state), tiny["base"])  # keeps the adapters
  pure.update({k: plain[k] for k in wp.HEAD_KEYS})
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(module, state)
  gd, params, rest = nnx.split(module, wp.trainable_filter(True), ...)

  leaves = nnx.to_flat_state(params)
  for path, leaf in leaves:
    assert isinstance(leaf, wt.LoRAParam) or path[0] in wp.HEAD_KEYS, path
  lora_n = sum(v[...].size for p, v in leaves if isinstance(v, wt.LoRAParam))
  head_n = sum(v[...].size for p, v in leaves if not isinstance(v, wt.LoRAParam))
  assert lora_n == K * (2 * rank * (32 + 32) + rank * (64 + 32))
  assert head_n == _head_count(32, Q, HEAD)
  b = [v[...] for p, v in leaves if p[-1] == "b"]
  assert len(b) == 3 and all(not np.any(np.asarray(a)) for a in b)  # B = 0 at init
  frozen = nnx.split(module, wp.trainable_filter(False), ...)[1]
  assert not any(isinstance(v, wt.LoRAParam) for _, v in nnx.to_flat_state(frozen))

  fn = jax.jit(wp.make_prm_fn(gd))
  with_zero_b = fn((params, rest), x, t, text)
  np.testing.assert_allclose(with_zero_b, tiny["fn"](tiny["state"], x, t, text), rtol=0,
                             atol=1e-6)
  ones_b = jax.tree.map(lambda a: a, params)  # adapters matter once B != 0
  ones_b["blocks"]["attn1"]["lora"]["to_q"]["b"][...] = jnp.ones((K, rank, 32))
  assert float(jnp.abs(fn((ones_b, rest), x, t, text) - with_zero_b).max()) > 1e-4


def test_load_prm_init_places_and_checks_the_config(tiny):
  sharded = tiny["sharded"]
  q = sharded["blocks"]["attn1"]["to_q"]["kernel"][...]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (K, 4, 32)
  assert sharded["queries"][...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert sharded["head_fc1"]["kernel"][...].shape == ((Q + 2) * 32, HEAD)
  bad = wp.WanPRMConfig(dataclasses.replace(tiny["cfg"], ffn_dim=128), depth=K)
  with pytest.raises(ValueError, match=r"base.ffn_dim=128 \(folder: 64\)"):
    wp.load_prm_init(tiny["pruned"], bad)
  with pytest.raises(loading.WeightsError,  # block 1 is not in the pruned folder
                     match=r"blocks/attn1/to_q/kernel: layers \[1\]"):
    wp.load_prm_init(tiny["pruned"], wp.WanPRMConfig(tiny["cfg"], depth=2))


def test_real_1_3b_abstract_parameter_count():
  cfg = wt.WanConfig.from_reference(WAN_1_3B)
  prm_cfg = wp.WanPRMConfig(cfg, depth=4, num_queries=4, head_width=256)
  module = wp.abstract(prm_cfg)
  params = nnx.state(module, nnx.Param)
  leaves = [v for _, v in nnx.to_flat_state(params)]
  assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct) for v in leaves)  # nothing allocated
  count = sum(int(np.prod(v.shape)) for v in leaves)
  # Independently: diffusers' own module, on the meta device.
  with torch.device("meta"):
    ref = diffusers.WanTransformer3DModel(**WAN_1_3B)
  trunk = ("patch_embedding.", "condition_embedder.") + tuple(f"blocks.{i}." for i in range(4))
  ref_trunk = sum(p.numel() for n, p in ref.named_parameters() if n.startswith(trunk))
  assert count == ref_trunk + _head_count(1536, 4, 256)
  assert count == 223_252_481
  # Logical names shard it like the transformer.
  sh = training.param_shardings(module, parallel.make_mesh((1, 8), ("data", "fsdp")),
                                MESH_RULES)
  assert sh["blocks"]["ffn"]["proj_in"]["kernel"].spec == jax.sharding.PartitionSpec(
      None, "fsdp", None)
  assert sh["queries"].spec == jax.sharding.PartitionSpec(None, "fsdp")
