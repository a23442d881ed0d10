"""Latent process reward model on the Wan2.1 trunk: ``R_phi(x_t, t, text) -> [B] float32``.

Same inputs as the Wan velocity field (``x_t [B,F',h,w,16]`` channels-last normalised latents,
``t [B]`` in [0, 1] with Wan's timestep ``1000 t``, ``text = {'tokens': [B,L,text_dim],
optionally 'mask': [B,L]}``). Body: the transformer's trunk (``WanTrunk``: patch embedding,
condition embedder, 3D RoPE, the first K blocks, stacked and scanned), then a learned-query
attention pool over the video tokens, a LayerNorm and an MLP head. Wan has no pooled text
vector, so the head sees [pooled queries | silu(time embedding) | masked mean of the projected
text tokens]; the trunk itself attends to all L text positions, as the transformer does.

The trunk's parameters have the transformer's names, stacked-block axis and logical axis names,
so ``init_from_base`` copies them by key (blocks sliced [:K]) and ``training.param_shardings``
shards them alike. With LoRA in the base config the trainable parameters are the trunk's
adapters plus the pool and head (``trainable_filter(True)``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from euphonium_jax.models import layers
from euphonium_jax.models import prm as models_prm
from euphonium_jax.models.wan import transformer as wt

TRUNK_KEYS = ('patch_embedding', 'time_embedder', 'time_proj', 'text_embedder', 'blocks')
HEAD_KEYS = ('queries', 'pool', 'pool_norm', 'head_fc1', 'head_fc2')
# WanConfig fields that are execution / adapter options, not part of the published weights.
EXEC_FIELDS = ('dtype', 'remat', 'attention_impl', 'lora_rank', 'lora_alpha', 'lora_targets',
               'batch_axes')


@dataclasses.dataclass(frozen=True)
class WanPRMConfig:
  """The base transformer's config (its LoRA / dtype / remat / attention options apply to the
  trunk) plus the PRM's own sizes: depth K, pool queries, MLP head width."""
  base: wt.WanConfig
  depth: int = 4
  num_queries: int = 4
  head_width: int = 256

  def __post_init__(self):
    n = self.base.num_layers
    if not 1 <= self.depth <= n:
      raise ValueError(f'depth={self.depth}: the PRM trunk takes 1 .. base.num_layers={n} '
                       'blocks')
    for key in ('num_queries', 'head_width'):
      if getattr(self, key) < 1:
        raise ValueError(f'{key}={getattr(self, key)}: must be >= 1')


class WanPRM(wt.WanTrunk):
  """PRM over Wan latents [B,F',h,w,16], t [B], text -> a logit [B] float32.

  Trunk as ``WanTransformer``'s first ``cfg.depth`` blocks; head: ``num_queries`` learned
  queries attend to the K-block tokens (Wan attention, no RoPE), LayerNorm, then an MLP
  ``head_width`` wide on [queries (Q*D) | silu(temb) (D) | masked text mean (D)].
  """

  def __init__(self, cfg: WanPRMConfig, *, rngs: nnx.Rngs):
    c = cfg.base
    d, dt = self._init_trunk(c, cfg.depth, rngs)
    self.queries = nnx.Param(nnx.with_partitioning(nnx.initializers.normal(0.02),
                                                   (None, 'embed'))(
        rngs.params(), (cfg.num_queries, d)))
    self.pool = wt.Attention(d, c.num_attention_heads, c.eps, rngs=rngs, dtype=dt,
                             impl=c.attention_impl)
    self.pool_norm = layers.layer_norm(d, rngs=rngs)
    self.head_fc1 = layers.dense((cfg.num_queries + 2) * d, cfg.head_width, (None, 'mlp'),
                                 rngs=rngs)
    self.head_fc2 = layers.dense(cfg.head_width, 1, ('mlp', None), rngs=rngs)

  def _trunk(self, x, t, text):
    h, ctx, temb, temb6, rope, _ = self.embed(x, t, text)
    return self.run_blocks(h, ctx, temb6, rope), ctx, temb

  def features(self, x: jax.Array, t: jax.Array, text: dict[str, Any]) -> jax.Array:
    """The video tokens after the K trunk blocks: [B, F'*h'*w', D] (D = inner_dim)."""
    return self._trunk(x, t, text)[0]

  def __call__(self, x: jax.Array, t: jax.Array, text: dict[str, Any]) -> jax.Array:
    """x [B,F',h,w,C], t [B], text dict -> logit [B] float32."""
    h, ctx, temb = self._trunk(x, t, text)
    b = x.shape[0]
    q = jnp.broadcast_to(self.queries[...][None], (b,) + self.queries.shape)
    pooled = self.pool_norm(self.pool(q, h)).reshape(b, -1)
    mask = text.get('mask')
    m = (jnp.ones(ctx.shape[:2], jnp.float32) if mask is None
         else mask.astype(jnp.float32))  # [B, L]
    text_mean = (ctx * m[..., None]).sum(1) / jnp.maximum(m.sum(1), 1.0)[:, None]
    z = jnp.concatenate([pooled, jax.nn.silu(temb), text_mean], axis=-1)
    return self.head_fc2(jax.nn.gelu(self.head_fc1(z)))[:, 0].astype(jnp.float32)


def _construct(cfg: WanPRMConfig, seed: int) -> WanPRM:
  with nnx.use_eager_sharding(False):
    return WanPRM(cfg, rngs=nnx.Rngs(seed))


def build(cfg: WanPRMConfig, seed: int = 0) -> WanPRM:
  """The PRM with fresh parameters, initialised in one jitted program (an eager build
  compiles every initialiser separately: twice as slow on CPU)."""
  state = jax.jit(lambda: nnx.state(_construct(cfg, seed)))()
  return nnx.merge(nnx.graphdef(abstract(cfg)), state)


def abstract(cfg: WanPRMConfig) -> WanPRM:
  """Shape-only PRM (nothing allocated): for loading, sharding and memory planning."""
  return nnx.eval_shape(lambda: _construct(cfg, 0))


def trainable_filter(lora: bool):
  """nnx filter of the trained parameters: with ``lora`` the trunk's LoRA adapters plus the
  pool and head; otherwise every published-layout parameter (trunk, pool, head)."""
  if not lora:
    return nnx.All(nnx.Param, nnx.Not(wt.LoRAParam))
  return nnx.Any(wt.LoRAParam,
                 nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(k) for k in HEAD_KEYS))))


# prm(state, x_t, t, text) -> [B] float32 (a logit, or its sigmoid), differentiable in x_t:
# the same adapter as the embedded world's PRM (`state` an nnx.State or the pieces of a split).
make_prm_fn = models_prm.make_prm_fn


# --------------------------------------------------------------------------- Weights


def init_from_base(prm_params: dict, base_params: dict) -> dict:
  """PRM params (pure dict) with the trunk copied from a ``WanTransformer``'s (pure dict).

  Copies every leaf under ``TRUNK_KEYS`` except LoRA adapters (the PRM keeps its own),
  slicing the stacked block axis to the PRM's K; the pool and head keep their initialisation.
  Leaves are cast to the PRM's dtype and never alias the base. ValueError names the key of a
  base tensor that is missing or mis-shaped.
  """
  def copy(dst, src, path):
    if isinstance(dst, dict):
      if not isinstance(src, dict):
        raise ValueError(f'init_from_base: base {"/".join(path)!r} is a leaf, the PRM has a '
                         f'subtree {sorted(dst)}')
      out = {}
      for k, v in dst.items():
        if k == 'lora':  # adapters belong to the PRM (B = 0 at init)
          out[k] = v
        elif k not in src:
          raise ValueError(f'init_from_base: the base params have no '
                           f'{"/".join(path + (str(k),))!r} (needed by the PRM trunk)')
        else:
          out[k] = copy(v, src[k], path + (str(k),))
      return out
    key, want, have = '/'.join(path), tuple(dst.shape), tuple(getattr(src, 'shape', ()))
    if path[0] == 'blocks':  # stacked layers: the base's first K
      ok = len(have) == len(want) and have[0] >= want[0] and have[1:] == want[1:]
      src = src[:want[0]] if ok else src
    else:
      ok = have == want
    if not ok:
      raise ValueError(f'init_from_base: base {key!r} has shape {have}, the PRM needs {want}'
                       + (' (first K blocks of the stacked axis)' if path[0] == 'blocks'
                          else ''))
    return jnp.array(src, dtype=dst.dtype, copy=True)

  out = dict(prm_params)
  for key in TRUNK_KEYS:
    if key not in prm_params:
      continue
    if key not in base_params:
      raise ValueError(f'init_from_base: the base params have no {key!r} (needed by the PRM '
                       f'trunk; base keys {sorted(base_params)})')
    out[key] = copy(prm_params[key], base_params[key], (key,))
  return out


def _trunk_filter():
  return nnx.All(wt.BASE, nnx.Any(*(nnx.PathContains(k) for k in TRUNK_KEYS)))


def load_prm_init(folder: str, prm_cfg: WanPRMConfig, mesh=None, logical_rules=(),
                  param_dtype=jnp.float32, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
  """A diffusers ``transformer/`` folder -> (graphdef, PRM state placed with its shardings).

  The trunk is read from the folder with the transformer's weight table (``WAN_RULES``,
  ``loading.load_state``, as ``load_wan_transformer`` does), skipping blocks >= K and the
  output layers, so the rest of the base is never read; ``param_dtype`` is its storage dtype.
  Pool, head and LoRA adapters start fresh from ``seed`` (float32). ``prm_cfg.base`` must
  match the folder's config.json in every architecture key.
  """
  from euphonium_jax.models.wan import loading
  ref = wt.WanConfig.from_reference(loading.read_config(folder))
  diff = [f'base.{f.name}={getattr(prm_cfg.base, f.name)!r} (folder: '
          f'{getattr(ref, f.name)!r})' for f in dataclasses.fields(wt.WanConfig)
          if f.name not in EXEC_FIELDS and getattr(prm_cfg.base, f.name) != getattr(ref, f.name)]
  if diff:
    raise ValueError(f'{folder}/config.json does not match the PRM config: {", ".join(diff)}')
  model = abstract(prm_cfg)
  _, abstract_trunk, abstract_rest = nnx.split(model, _trunk_filter(), ...)
  kept = '|'.join(str(i) for i in range(prm_cfg.depth))
  ignore = (rf'blocks\.(?!(?:{kept})\.)\d+\..*', r'proj_out\..*', r'scale_shift_table')
  trunk = loading.load_state(abstract_trunk, loading.open_folder(folder), wt.WAN_RULES,
                             ignore=ignore, mesh=mesh, logical_rules=logical_rules,
                             dtype=param_dtype)
  shardings = None
  if mesh is not None:
    from euphonium_jax import parallel
    shardings = parallel.state_shardings(abstract_rest, mesh, logical_rules)

  # One jitted construction whose trunk outputs are dropped: XLA never computes them.
  make = lambda: nnx.split(_construct(prm_cfg, seed), _trunk_filter(), ...)[2]
  rest = jax.jit(make, out_shardings=shardings)()
  return nnx.graphdef(model), nnx.merge_state(trunk, rest)
