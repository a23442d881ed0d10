"""Wan2.1 VAE port against diffusers' AutoencoderKLWan: numerics, weight table, errors, sizes.

A tiny reference (base_dim 4) with every parameter perturbed is saved with
``save_pretrained`` and loaded with ``load_wan_vae``; encode and decode are compared on the
same batch of videos (channels-last here, channels-first there).
"""
import os
import re
import shutil

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from flax import nnx
from safetensors.torch import save_file

from euphonium_jax import parallel
from euphonium_jax.models.wan import loading
from euphonium_jax.models.wan import vae as wan_vae

TINY = dict(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
            temperal_downsample=[False, True, True])
# float32 on both sides; the difference is summation order only (convs, norms, softmax),
# ~1e-7 relative per op over ~40 layers; measured 1e-6 (encode) and 1e-5 (decode) of the
# output scale. Wrong cache / padding semantics give errors of order 1 (checked by mutation).
RTOL = 1e-4


def to_ref(x):
  """[B,T,H,W,C] numpy -> [B,C,T,H,W] torch."""
  return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 4, 1, 2, 3)


def to_ours(x):
  return x.permute(0, 2, 3, 4, 1).numpy()


def rel_err(ours, ref):
  err = float(np.abs(np.asarray(ours) - ref).max())
  return err, err / float(np.abs(ref).max())


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  torch.manual_seed(0)
  ref = AutoencoderKLWan(**TINY).float().eval()
  with torch.no_grad():  # move gammas (ones) and biases (zeros) away from their init
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  folder = str(tmp_path_factory.mktemp('wan_vae'))
  ref.save_pretrained(folder)
  graphdef, state, config = wan_vae.load_wan_vae(folder)
  return dict(ref=ref, folder=folder, graphdef=graphdef, state=state, config=config,
              encode=jax.jit(wan_vae.make_encode_mean_fn(graphdef)),
              decode=jax.jit(wan_vae.make_decode_fn(graphdef)))


def test_encode_matches_reference(tiny):
  x = np.random.RandomState(0).uniform(-1, 1, (2, 9, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    want = to_ours(tiny['ref'].encode(to_ref(x)).latent_dist.mean)
  got = tiny['encode'](tiny['state'], x)
  assert got.shape == want.shape == (2, 3, 2, 2, 16)
  err, rel = rel_err(got, want)
  print(f'encode: max abs err {err:.3g}, relative {rel:.3g}')
  assert rel < RTOL


def test_decode_matches_reference(tiny):
  z = np.random.RandomState(1).randn(2, 3, 2, 2, 16).astype(np.float32)
  with torch.no_grad():
    want = to_ours(tiny['ref'].decode(to_ref(z)).sample)
  got = tiny['decode'](tiny['state'], z)
  assert got.shape == want.shape == (2, 9, 16, 16, 3)
  assert float(np.abs(want).max()) == 1.0 and 0.5 < float(np.mean(np.abs(want) < 1.0))
  err, rel = rel_err(got, want)
  print(f'decode: max abs err {err:.3g}, relative {rel:.3g}')
  assert rel < RTOL
  # A batch is one call, and the first video alone gives the same frames.
  alone = tiny['decode'](tiny['state'], z[:1].repeat(2, 0))
  np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(got[0]), atol=1e-5)


@pytest.mark.parametrize('kt,st,cin,cout,khw,pad', [
    (3, 1, 4, 6, 3, 1),      # taps folded on channels (3 * 4 <= FOLD_MAX_CHANNELS)
    (3, 1, 48, 8, 3, 1),     # taps summed (3 * 48 > FOLD_MAX_CHANNELS)
    (3, 2, 8, 8, 1, 0),      # downsample3d's stride-2 time conv
    (3, 2, 64, 16, 1, 0),    # ... summed
    (1, 1, 8, 5, 1, 0),      # 1x1x1 shortcut
])
def test_conv3d_taps_equal_lax(kt, st, cin, cout, khw, pad):
  """'taps' (the CPU path) is the same 3D convolution as one conv_general_dilated."""
  rng = np.random.default_rng(kt * 100 + cin)
  x = jax.numpy.asarray(rng.standard_normal((2, 7, 6, 5, cin)).astype(np.float32))
  w = jax.numpy.asarray(rng.standard_normal((kt, khw, khw, cin, cout)).astype(np.float32))
  args = ((st, 1, 1), ((pad, pad), (pad, pad)))
  ref = wan_vae.conv3d(x, w, *args, impl='lax')
  got = wan_vae.conv3d(x, w, *args, impl='taps')
  assert got.shape == ref.shape == (2, (7 - kt) // st + 1, 6, 5, cout)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-4)
  # a wrong tap order (time-reversed kernel) is caught at this tolerance
  wrong = wan_vae.conv3d(x, w[::-1], *args, impl='taps')
  if kt > 1:
    assert float(np.abs(np.asarray(wrong) - np.asarray(ref)).max()) > 1e-2
  with pytest.raises(ValueError, match='allowed: auto, lax, taps'):
    wan_vae.conv3d(x, w, *args, impl='cudnn')


def test_latent_normalisation_is_the_pipelines():
  c = wan_vae.WanVAEConfig(base_dim=4)
  model = wan_vae.abstract(c)
  z = np.random.RandomState(2).randn(1, 2, 2, 2, 16).astype(np.float32)
  mean, std = np.asarray(c.latents_mean, np.float32), np.asarray(c.latents_std, np.float32)
  np.testing.assert_allclose(model.normalize_latents(z), (z - mean) / std, rtol=1e-6)
  np.testing.assert_allclose(model.denormalize_latents(z), z * std + mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(model.denormalize_latents(model.normalize_latents(z)), z,
                             atol=1e-5)


def test_frames_must_be_one_plus_four_k(tiny):
  x = np.zeros((1, 8, 16, 16, 3), np.float32)
  with pytest.raises(ValueError, match=re.escape('video has 8 frames: the Wan VAE encodes 1 + 4k')):
    tiny['encode'](tiny['state'], x)


@pytest.mark.parametrize('key,value', [('is_residual', True), ('patch_size', 2)])
def test_wan22_configs_are_refused(key, value):
  with pytest.raises(ValueError, match=f'^{key}='):
    wan_vae.WanVAEConfig.from_reference({**TINY, key: value})


def test_weights_errors_name_every_key(tiny, tmp_path):
  sd = {k: v.detach().clone() for k, v in tiny['ref'].state_dict().items()}
  del sd['decoder.conv_out.bias']
  sd['encoder.extra.weight'] = torch.zeros(3)
  sd['decoder.conv_in.weight'] = torch.zeros(8, 16, 3, 3, 3)
  sd['decoder.conv_out.weight'] = torch.zeros(3, 4, 3, 3)  # wrong rank too
  save_file(sd, os.path.join(tmp_path, 'diffusion_pytorch_model.safetensors'))
  shutil.copy(os.path.join(tiny['folder'], 'config.json'), tmp_path)
  with pytest.raises(loading.WeightsError) as e:
    wan_vae.load_wan_vae(str(tmp_path))
  msg = str(e.value)
  assert 'missing from the weights (1)' in msg and "'decoder/conv_out/bias'" in msg
  assert "unexpected reference tensors (1): ['encoder.extra.weight']" in msg
  assert 'decoder/conv_in/kernel: weights (3, 3, 3, 16, 8), model (3, 3, 3, 16, 16)' in msg
  assert 'decoder/conv_out/kernel: weights (3, 4, 3, 3), model (3, 3, 3, 4, 3)' in msg


def test_sharded_load_places_parameters(tiny):
  mesh = parallel.make_mesh((2, 4), ('data', 'fsdp'))
  _, state, _ = wan_vae.load_wan_vae(
      tiny['folder'], mesh=mesh, logical_rules=(('conv_in', None), ('conv_out', 'fsdp')))
  flat = {'/'.join(map(str, k)): v[...] for k, v in nnx.to_flat_state(state)}
  plain = {'/'.join(map(str, k)): v[...] for k, v in nnx.to_flat_state(tiny['state'])}
  assert flat['decoder/conv_in/kernel'].sharding.spec == jax.P(None, None, None, None, 'fsdp')
  assert flat['decoder/conv_out/bias'].sharding.spec == jax.P(None)  # 3 does not divide
  for k in plain:
    np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(plain[k]))


def test_real_config_names_and_count_match_reference():
  with torch.device('meta'):
    ref = AutoencoderKLWan()
  sd = ref.state_dict()
  assert list(ref.buffers()) == [] and set(sd) == {k for k, _ in ref.named_parameters()}
  ref_count = sum(p.numel() for p in ref.parameters())
  converted, unexpected = loading.convert_shapes(
      {k: tuple(v.shape) for k, v in sd.items()}, wan_vae.VAE_RULES)
  abstract = nnx.state(wan_vae.abstract(wan_vae.WanVAEConfig.from_reference(dict(ref.config))))
  ours = {k: tuple(v.shape) for k, v in loading.flat_abstract(abstract).items()}
  assert unexpected == []
  assert len(converted) == len(sd) == len(ours) == 194
  assert converted == ours
  assert sum(int(np.prod(s)) for s in ours.values()) == ref_count == 126_892_531
