"""Tests of the embedded-world networks: shapes, logical specs, conditioning, pure adapters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from euphonium_jax import models as M

WORDS = 'a moving red green blue yellow circle square triangle left right up down'.split()
PROMPTS = ['a red circle moving left', 'a blue square moving up', 'a green triangle']


def small_cfg(**model):
  cfg = M.default_model_configs()
  cfg.model.update(dict(width=32, depth=2, heads=2), **model)
  return cfg


@pytest.fixture(scope='module')
def text():
  cfg = M.default_model_configs()
  tok = M.build_tokenizer(WORDS)
  enc = M.make_text_encoder(cfg.text, nnx.Rngs(1), vocab_size=len(tok))
  ids, mask = M.tokenize(tok, PROMPTS[:2])
  return enc(jnp.asarray(ids), jnp.asarray(mask))


def perturb(state, key, scale=0.05):
  """Adds noise to every leaf, so that zero-initialised (adaLN-zero) layers come alive."""
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      treedef, [l + scale * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def test_tokenizer_round_trip():
  tok = M.build_tokenizer(WORDS, max_length=8)
  ids, mask = M.tokenize(tok, PROMPTS + ['a purple circle'])
  assert ids.shape == mask.shape == (4, 8) and ids.dtype == np.int32
  assert mask.sum(1).tolist() == [6, 6, 4, 4]  # [CLS] + words
  assert (ids[~mask] == 0).all() and (ids[:, 0] == tok.cls_token_id).all()
  words = tok.convert_ids_to_tokens(ids[0][mask[0]].tolist())
  assert words == ['[CLS]'] + PROMPTS[0].split()
  assert tok.convert_ids_to_tokens(int(ids[3, 2])) == '[UNK]'
  assert tok.decode(ids[1], skip_special_tokens=True) == PROMPTS[1]


def test_text_encoder_ignores_padding():
  cfg = M.default_model_configs()
  tok = M.build_tokenizer(WORDS)
  enc = M.make_text_encoder(cfg.text, nnx.Rngs(0), vocab_size=len(tok))
  ids, mask = M.tokenize(tok, PROMPTS)
  out = enc(jnp.asarray(ids), jnp.asarray(mask))
  assert out['tokens'].shape == (3, 8, 64) and out['pooled'].shape == (3, 64)
  ids2 = np.where(mask, ids, 7)  # garbage in the padded slots
  out2 = enc(jnp.asarray(ids2), jnp.asarray(mask))
  np.testing.assert_allclose(out2['pooled'], out['pooled'], atol=1e-5)
  np.testing.assert_allclose(out2['tokens'], out['tokens'], atol=1e-5)
  assert float(jnp.abs(out['tokens'][~mask]).max()) == 0.0
  with pytest.raises(ValueError, match='text.vocab_size'):
    M.make_text_encoder(cfg.text, nnx.Rngs(0), vocab_size=100)


@pytest.mark.parametrize('which', ['vae', 'vae_temporal', 'dit', 'dit_learned', 'text'])
def test_every_param_has_logical_spec(which):
  cfg = small_cfg(pos_embed='learned' if which == 'dit_learned' else 'sincos')
  cfg.vae.temporal_downsample = which == 'vae_temporal'
  factory = {'vae': M.make_vae, 'vae_temporal': M.make_vae, 'dit': M.make_dit,
             'dit_learned': M.make_dit, 'text': M.make_text_encoder}[which]
  section = cfg[which.split('_')[0].replace('dit', 'model')]
  model = nnx.eval_shape(lambda: factory(section, nnx.Rngs(0)))  # shapes only, no FLOPs
  params = nnx.state(model, nnx.Param)
  specs = nnx.get_partition_spec(params)
  allowed = {None, 'embed', 'mlp', 'heads', 'kv', 'vocab', 'conv_in', 'conv_out'}
  leaves = jax.tree.leaves(params)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.P))
  assert len(leaves) == len(spec_leaves) > 5
  for value, spec in zip(leaves, spec_leaves):
    assert isinstance(spec, jax.P) and len(spec) == value.ndim, (spec, value.shape)
    assert set(spec) <= allowed, spec


def test_default_sizes_and_validation():
  cfg = M.default_model_configs()
  M.validate_model_configs(cfg)
  dit = M.make_dit(cfg.model, nnx.Rngs(0))
  n = sum(p.size for p in jax.tree.leaves(nnx.state(dit, nnx.Param)))
  assert 1.2e6 < n < 1.6e6, n
  bad = M.default_model_configs()
  bad.model.patch_size = (1, 3, 2)
  with pytest.raises(ValueError, match=r'model.patch_size\[1\]'):
    M.validate_model_configs(bad)
  bad = M.default_model_configs()
  bad.vae.latent_channels = 8
  with pytest.raises(ValueError, match='model.in_channels'):
    M.validate_model_configs(bad)
  bad = M.default_model_configs()
  bad.model.remat = 'some'
  with pytest.raises(ValueError, match='remat'):
    M.validate_model_configs(bad)


def test_dit_zero_at_init_then_conditioned(text):
  cfg = small_cfg()
  graphdef, state = nnx.split(M.make_dit(cfg.model, nnx.Rngs(0)))
  velocity = jax.jit(M.make_velocity_fn(graphdef))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8, 4))
  t = jnp.array([0.3, 0.9])
  v = velocity(state, x, t, text)
  assert v.shape == x.shape and v.dtype == jnp.float32
  assert float(jnp.abs(v).max()) == 0.0  # adaLN-zero + zero final layer
  state = perturb(state, jax.random.key(1))
  v = velocity(state, x, t, text)
  assert float(jnp.abs(v).max()) > 0
  for changed in (velocity(state, 2 * x, t, text), velocity(state, x, 1 - t, text),
                  velocity(state, x, t, jax.tree.map(lambda a: a[::-1], text))):
    assert float(jnp.abs(changed - v).max()) > 1e-4
  # A missing pooled vector (e.g. Wan's encoder) is accepted.
  v_np = velocity(state, x, t, dict(text, pooled=None))
  assert v_np.shape == x.shape and bool(jnp.isfinite(v_np).all())


def test_velocity_pure_fn_matches_module_and_grad(text):
  cfg = small_cfg()
  model = M.make_dit(cfg.model, nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  state = perturb(state, jax.random.key(1))
  nnx.update(model, state)
  velocity = M.make_velocity_fn(graphdef)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8, 4))
  t = jnp.array([0.2, 0.7])
  module_out = nnx.jit(lambda m, x, t, c: m(x, t, c))(model, x, t, text)
  np.testing.assert_allclose(jax.jit(velocity)(state, x, t, text), module_out, atol=1e-5)
  grad = jax.grad(lambda x: jnp.sum(velocity(state, x, t, text) ** 2))(x)
  assert grad.shape == x.shape and bool(jnp.isfinite(grad).all())
  assert float(jnp.abs(grad).max()) > 0


@pytest.mark.parametrize('option', [dict(dtype='bfloat16'), dict(remat='full'),
                                    dict(pos_embed='learned')])
def test_dit_options_match_f32(option, text):
  """bf16 is close to f32; remat is exact (values and grads); learned pos embeds run."""
  cfg = small_cfg()
  graphdef, state = nnx.split(M.make_dit(cfg.model, nnx.Rngs(0)))
  cfg_opt = small_cfg(**option)
  graphdef_opt, state_opt = nnx.split(M.make_dit(cfg_opt.model, nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8, 4))
  t = jnp.array([0.4, 0.8])
  if 'pos_embed' in option:
    v = M.make_velocity_fn(graphdef_opt)(perturb(state_opt, jax.random.key(1)), x, t, text)
    assert v.shape == x.shape and float(jnp.abs(v).max()) > 0
    return
  state = perturb(state, jax.random.key(1))

  def loss(fn, s):
    return jnp.mean(fn(s, x, t, text) ** 2)
  ref, ref_g = jax.value_and_grad(loss, 1)(M.make_velocity_fn(graphdef), state)
  out, out_g = jax.value_and_grad(loss, 1)(M.make_velocity_fn(graphdef_opt), state)
  tol = 0.05 if 'dtype' in option else 1e-5
  np.testing.assert_allclose(out, ref, rtol=tol)
  g, g_ref = (jnp.concatenate([a.ravel() for a in jax.tree.leaves(s)])
              for s in (out_g, ref_g))
  assert float(jnp.linalg.norm(g - g_ref) / jnp.linalg.norm(g_ref)) < tol * 2


@pytest.mark.parametrize('temporal', [False, True])
def test_vae_round_trip_shapes_and_stats(temporal):
  cfg = M.default_model_configs()
  cfg.vae.temporal_downsample = temporal
  vae = M.make_vae(cfg.vae, nnx.Rngs(0))
  frames = jax.random.uniform(jax.random.key(0), (2, 8, 32, 32, 3))
  mean, logvar = nnx.jit(lambda m, f: m.encode(f))(vae, frames)
  shape = (2, 4 if temporal else 8, 8, 8, 4)
  assert mean.shape == logvar.shape == shape == vae.latent_shape(frames.shape)
  vae.set_latent_stats(mean)
  graphdef, state = nnx.split(vae)
  z = jax.jit(M.make_encode_fn(graphdef))(state, frames)
  np.testing.assert_allclose(z.reshape(-1, 4).mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(z.reshape(-1, 4).std(0), 1.0, atol=1e-3)
  out = jax.jit(M.make_decode_fn(graphdef))(state, z)
  assert out.shape == frames.shape
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  loss, metrics = nnx.jit(M.vae_loss)(vae, frames, jax.random.key(1), kl_weight=1e-4)
  assert bool(jnp.isfinite(loss)) and set(metrics) >= {'mse', 'l1', 'kl', 'psnr'}
