r"""What fits where: per-device memory of one Wan2.1-T2V-1.3B GRPO training step, compiled, not run.

  python experiments/wan_memory.py                      # the table (8 forced CPU devices)
  python experiments/wan_memory.py --meshes 1 --modes lora --remat full   # one row

For the 1.3B transformer at Flow-GRPO's video size (240x416, 33 frames -> latents 9x30x52,
3510 tokens; 512 text tokens of UMT5-XXL), builds the training step that GRPO runs per trained
transition: the velocity at one noised latent per device, a Gaussian-kernel log-likelihood of
the next state weighted by an advantage, backward, AdamW update with donated state. It is
lowered with ``jax.ShapeDtypeStruct`` inputs carrying FSDP shardings and compiled; XLA's
memory analysis gives the per-device arguments (parameters + optimiser state + batch), the
temporaries (activations and gradients) and the output; nothing is allocated. Rows: full
fine-tuning (float32 master weights and AdamW moments) and LoRA (rank 32, alpha 64 on the
attention projections, as Flow-GRPO's Wan recipe; base weights stored bfloat16 and frozen,
optimiser state for the adapters only), each with and without remat (full), for FSDP meshes of
1, 4 and 8 devices. Matmuls run in bfloat16 with float32 accumulation.

XLA:CPU's memory analysis is the partitioned program's, i.e. per device; activations are pinned
to batch sharding at block boundaries (WanConfig.batch_axes). The step FLOPs are counted
analytically (XLA's cost analysis counts a scanned layer once, so it is not used).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from euphonium_jax import parallel  # noqa: E402
from euphonium_jax.models.wan import transformer as wt  # noqa: E402

WAN_1_3B = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128,
                in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                rope_max_seq_len=1024)
RULES = (("embed", "fsdp"), ("mlp", None), ("heads", None), ("layers", None),
         ("conv_in", None), ("conv_out", "fsdp"), ("vocab", None))
GiB = 2.0 ** 30


def _sds(abstract_tree, shardings, dtype=None):
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype if dtype is not None and
                                        jnp.issubdtype(a.dtype, jnp.floating) else a.dtype,
                                        sharding=s),
      abstract_tree, shardings)


def _bytes_per_device(tree) -> float:
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard)) * jnp.dtype(leaf.dtype).itemsize
  return total


def analyse(mode: str, remat: str, n_devices: int, latent=(9, 30, 52), text_len=512):
  mesh = parallel.make_mesh((1, n_devices), ("data", "fsdp"), devices=jax.devices()[:n_devices])
  lora = mode == "lora"
  cfg = wt.WanConfig.from_reference(
      WAN_1_3B, dtype="bfloat16", remat=remat, attention_impl="xla",
      batch_axes=("data", "fsdp"),
      lora_rank=32 if lora else 0, lora_alpha=64.0, lora_targets=("to_q", "to_k", "to_v",
                                                                   "to_out.0"))
  model = wt.abstract(cfg)
  trainable = wt.LoRAParam if lora else nnx.Param
  graphdef, params_abs, rest_abs = nnx.split(model, trainable, ...)
  p_sh = parallel.state_shardings(params_abs, mesh, RULES)
  r_sh = parallel.state_shardings(rest_abs, mesh, RULES)
  params = _sds(params_abs, p_sh, jnp.float32)
  rest = _sds(rest_abs, r_sh, jnp.bfloat16 if lora else jnp.float32)
  tx = optax.adamw(1e-5, weight_decay=1e-4)
  opt_abs = jax.eval_shape(tx.init, params)
  rep = parallel.replicated(mesh)
  opt_sh = jax.tree.map(lambda a: rep, opt_abs)
  # AdamW moments take the parameters' shardings (mu, nu are parameter-shaped).
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_sh, p_sh,
                                 transform_non_params=lambda _: rep)
  opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abs,
                     opt_sh)
  b = n_devices  # one sample per device
  bsh = lambda nd: parallel.batch_sharding(mesh, nd)
  x = jax.ShapeDtypeStruct((b, *latent, 16), jnp.float32, sharding=bsh(5))
  text = jax.ShapeDtypeStruct((b, text_len, 4096), jnp.bfloat16, sharding=bsh(3))
  t = jax.ShapeDtypeStruct((b,), jnp.float32, sharding=bsh(1))
  adv = jax.ShapeDtypeStruct((b,), jnp.float32, sharding=bsh(1))

  def step(params, opt, rest, x, x_next, t, text, adv):
    def loss_fn(p):
      v = nnx.merge(graphdef, p, rest)(x, t, {"tokens": text})
      mean = x - 0.05 * v  # one Euler step of dt = 0.05 towards data
      logp = -jnp.sum(jnp.square(x_next - mean), axis=(1, 2, 3, 4)) / (2 * 0.1 ** 2)
      return -jnp.mean(adv * logp)
    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  t0 = time.time()
  with jax.set_mesh(mesh):
    lowered = jax.jit(step, out_shardings=(p_sh, opt_sh, rep), donate_argnums=(0, 1)).lower(
        params, opt, rest, x, x, t, text, adv)
    compiled = lowered.compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params_abs))
  n_base = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(rest_abs))
  return dict(
      mode=mode, remat=remat, devices=n_devices, trainable=n_params,
      params_gib=(_bytes_per_device(params) + _bytes_per_device(rest)) / GiB,
      opt_gib=_bytes_per_device(opt) / GiB,
      args_gib=mem.argument_size_in_bytes / GiB, temp_gib=mem.temp_size_in_bytes / GiB,
      out_gib=mem.output_size_in_bytes / GiB, alias_gib=mem.alias_size_in_bytes / GiB,
      flops=float(cost.get("flops", float("nan"))) if cost else float("nan"),
      compile_s=time.time() - t0, frozen=n_base)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--meshes", default="1,4,8")
  p.add_argument("--modes", default="full,lora")
  p.add_argument("--remat", default="none,full")
  p.add_argument("--out", default="")
  args = p.parse_args()
  rows = []
  for mode in args.modes.split(","):
    for remat in args.remat.split(","):
      for n in (int(v) for v in args.meshes.split(",")):
        r = analyse(mode, remat, n)
        rows.append(r)
        print(f"[wan_memory] {mode} remat={remat} fsdp={n}: temp {r['temp_gib']:.2f} GiB "
              f"(compile {r['compile_s']:.0f} s)", flush=True)
  tokens = 9 * 15 * 26
  lines = [
      "Wan2.1-T2V-1.3B GRPO training step, 240x416x33 (3510 video tokens, 512 text tokens), "
      "one sample per device, bf16 matmuls; per-device GiB from XLA's memory analysis of the "
      f"compiled step ({jax.devices()[0].platform}, jax {jax.__version__}); nothing allocated.",
      "",
      "| mode | remat | FSDP devices | trainable params | weights | optimiser state | "
      "activations + gradients (XLA temp) | XLA arguments | total (args + temp) |",
      "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['mode']} | {r['remat']} | {r['devices']} | {r['trainable'] / 1e6:.1f} M | "
        f"{r['params_gib']:.2f} | {r['opt_gib']:.2f} | {r['temp_gib']:.2f} | "
        f"{r['args_gib']:.2f} | {r['args_gib'] + r['temp_gib']:.2f} |")
  n_all = rows[0]["trainable"] + rows[0]["frozen"]
  fwd = 2 * n_all * tokens  # matmul FLOPs of the forward pass (attention score terms aside)
  lines += ["", f"Analytic: the forward pass is ~{fwd / 1e12:.1f} TFLOP per sample in the "
            f"parameter matmuls ({n_all / 1e9:.3f} B parameters x 3510 tokens x 2); a training "
            f"step is ~3x that ({3 * fwd / 1e12:.1f} TFLOP) plus attention "
            f"(~{4 * 30 * 3510 * (3510 + 512) * 1536 * 3 / 1e12:.1f} TFLOP)."]
  text = "\n".join(lines)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
