"""Attention implementations (`layers.attention`) against an independent float64 softmax(QK^T /
sqrt(d))V, with key masks, uneven query blocks and gradients; the Wan attention on every
implementation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from euphonium_jax.models import layers
from euphonium_jax.models.wan import transformer as wt


def naive(q, k, v, mask=None):
  """float64 numpy reference: q [B,Lq,N,H], k/v [B,Lk,N,H], mask [B,Lk] -> [B,Lq,N,H]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  s = np.einsum('bqnh,bknh->bnqk', q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    s = np.where(np.asarray(mask, bool)[:, None, None, :], s, -np.inf)
  s = s - s.max(-1, keepdims=True)
  p = np.exp(s)
  p = p / p.sum(-1, keepdims=True)
  return np.einsum('bnqk,bknh->bqnh', p, v)


def naive_jax(q, k, v, mask=None):
  """The same in float32 jax, to differentiate."""
  s = jnp.einsum('bqnh,bknh->bnqk', q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
  return jnp.einsum('bnqk,bknh->bqnh', jax.nn.softmax(s, -1), v)


def _qkv(b=2, lq=11, lk=7, n=3, h=8, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))
  mask = np.ones((b, lk), bool)
  mask[-1, lk // 2:] = False  # padded text positions of the last sample
  return f(b, lq, n, h), f(b, lk, n, h), f(b, lk, n, h), jnp.asarray(mask)


@pytest.mark.parametrize('impl', ['xla', 'blocked', 'auto', None])
@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('lq,lk', [(11, 7), (16, 16), (5, 13)])
def test_attention_matches_float64_softmax(impl, masked, lq, lk):
  q, k, v, mask = _qkv(lq=lq, lk=lk)
  m = mask if masked else None
  out = jax.jit(lambda q, k, v, m: layers.attention(q, k, v, m, impl, jnp.float32))(q, k, v, m)
  assert out.dtype == jnp.float32 and out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out), naive(q, k, v, m), atol=2e-6, rtol=0)


@pytest.mark.parametrize('block', [1, 4, 5, 16])
def test_blocked_attention_blocks_and_padding_are_exact(block):
  """11 queries in blocks of 1, 4 (padded to 12), 5 (padded to 15) and 16 (one block)."""
  q, k, v, mask = _qkv(lq=11, lk=9)
  out = jax.jit(lambda *a: layers.blocked_attention(*a, block=block))(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(out), naive(q, k, v, mask), atol=2e-6, rtol=0)
  full = layers.blocked_attention(q, k, v, mask, block=64)
  np.testing.assert_allclose(np.asarray(out), np.asarray(full), atol=1e-6, rtol=0)


def test_blocked_attention_loops_over_query_blocks():
  """The compiled program holds one loop of ceil(Lq / block) trips and no [B,N,Lq,Lk] logits."""
  q, k, v, _ = _qkv(b=1, lq=40, lk=40, n=2, h=8)
  hlo = jax.jit(lambda *a: layers.blocked_attention(*a, None, block=8)).lower(
      q, k, v).compile().as_text()
  assert 'while' in hlo and '"n":"5"' in hlo.replace(' ', ''), hlo[:2000]
  assert 'f32[1,2,40,40]' not in hlo


@pytest.mark.parametrize('masked', [False, True])
def test_blocked_attention_gradient_matches_naive(masked):
  q, k, v, mask = _qkv(lq=11, lk=9)
  m = mask if masked else None
  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape).astype(np.float32))
  loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v) * w))
  got = jax.jit(jax.grad(loss(lambda q, k, v: layers.blocked_attention(q, k, v, m, block=4)),
                         argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(lambda q, k, v: naive_jax(q, k, v, m)), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(got, want):
    assert float(jnp.abs(r).max()) > 0.1
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=5e-6, rtol=0)


def test_blocked_attention_bfloat16_accumulates_in_float32():
  q, k, v, mask = _qkv(lq=11, lk=9)
  out = layers.attention(q, k, v, mask, 'blocked', jnp.bfloat16)
  assert out.dtype == jnp.float32
  err = np.abs(np.asarray(out) - naive(q, k, v, mask)).max()
  assert 1e-5 < err < 5e-2, err  # bf16 inputs: not float32-exact, but close


def test_auto_is_blocked_on_cpu_and_unknown_impl_is_refused():
  q, k, v, _ = _qkv(b=1, lq=300, lk=300, n=1, h=8)
  auto = jax.jit(lambda *a: layers.attention(*a, None, 'auto', jnp.float32)).lower(q, k, v)
  assert 'while' in auto.compile().as_text()  # the query-block loop (300 > one block)
  with pytest.raises(ValueError, match="impl='flash'"):
    layers.attention(q, k, v, None, 'flash', jnp.float32)


def test_auto_picks_cudnn_on_a_gpu_only_where_it_applies():
  """`implementation=None` is XLA's attention in JAX itself, so 'auto' chooses cuDNN."""
  assert layers.auto_impl('cpu', jnp.bfloat16, 128) == 'blocked'
  assert layers.auto_impl('gpu', jnp.bfloat16, 128) == 'cudnn'
  assert layers.auto_impl('cuda', jnp.float16, 64) == 'cudnn'
  assert layers.auto_impl('gpu', jnp.float32, 128) == 'xla'  # cuDNN: 16-bit inputs only
  assert layers.auto_impl('gpu', jnp.bfloat16, 12) == 'xla'  # not a multiple of 8
  assert layers.auto_impl('gpu', jnp.bfloat16, 256) == 'xla'
  assert layers.auto_impl('tpu', jnp.bfloat16, 128) == 'xla'


def test_wan_attention_same_on_every_impl():
  """The Wan attention (RMSNorm across heads, RoPE) with the weights of one module on xla,
  blocked and auto: equal to float32 rounding (the diffusers parity is in the Wan tests)."""
  dim, heads, lq = 32, 2, 24
  mods = {impl: layers.build(wt.Attention, dim, heads, 1e-6, rngs=nnx.Rngs(0),
                             dtype=jnp.float32, impl=impl) for impl in ('xla', 'blocked', 'auto')}
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, lq, dim)).astype(np.float32))
  ctx = jnp.asarray(rng.standard_normal((2, 5, dim)).astype(np.float32))
  rope = tuple(jnp.asarray(a) for a in wt.rope_tables((2, 3, 4), dim // heads))
  outs = {i: (np.asarray(m(x, x, rope)), np.asarray(m(x, ctx))) for i, m in mods.items()}
  for impl in ('blocked', 'auto'):
    for a, b in zip(outs[impl], outs['xla']):
      np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)
