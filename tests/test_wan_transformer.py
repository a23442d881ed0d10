"""Wan transformer: parity with diffusers' WanTransformer3DModel (tiny random model saved with
save_pretrained, loaded by our loader), weight-table errors, and the real 1.3B shape check."""
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from euphonium_jax import parallel
from euphonium_jax.models.wan import loading
from euphonium_jax.models.wan import transformer as wt

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
            out_channels=16, text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
            rope_max_seq_len=32)


def _tiny_reference(path, seed=0):
  torch.manual_seed(seed)
  ref = diffusers.WanTransformer3DModel(**TINY).eval()
  with torch.no_grad():  # move every parameter off its init (norm scales of 1, zero biases)
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  ref.save_pretrained(path)
  return ref


def _inputs(seed=0, b=2, frames=3, hw=(4, 6), text_len=7):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, frames, *hw, 16)).astype(np.float32)
  t = np.array([0.73, 0.05], np.float32)[:b]
  text = rng.standard_normal((b, text_len, 32)).astype(np.float32)
  text[1, 4:] = 0.0  # padded positions are zeros, as the Wan pipeline makes them
  return x, t, text


def _reference_out(ref, x, t, text):
  with torch.no_grad():
    out = ref(torch.from_numpy(x).permute(0, 4, 1, 2, 3), timestep=torch.from_numpy(1000 * t),
              encoder_hidden_states=torch.from_numpy(text), return_dict=False)[0]
  return out.permute(0, 2, 3, 4, 1).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("wan_tiny"))
  return path, _tiny_reference(path)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_forward_matches_diffusers(tiny, remat):
  path, ref = tiny
  graphdef, state, cfg = wt.load_wan_transformer(path, remat=remat)
  assert cfg.num_layers == 2 and cfg.inner_dim == 32
  x, t, text = _inputs()
  want = _reference_out(ref, x, t, text)
  velocity = jax.jit(lambda s, x, t, tok: nnx.merge(graphdef, s)(x, t, {"tokens": tok}))
  got = np.asarray(velocity(state, x, t, text))
  assert got.shape == want.shape == x.shape
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err < 2e-5, err


def test_gradient_through_scanned_blocks(tiny):
  path, _ = tiny
  graphdef, state, _ = wt.load_wan_transformer(path, remat="full")
  x, t, text = _inputs()
  loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(x, t, {"tokens": text}) ** 2)
  g = jax.grad(loss)(state)
  norms = {k: float(jnp.linalg.norm(v)) for k, v in loading.flat_abstract(g).items()}
  assert norms["blocks/attn1/to_q/kernel"] > 0 and np.isfinite(list(norms.values())).all()


def test_weight_errors_name_every_key(tmp_path):
  from safetensors.numpy import load_file, save_file
  path = str(tmp_path)
  _tiny_reference(path)
  f = os.path.join(path, "diffusion_pytorch_model.safetensors")
  tensors = load_file(f)
  del tensors["blocks.1.ffn.net.2.bias"]
  tensors["blocks.0.attn1.extra.weight"] = np.zeros((2,), np.float32)
  tensors["proj_out.bias"] = np.zeros((5,), np.float32)
  save_file(tensors, f)
  with pytest.raises(loading.WeightsError) as e:
    wt.load_wan_transformer(path)
  msg = str(e.value)
  assert "blocks/ffn/proj_out/bias" in msg or "blocks.1.ffn.net.2.bias" in msg
  assert "blocks.0.attn1.extra.weight" in msg
  assert "proj_out/bias" in msg and "(5,)" in msg


def test_sharded_load_on_fsdp_mesh(tiny):
  path, ref = tiny
  mesh = parallel.make_mesh((1, 8), ("data", "fsdp"))
  rules = (("embed", "fsdp"), ("mlp", None), ("heads", None), ("layers", None))
  graphdef, state, _ = wt.load_wan_transformer(path, mesh=mesh, logical_rules=rules)
  k = state["blocks"]["attn1"]["to_q"]["kernel"]
  assert k[...].shape == (2, 32, 32)
  assert k[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert len(k[...].addressable_shards) == 8 and k[...].addressable_shards[0].data.shape == (2, 4, 32)
  x, t, text = _inputs()
  with jax.set_mesh(mesh):
    got = jax.jit(lambda s: nnx.merge(graphdef, s)(x, t, {"tokens": text}))(state)
  want = _reference_out(ref, x, t, text)
  assert np.abs(np.asarray(got) - want).max() / np.abs(want).max() < 2e-5


# Wan2.1-T2V-1.3B-Diffusers transformer/config.json.
WAN_1_3B = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128,
                in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)


def test_real_1_3b_shapes_match_reference():
  with torch.device("meta"):
    ref = diffusers.WanTransformer3DModel(**WAN_1_3B)
  ref_sd = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  ref_count = sum(p.numel() for p in ref.parameters())
  ours = nnx.state(wt.abstract(wt.WanConfig.from_reference(WAN_1_3B)), wt.BASE)
  flat = loading.flat_abstract(ours)
  count = sum(int(np.prod(v.shape)) for v in flat.values())
  assert count == ref_count == 1_418_996_800
  converted, unexpected = loading.convert_shapes(ref_sd, wt.WAN_RULES)
  assert not unexpected
  assert converted == {k: tuple(v.shape) for k, v in flat.items()}
