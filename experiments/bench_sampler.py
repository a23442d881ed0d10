"""Cost of guidance: wall time of an unguided vs a guided rollout of one group, and the
ratio XLA's cost analysis predicts from FLOPs.

  python experiments/bench_sampler.py [--model standin] [--repeats 5] [--out FILE]

Rollout: the `euphonium` preset (16 steps, shift 5, constant eta 0.25, guidance on steps
12-15) against the same preset with guidance off. Predicted ratio:
`1 + n_guided * F(PRM forward + backward) / (N * F(velocity forward))`, FLOPs from
`jax.jit(f).lower(...).compile().cost_analysis()`.

`--model standin` (default): small pure-function stand-ins defined here, latent
[8, 8, 8, 8, 4] as 512 tokens of width 128; velocity = 4 pre-LN transformer blocks, PRM =
2 blocks + mean pooling + a linear head. `--model embedded`: the project's VideoDiT
(`models.api.default_model_configs().model`, width 128, depth 4) and LatentPRM (its first
2 blocks, attention pool, MLP head), random weights, as pure functions of their state.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp

from euphonium_jax import sampling

LATENT = (8, 8, 8, 8, 4)     # [B, T, H, W, C]: a group of 8
WIDTH, HEADS, TEXT = 128, 4, 128


def _dense(key, n_in, n_out):
  return {"w": jax.random.normal(key, (n_in, n_out)) / math.sqrt(n_in), "b": jnp.zeros(n_out)}


def _block_params(key):
  k = jax.random.split(key, 4)
  return {"qkv": _dense(k[0], WIDTH, 3 * WIDTH), "o": _dense(k[1], WIDTH, WIDTH),
          "up": _dense(k[2], WIDTH, 4 * WIDTH), "down": _dense(k[3], 4 * WIDTH, WIDTH)}


def init_standin(key, depth, head_out):
  """Parameters of a token transformer: in-proj, time MLP, `depth` blocks, output head."""
  k = jax.random.split(key, depth + 4)
  return {"inp": _dense(k[0], LATENT[-1], WIDTH), "time": _dense(k[1], WIDTH, WIDTH),
          "text": _dense(k[2], TEXT, WIDTH), "out": _dense(k[3], WIDTH, head_out),
          "blocks": [_block_params(kk) for kk in k[4:]]}


def _apply(p, h):
  return h @ p["w"] + p["b"]


def _ln(h):
  m = h.mean(-1, keepdims=True)
  return (h - m) * jax.lax.rsqrt(((h - m)**2).mean(-1, keepdims=True) + 1e-6)


def _block(p, h):
  b, n, _ = h.shape
  q, k, v = jnp.split(_apply(p["qkv"], _ln(h)), 3, axis=-1)
  heads = lambda a: a.reshape(b, n, HEADS, WIDTH // HEADS)
  att = jax.nn.dot_product_attention(heads(q), heads(k), heads(v)).reshape(b, n, WIDTH)
  h = h + _apply(p["o"], att)
  return h + _apply(p["down"], jax.nn.gelu(_apply(p["up"], _ln(h))))


def _trunk(p, x, t, cond):
  b = x.shape[0]
  h = _apply(p["inp"], x.reshape(b, -1, x.shape[-1]))
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(WIDTH // 2) / (WIDTH // 2))
  phase = 1000 * t[:, None] * freqs
  temb = jnp.concatenate([jnp.sin(phase), jnp.cos(phase)], -1)
  h = h + (_apply(p["time"], temb) + _apply(p["text"], cond["pooled"]))[:, None]
  for bp in p["blocks"]:
    h = _block(bp, h)
  return _ln(h)


def standin_velocity(params, x, t, cond):
  """`[B, T, H, W, C]` -> velocity of the same shape."""
  return _apply(params["out"], _trunk(params, x, t, cond)).reshape(x.shape)


def standin_prm(params, x, t, cond):
  """`[B, T, H, W, C]` -> `[B]` score (mean-pooled tokens, linear head)."""
  return _apply(params["out"], _trunk(params, x, t, cond).mean(1))[:, 0]


def flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def wall_times(fns, repeats):
  """Median and min seconds per call of each zero-argument fn, after compiling all; the
  calls are interleaved so that a change in machine load hits every fn alike."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def embedded_models(key):
  """(velocity_fn, prm_fn, params, prm_params, cond) of the embedded-world networks."""
  from flax import nnx
  from euphonium_jax.models import api, prm
  mcfg = api.default_model_configs()
  dit = api.make_dit(mcfg.model, nnx.Rngs(0))
  pcfg = mcfg.model.copy_and_resolve_references()
  pcfg.update(prm.default_prm_config())
  prm_model = prm.make_prm(pcfg, nnx.Rngs(1))
  vg, vstate = nnx.split(dit)
  pg, pstate = nnx.split(prm_model)
  k = jax.random.split(key, 2)
  length = mcfg.text.max_length
  cond = {"tokens": jax.random.normal(k[0], (LATENT[0], length, mcfg.model.text_dim)),
          "mask": jnp.ones((LATENT[0], length), bool),
          "pooled": jax.random.normal(k[1], (LATENT[0], mcfg.text.pooled_dim))}
  return api.make_velocity_fn(vg), prm.make_prm_fn(pg), vstate, pstate, cond


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", choices=("standin", "embedded"), default="standin")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default=None, help="also write the table to this file")
  args = ap.parse_args()
  k = jax.random.split(jax.random.key(0), 3)
  if args.model == "embedded":
    velocity_fn, prm_fn, vparams, pparams, cond = embedded_models(k[2])
  else:
    velocity_fn, prm_fn = standin_velocity, standin_prm
    vparams, pparams = init_standin(k[0], 4, LATENT[-1]), init_standin(k[1], 2, 1)
    cond = {"pooled": jax.random.normal(k[2], (LATENT[0], TEXT))}
  guided_cfg = sampling.preset("euphonium")
  plain_cfg = sampling.preset("euphonium", guidance=dict(mode="off"))
  n, n_g = guided_cfg.num_steps, int(sampling.grid_arrays(guided_cfg).guided.sum())

  x = jnp.zeros(LATENT)
  t = jnp.full((LATENT[0],), 0.5)
  f_v = flops(velocity_fn, vparams, x, t, cond)
  f_pg = flops(jax.value_and_grad(lambda y: prm_fn(pparams, y, t, cond).sum()), x)
  f_p = flops(prm_fn, pparams, x, t, cond)
  predicted = 1 + n_g * f_pg / (n * f_v)

  fns = {}
  for name, cfg in (("unguided", plain_cfg), ("guided", guided_cfg)):
    rollout = jax.jit(sampling.make_rollout(velocity_fn, prm_fn, cfg),
                      static_argnames="latent_shape")
    fns[name] = lambda r=rollout: r(vparams, pparams, jax.random.key(1), cond, LATENT)
  vel = jax.jit(velocity_fn)
  prm_vg = jax.jit(jax.value_and_grad(lambda p, y: prm_fn(p, y, t, cond).sum(), argnums=1))
  fns["velocity fwd"] = lambda: vel(vparams, x, t, cond)
  fns["PRM fwd+bwd"] = lambda: prm_vg(pparams, x)
  timings = wall_times(fns, args.repeats)
  from_parts = 1 + n_g * timings["PRM fwd+bwd"][0] / (n * timings["velocity fwd"][0])
  measured = timings["guided"][0] / timings["unguided"][0]
  measured_min = timings["guided"][1] / timings["unguided"][1]

  dev = jax.devices()[0]
  lines = [
      f"device: {dev.platform} {dev.device_kind} x{jax.device_count()}; model: {args.model}; "
      f"latent {list(LATENT)}; N = {n}, guided steps = {n_g}; median of {args.repeats}",
      f"GFLOP velocity fwd {f_v / 1e9:.3f} | PRM fwd {f_p / 1e9:.3f} | "
      f"PRM fwd+bwd {f_pg / 1e9:.3f} (x{f_pg / f_p:.2f} fwd)",
      "| program      | wall s (median) | wall s (min) |",
      "|--------------|-----------------|--------------|",
      *(f"| {k:12s} | {m:15.4f} | {mn:12.4f} |" for k, (m, mn) in timings.items()),
      f"measured ratio {measured:.3f} (overhead {100 * (measured - 1):.1f}%; from the minima "
      f"{measured_min:.3f}) | "
      f"predicted ratio {predicted:.3f} (overhead {100 * (predicted - 1):.1f}%) | "
      f"overhead measured / predicted {(measured - 1) / (predicted - 1):.2f}",
      f"ratio predicted from the timed parts (1 + n_g t_prm_fb / (N t_vel)) {from_parts:.3f}",
  ]
  print("\n".join(lines))
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
