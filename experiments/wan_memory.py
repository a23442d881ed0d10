r"""What fits where: per-device memory of the Wan2.1-T2V-1.3B GRPO programs, compiled, not run.

  python experiments/wan_memory.py            # the table (8 forced CPU devices), written to
                                              # experiments/results/wan_memory.md
  python experiments/wan_memory.py --programs update --meshes 8 --modes lora --remat full \
      --out ''                                # one row, printed only

The programs are the ones training runs, built by `euphonium_jax/policy.py` as the `grpo` stage
builds them, from `configs/wan2_1_t2v_1_3b.py:euphonium` (`--config`) at 240x416x33 (3510 video
tokens, 512 UMT5-XXL text tokens, CFG 4.5):
- update: `policy.make_update_step`, one optimiser step of `grpo.samples_per_update` samples in
  micro-batches of ONE SAMPLE PER DEVICE (accumulation = samples_per_update / devices), K = 2
  trained transitions per sample (scanned like the micro-batches: they set time, not memory),
  on one iteration's data as the rollout returns it.
- rollout: `policy.make_rollout_program` with the Euphonium sampler for one sample per device:
  20 CFG SDE steps, the PRM value and gradient on the 5 guided steps, the VAE decode.

Everything is lowered from `jax.ShapeDtypeStruct`s carrying the shardings the stage declares
(`policy.init_state`'s state, `policy.data_shardings`, the loaders' FSDP shardings of the frozen
networks as `policy.frozen_inputs` keeps them, a replicated conditioning table), and compiled;
nothing is allocated and no weights are read: the networks are built shape-only from a
temporary folder holding only the published `transformer/config.json` and `vae/config.json`.
Modes: LoRA (rank 32, alpha 64 on the attention projections; base weights stored bfloat16 and
frozen) and full fine-tuning (`wan.lora_rank = 0`, `wan.param_dtype = float32`: float32 master
weights, AdamW moments, KL reference and EMA, all FSDP-sharded); remat none / full
(`wan.remat`, which the PRM trunk shares); FSDP meshes (1, n) (data x fsdp) over the first n
devices. Matmuls bf16 with float32 accumulation, attention `xla` (probabilities materialised).

Each row is compiled twice: as XLA:CPU compiles it, and with `while-loop-invariant-code-motion`
off ("no hoisting"): XLA:CPU has no bf16 matmul, converts bf16 weights to float32 and hoists
those converts out of the layer scan, a float32 copy of the stacked bf16 weights that an
accelerator would not make. "device" adds to the program's temporaries (no hoisting) and fresh
outputs what the stage holds on the device through the run: the train state, the frozen
networks, the UMT5 encoder (kept for the evaluations) and the program's inputs. `--pinned yes`
rows measure the fix proposed for `bundles/wan.py` (`pinned_batch`): the blocks pin their
activations' batch to ('data', 'fsdp'); without it XLA computes every micro-batch on every
device. XLA:CPU's memory analysis is the partitioned program's, i.e. per device. FLOPs are
analytic (XLA's cost analysis counts a scanned layer once).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from euphonium_jax import bundles, parallel  # noqa: E402
from euphonium_jax import config as config_lib  # noqa: E402
from euphonium_jax import policy as policy_lib  # noqa: E402
from euphonium_jax.bundles import wan as wan_bundle  # noqa: E402
from euphonium_jax.models.wan import prm as wan_prm  # noqa: E402
from euphonium_jax.models.wan import transformer as wt  # noqa: E402
from euphonium_jax.models.wan import umt5 as umt5_lib  # noqa: E402
from euphonium_jax.models.wan import vae as vae_lib  # noqa: E402
from euphonium_jax.rl import grpo  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "wan2_1_t2v_1_3b.py") + ":euphonium"
# The published config.json files of Wan-AI/Wan2.1-T2V-1.3B-Diffusers.
WAN_1_3B = dict(_class_name="WanTransformer3DModel", patch_size=[1, 2, 2],
                num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
WAN21_VAE = dict(_class_name="AutoencoderKLWan", base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4],
                 num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True],
                 dropout=0.0, latents_mean=list(vae_lib.WAN21_LATENTS_MEAN),
                 latents_std=list(vae_lib.WAN21_LATENTS_STD))
TRAINED_STEPS = 2  # K of the update rows
GiB = 2.0 ** 30


# ------------------------------------------------------------------------------ Helpers


def config_folder(directory: str) -> str:
  """A Wan pipeline folder with only the configs the bundle reads for shapes."""
  for sub, cfg in (("transformer", WAN_1_3B), ("vae", WAN21_VAE)):
    os.makedirs(os.path.join(directory, sub), exist_ok=True)
    with open(os.path.join(directory, sub, "config.json"), "w") as f:
      json.dump(cfg, f, indent=1)
  return directory


def sds(abstract, shardings, dtype=None):
  """ShapeDtypeStructs of an abstract pytree with its shardings; `dtype` replaces floats."""
  def one(a, s):
    dt = dtype if dtype is not None and jnp.issubdtype(a.dtype, jnp.floating) else a.dtype
    return jax.ShapeDtypeStruct(a.shape, dt, sharding=s)
  return jax.tree.map(one, abstract, shardings)


def split_abstract(module, mesh, rules, trainable, dtypes=None):
  """(graphdef, params, rest) of a shape-only module as pure-dict ShapeDtypeStructs with the
  loaders' shardings; `dtypes` maps 'params' / 'rest' to the storage dtype of their floats."""
  g, p, r = nnx.split(module, trainable, ...)
  dtypes = dtypes or {}
  out = []
  for name, part in (("params", p), ("rest", r)):
    sh = nnx.to_pure_dict(parallel.state_shardings(part, mesh, rules))
    out.append(sds(nnx.to_pure_dict(part), sh, dtypes.get(name)))
  return g, out[0], out[1]


def cast_base(tree, base_paths, dtype):
  """The published weights (paths in `base_paths`) stored in `dtype`; the adapters and the
  LoRA scale stay float32, as `wt.load_wan_transformer` places them."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  leaves = [jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding)
            if path in base_paths and jnp.issubdtype(a.dtype, jnp.floating) else a
            for path, a in flat]
  return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def nbytes(tree) -> int:
  """Per-device bytes of a pytree of sharded ShapeDtypeStructs."""
  total = 0
  for a in jax.tree.leaves(tree):
    total += int(np.prod(a.sharding.shard_shape(a.shape))) * jnp.dtype(a.dtype).itemsize
  return total


def count(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def with_shardings(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def make_config(program: str, mode: str, remat: str, n: int, folder: str, config_path: str,
                video: tuple[int, int, int]):
  """The run's config with one sample per device: per micro-batch (update) or per rollout
  batch (rollout)."""
  config = config_lib.from_file(config_path)
  f, h, w = video
  config.wan.update(path=folder, frames=f, height=h, width=w, remat=remat)
  if mode == "full":
    config.wan.update(lora_rank=0, param_dtype="float32")
  gc = config.grpo
  if program == "update":
    batch = gc.prompts_per_iteration * config.sampling.group_size
    if batch % n or gc.samples_per_update % n:
      raise ValueError(f"{n} devices: the config's {batch} rollouts and "
                       f"samples_per_update={gc.samples_per_update} must divide by them")
    n_train = config.sampling.num_steps - 1
    gc.update(accumulation=gc.samples_per_update // n,
              timestep_fraction=TRAINED_STEPS / n_train)
  else:
    group = min(config.sampling.group_size, n)
    if n % group:
      raise ValueError(f"{n} devices do not split into groups of {group}")
    config.sampling.group_size = group
    gc.update(prompts_per_iteration=n // group, samples_per_update=n, accumulation=1)
  return config


# ----------------------------------------------------------------------------- Analysis


NO_HOISTING = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


@contextlib.contextmanager
def pinned_batch(on: bool):
  """With `on`, the fix this table proposes for `bundles/wan.py` until it has it: the Wan
  transformer and PRM trunk pin their activations' batch to ('data', 'fsdp') at every block
  boundary (`WanConfig.batch_axes`; the programs are then traced under `jax.set_mesh`)."""
  if not on:
    yield
    return
  orig = wan_bundle._transformer_options
  wan_bundle._transformer_options = lambda c: dict(orig(c), batch_axes=parallel.BATCH_AXES)
  try:
    yield
  finally:
    wan_bundle._transformer_options = orig


def networks(config, mesh):
  """Shape-only networks stored and sharded as the loaders place them: (graphdefs, trained
  params, frozen (as `policy.frozen_inputs` keeps them: sharded), UMT5 (params, rest))."""
  rules = config.sharding.rules
  dt = jnp.dtype(config.wan.param_dtype)
  transformer = wt.abstract(wan_bundle.transformer_config(config))
  trainable = wt.LoRAParam if config.wan.lora_rank else nnx.Param
  model_g, model_p, model_r = split_abstract(transformer, mesh, rules, trainable)
  base = {path for path, _ in jax.tree_util.tree_flatten_with_path(
      nnx.to_pure_dict(nnx.state(transformer, wt.BASE)))[0]}
  model_p, model_r = cast_base(model_p, base, dt), cast_base(model_r, base, dt)
  vae_g, vae_p, vae_r = split_abstract(vae_lib.abstract(wan_bundle.vae_config(config)), mesh,
                                       rules, nnx.Param, {"params": dt, "rest": dt})
  prm_g, prm_p, prm_r = split_abstract(wan_bundle.WanBundle(config).abstract_prm(), mesh,
                                       rules, wan_prm.trainable_filter(bool(config.prm.lora_rank)))
  umt5 = split_abstract(umt5_lib.abstract_umt5(umt5_lib.UMT5Config()), mesh, rules, nnx.Param,
                        {"params": dt})[1:]
  frozen = {"vae": (vae_p, vae_r), "model_rest": model_r, "prm": (prm_p, prm_r)}
  return (model_g, vae_g, prm_g), model_p, frozen, umt5


def analyse(program: str, mode: str, remat: str, n: int, folder: str, config_path: str = CONFIG,
            video=(33, 240, 416), pinned: bool = False) -> dict:
  """Compiles `program` ('update' | 'rollout') for one row; per-device GiB and timings."""
  mesh = parallel.make_mesh((1, n), ("data", "fsdp"), devices=jax.devices()[:n])
  config = make_config(program, mode, remat, n, folder, config_path, video)
  rep, bsh = parallel.replicated(mesh), lambda nd: parallel.batch_sharding(mesh, nd)
  # jax.set_mesh sets the mesh when called: only ever inside a `with`.
  trace = lambda: jax.set_mesh(mesh) if pinned else contextlib.nullcontext()
  with pinned_batch(pinned):
    nets = bundles.get(config)
    (model_g, vae_g, prm_g), model_p, frozen, umt5 = networks(config, mesh)
    frozen_sh = jax.tree.map(lambda a: a.sharding, frozen)
    pol = policy_lib.make_policy(config, nets, mesh, model_g, vae_g, prm_g)
    p_sh = nets.model_param_shardings(mesh)
  params = with_shardings(model_p, p_sh)
  text = {"tokens": jax.ShapeDtypeStruct((config.grpo.prompts_per_iteration,
                                          config.wan.max_text_length, WAN_1_3B["text_dim"]),
                                         jnp.float32, sharding=rep)}
  text["mask"] = jax.ShapeDtypeStruct(text["tokens"].shape[:2], jnp.bool_, sharding=rep)
  table = {"text": text, "negative": text} if config.grpo.cfg_scale != 1.0 else {"text": text}
  b = pol.batch
  prompt_index = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=bsh(1))
  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
  rollout = policy_lib.make_rollout_program(pol, p_sh, frozen_sh)
  roll_args = (params, frozen, table, prompt_index, key)

  # The train state as `policy.init_state` builds it (parameters, AdamW, counters, RNG, KL
  # reference); with the frozen networks and the UMT5 encoder (the stage keeps it for its
  # evaluations) it stays on the device through the run.
  tx = policy_lib.make_tx(config)
  holder = {}

  def init(p):
    st, holder["sh"] = policy_lib.init_state(pol, tx, p, p_sh, nets.reference_params)
    return st
  t0 = time.perf_counter()
  state = with_shardings(jax.eval_shape(init, params), holder["sh"])
  held = {"state": nbytes(state), "frozen": nbytes(frozen), "umt5": nbytes(umt5)}
  if program == "rollout":
    jitted, args = rollout, roll_args
    inputs = nbytes(table) + nbytes(prompt_index)
  else:
    # One iteration's data as the rollout returns it, plus the stage's advantages and steps.
    with trace():
      outs = jax.eval_shape(rollout, *roll_args)
    k = grpo.num_trained_steps(pol.sampler.num_steps, config.grpo.timestep_fraction)
    data = {kk: outs[kk] for kk in pol.data_keys if kk != "process_rewards"}
    data.update(adv_outcome=jax.ShapeDtypeStruct((b, len(pol.reward_names)), jnp.float32),
                adv_process=outs["process_rewards"],
                steps=jax.ShapeDtypeStruct((b, k), jnp.int32),
                prompt=jax.ShapeDtypeStruct((b,), jnp.int32))
    data = with_shardings(data, policy_lib.data_shardings(pol))
    idx = jax.ShapeDtypeStruct((config.grpo.samples_per_update,), jnp.int32, sharding=rep)
    jitted = policy_lib.make_update_step(pol, tx, holder["sh"], frozen_sh)
    args = (state, data, idx, frozen, table)
    inputs = nbytes(data) + nbytes(table) + nbytes(idx)
  with trace():
    lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  mem = lowered.compile().memory_analysis()
  t2 = time.perf_counter()
  temp_nh = lowered.compile(compiler_options=NO_HOISTING).memory_analysis().temp_size_in_bytes
  g = lambda name: float(getattr(mem, name)) / GiB
  fresh = g("output_size_in_bytes") - g("alias_size_in_bytes")
  held = {kk: v / GiB for kk, v in held.items()}
  return dict(program=program, mode=mode, remat=remat, devices=n, batch=b, pinned=pinned,
              state_keys=", ".join(sorted(state)),
              per_update=config.grpo.samples_per_update, trainable=count(params),
              params=nbytes(params) / GiB, held=held, inputs=inputs / GiB,
              args=g("argument_size_in_bytes"), temp=g("temp_size_in_bytes"),
              temp_nh=temp_nh / GiB, out=fresh,
              # On the device while the program runs: what the stage holds, the program's
              # inputs, its temporaries (no hoisting) and its fresh outputs.
              device=sum(held.values()) + inputs / GiB + temp_nh / GiB + fresh,
              lower_s=t1 - t0, compile_s=t2 - t1)


# ------------------------------------------------------------------------------- Report


def forward_flops(tokens: int, text_len: int, c=WAN_1_3B, layers: int | None = None) -> float:
  """Matmul FLOPs of one network pass of one sample: projections and FFN on the video tokens,
  cross-attention K/V on the text tokens, attention scores and their weighted sums."""
  d, ffn = c["num_attention_heads"] * c["attention_head_dim"], c["ffn_dim"]
  per_block = (2 * tokens * (6 * d * d + 2 * d * ffn) + 2 * text_len * 2 * d * d
               + 4 * tokens * tokens * d + 4 * tokens * text_len * d)
  return per_block * (c["num_layers"] if layers is None else layers)


def machine() -> str:
  model = platform.processor() or "?"
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    model = names[0] if names else model
  except OSError:
    pass
  return f"{model}, {os.cpu_count()} cores"


def table(rows, command: str, video, total_s: float) -> str:
  f, h, w = video
  lat = (1 + (f - 1) // 4, h // 8, w // 8)
  tokens = lat[0] * (lat[1] // 2) * (lat[2] // 2)
  upd = [r for r in rows if r["program"] == "update"]
  roll = [r for r in rows if r["program"] == "rollout"]
  act = lambda r: "batch pinned" if r["pinned"] else "as today"
  lines = [
      f"`{command}` ({datetime.date.today().isoformat()}; {machine()}; jax {jax.__version__}, "
      f"{jax.devices()[0].platform} x{jax.device_count()} forced devices; "
      f"{total_s / 60:.0f} min for these rows).",
      "",
      f"Wan2.1-T2V-1.3B at {h}x{w}x{f} (latents {lat[0]}x{lat[1]}x{lat[2]}x16, {tokens} video "
      "tokens, 512 text tokens), CFG 4.5, bf16 matmuls: the programs `policy.py` builds for the "
      "`grpo` stage from `configs/wan2_1_t2v_1_3b.py:euphonium`, lowered from ShapeDtypeStructs "
      "with the stage's shardings and compiled, not run. Per device, GiB. XLA arguments and "
      "temp: XLA's memory analysis (XLA drops the arguments a program does not read). Temp, no "
      "hoisting: the same program compiled with `while-loop-invariant-code-motion` off: "
      "XLA:CPU has no bf16 matmul, so it converts the bf16 weights to float32 and hoists the "
      "converts of all 30 stacked layers out of the layer scan, an f32 copy of the bf16 "
      "weights that an accelerator with bf16 matmuls does not make (full fine-tuning's "
      "float32 weights have none). Device = what the stage holds through the run (the train "
      "state, the frozen networks, the UMT5 encoder its evaluations use) + the program's "
      "inputs, its temp (no hoisting) and its outputs that are not the donated state. "
      "Activations: *as today* = the programs as `bundles/wan.py` builds them (no activation "
      "sharding constraint in the transformer); *batch pinned* = with `WanConfig.batch_axes = "
      "('data', 'fsdp')` (the blocks pin their activations' batch to the devices), the fix "
      "this table proposes.",
      ""]
  if upd:
    r0 = upd[0]
    lines += [
        f"**GRPO update** (`policy.make_update_step`): one optimiser step of "
        f"{r0['per_update']} samples in micro-batches of one sample per device (accumulation "
        f"= {r0['per_update']} / devices), K = {TRAINED_STEPS} trained transitions per sample "
        "(both scanned: they set the step's time, not its memory); its data is one iteration's "
        f"{r0['batch']} rollouts, sharded. State = {r0['state_keys']} (`policy.init_state`; the "
        "KL reference is zero adapters with LoRA, a float32 copy with full fine-tuning). "
        "Frozen = the velocity network's "
        "base (bf16 with LoRA), the VAE and the PRM (float32). Full fine-tuning sets "
        "`wan.param_dtype = float32`, which stores every published network (UMT5 too) in "
        "float32.",
        "",
        "| activations | mode | remat | FSDP devices | trainable params | state | frozen "
        "networks | UMT5 | data | XLA arguments | XLA temp | temp, no hoisting | device | "
        "compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in upd:
      hd = r["held"]
      lines.append(
          f"| {act(r)} | {r['mode']} | {r['remat']} | {r['devices']} | "
          f"{r['trainable'] / 1e6:.1f} M | {hd['state']:.2f} | {hd['frozen']:.2f} | "
          f"{hd['umt5']:.2f} | {r['inputs']:.2f} | {r['args']:.2f} | {r['temp']:.2f} | "
          f"{r['temp_nh']:.2f} | {r['device']:.2f} | {r['lower_s'] + r['compile_s']:.0f} |")
    lines.append("")
  if roll:
    lines += [
        "**Guided rollout** (`policy.make_rollout_program`, the Euphonium sampler): one sample "
        "per device (prompts x group = devices), 20 SDE steps of the CFG velocity, the PRM "
        "(the first 4 blocks) value and gradient on the 5 guided steps, the VAE decode of the "
        "scored latent to frames, one program. No backward through the velocity; the PRM "
        "trunk runs with `wan.remat` (none here). Outputs: latents, log-probs, process "
        "rewards, frames.",
        "",
        "| activations | mode | remat | FSDP devices | rollouts | trained params | state | "
        "frozen networks | UMT5 | XLA arguments | XLA temp | temp, no hoisting | outputs | "
        "device | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in roll:
      hd = r["held"]
      lines.append(
          f"| {act(r)} | {r['mode']} | {r['remat']} | {r['devices']} | {r['batch']} | "
          f"{r['params']:.2f} | {hd['state']:.2f} | {hd['frozen']:.2f} | {hd['umt5']:.2f} | "
          f"{r['args']:.2f} | {r['temp']:.2f} | {r['temp_nh']:.2f} | {r['out']:.2f} | "
          f"{r['device']:.2f} | {r['lower_s'] + r['compile_s']:.0f} |")
    lines.append("")
  fwd = forward_flops(tokens, 512)
  prm = forward_flops(tokens, 512, layers=4)
  lines += [
      f"Analytic FLOPs per sample: one pass of the network is ~{fwd / 1e12:.1f} TFLOP of "
      f"matmuls ({2 * tokens * 30 * (6 * 1536 ** 2 + 2 * 1536 * 8960) / 1e12:.1f} in the "
      "projections and FFN on the video tokens, "
      f"{30 * (4 * tokens ** 2 + 4 * tokens * 512) * 1536 / 1e12:.1f} in attention). "
      f"A trained transition is 8 passes (the CFG pair forward and backward, the KL "
      f"reference's CFG pair forward): ~{8 * fwd / 1e12:.0f} TFLOP; 10 passes with full remat "
      f"(~{10 * fwd / 1e12:.0f}). A rollout is 20 CFG steps (40 passes, "
      f"~{40 * fwd / 1e12:.0f} TFLOP) plus the PRM value and gradient on 5 steps "
      f"(~{5 * 3 * prm / 1e12:.1f} TFLOP) and the VAE decode (not counted)."]
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--programs", default="update,rollout")
  p.add_argument("--meshes", default="1,4,8", help="FSDP sizes (the first n devices)")
  p.add_argument("--modes", default="lora,full", help="update rows; the rollout is LoRA")
  p.add_argument("--remat", default="none,full", help="update rows; the rollout uses none")
  p.add_argument("--pinned", default="no,yes", help="activations as today (no) and with the "
                 "batch pinned (yes, the proposed fix)")
  p.add_argument("--config", default=CONFIG)
  p.add_argument("--video", default="33x240x416", help="frames x height x width")
  p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "wan_memory.md"))
  args = p.parse_args()
  video = tuple(int(v) for v in args.video.split("x"))
  meshes = [int(v) for v in args.meshes.split(",")]
  programs = args.programs.split(",")
  jobs = []
  for pinned in (v == "yes" for v in args.pinned.split(",")):
    if "update" in programs:
      jobs += [("update", m, r, n, pinned) for m in args.modes.split(",")
               for r in args.remat.split(",") for n in meshes]
    if "rollout" in programs:
      jobs += [("rollout", "lora", "none", n, pinned) for n in meshes]
  rows, t_start = [], time.time()
  with tempfile.TemporaryDirectory() as tmp:
    folder = config_folder(tmp)
    for prog, mode, remat, n, pinned in jobs:
      r = analyse(prog, mode, remat, n, folder, args.config, video, pinned)
      rows.append(r)
      print(f"[wan_memory] {prog} {mode} remat={remat} fsdp={n} pinned={pinned}: args "
            f"{r['args']:.2f} temp {r['temp']:.2f} (no hoisting {r['temp_nh']:.2f}) device "
            f"{r['device']:.2f} GiB (lower {r['lower_s']:.0f} s, compile {r['compile_s']:.0f} "
            "s)", file=sys.stderr, flush=True)
  command = "python experiments/wan_memory.py" + "".join(f" {a}" for a in sys.argv[1:])
  text = table(rows, command, video, time.time() - t_start)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
