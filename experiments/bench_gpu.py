r"""Seconds and MFU of the Wan2.1-T2V-1.3B GRPO programs on one accelerator, random weights.

  python experiments/bench_gpu.py                 # real size, for one H100 / H200 (< 8 min);
                                                  # writes experiments/results/bench_gpu_gpu.md
  python experiments/bench_gpu.py --tiny          # the same rows at configs/wan_tiny.py's
                                                  # sizes, on CPU (~2-3 min on 2 cores)
  python experiments/bench_gpu.py --budget 300 --repeats 5 --out ''   # printed only

What is timed is what training runs: `policy.make_rollout_program` and
`policy.make_update_step` (euphonium_jax/policy.py), built as the `grpo` stage builds them,
from `configs/wan2_1_t2v_1_3b.py:euphonium` (`--config`; `configs/wan_tiny.py:euphonium` with
`--tiny`) at 240x416x33 (3510 video tokens, 512 text tokens, CFG 4.5, bf16 matmuls with
float32 accumulation, `wan.remat` as each row says: the rollouts use the config's 'full',
which only their PRM gradient feels), through experiments/wan_memory.py's `make_config` and
`networks` (one sample per program, one device). The weights are random, made on the device
(one jitted program per network and fine-tuning mode) in the layout, dtypes and shardings
`wan_memory.networks` gives the loaders' networks (LoRA: bf16 base, float32 adapters; full
fine-tuning: `wan.param_dtype = float32`; the PRM as `WanBundle.abstract_prm` builds it:
config.prm's depth, pool, head and LoRA): each leaf N(0, 1 / fan_in) from one normal draw (the
networks' own initialisers take ~20 s to compile on XLA:CPU even at tiny size). The text
encodings are random (no UMT5 runs). Rows, most important first (`--budget` skips the rest,
with the reason printed, when the next one would not end in time; a row that runs out of
device memory prints OOM):

- rollout unguided / guided: seconds per sample-rollout: all `sampling.num_steps` (20) CFG SDE
  steps at the config's settings (no step count scaled), then the VAE decode of the scored
  latent, one program; guided adds the PRM value and gradient on the guided steps (5 of 20).
  Unguided = the same policy with `sampling.guidance.mode = 'off'` (as bench_grpo.py).
- update LoRA / full, remat full / none: seconds per trained transition of one optimiser step
  of one sample with K = 2 trained transitions (`grpo.timestep_fraction = 2 / 19`), on the
  guided rollout's data and `policy.make_prepare_program`'s advantages of random rewards: the
  step's time / K, so each transition carries half of one AdamW step (and EMA update).
- attention: the main rows use cuDNN on a GPU (`wan.attention_impl = cudnn`, what 'auto' picks
  there for bf16, `layers.auto_impl`) and 'blocked' (what 'auto' picks) on CPU; the last two
  rows repeat the guided rollout and the
  LoRA update with 'xla' (the attention probabilities materialised).

Timing: trace + lower + compile are timed apart from execution; one warm-up call, then the
median (and minimum) of `--repeats` calls, each ended by `jax.block_until_ready`. FLOPs are
analytic, the matmuls of the transformer blocks (`wan_memory.forward_flops`): a forward pass
is W (weights: projections and FFN on the video tokens, cross-attention K/V on the text
tokens) + A (attention scores and weighted sums); a backward pass is W + 2A with LoRA (no
weight gradients of the base) and 2W + 2A with full fine-tuning. A rollout = N x 2 forward
passes (the CFG pair) + per guided step a PRM forward and backward (its `prm.depth` blocks);
an update transition = the CFG pair forward and backward + the KL reference's CFG pair
forward. Remat's recomputation, the embeddings, the PRM head and the VAE decode are not
counted, so the rollouts' MFU is a lower bound. MFU = these FLOPs / median seconds / the
device's peak, measured in the same run: the median of `--repeats` (at least 5) timings of 10
back-to-back jitted `--matmul`^3 matmuls in the config's matmul dtype (bf16 on the GPU) with
float32 accumulation (`preferred_element_type`). On a GPU the programs may use 92% of its
memory (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set); `--compilation_cache DIR` lets a rerun
skip XLA's compilations. `--tiny` compiles with XLA:CPU's backend optimisation level 0 (its
programs are compiled once and run briefly): its times check the path, they measure nothing.

Imports: jax, flax, optax, orbax, chex, numpy, ml_collections and the project, put on
sys.path from this file's location (nothing is installed or downloaded). The project's modules
this pulls in also import PIL (euphonium_jax/rewards/compressibility.py, through every config's
reward defaults) and einops (euphonium_jax/models/dit.py and vae.py) at import time, and never
call them here: where they are missing, stubs stand in (`stub_missing`, which says so).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import types

T_START = time.time()
# Before wan_memory is imported (it defaults JAX to CPU with 8 forced devices): the real size
# runs on the accelerator JAX finds, --tiny on CPU unless JAX_PLATFORMS says otherwise, with
# XLA:CPU's backend optimisation level 0. On a GPU the programs may use 92% of its memory
# (JAX's default: 75%).
TINY_ARG = "--tiny" in sys.argv[1:]
os.environ.setdefault("JAX_PLATFORMS", "cpu" if TINY_ARG else "")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
for flag, value in (("--xla_force_host_platform_device_count", "1"),
                    ("--xla_backend_optimization_level", "0" if TINY_ARG else None)):
  if value is not None and flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={value}".strip()

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]


# Packages the project imports at import time that this benchmark never calls: PIL (the JPEG
# reward, euphonium_jax/rewards/compressibility.py, which every config's reward defaults
# import) and einops (the embedded world's networks, euphonium_jax/models/dit.py and vae.py).
# name -> (submodules imported, who uses it).
OPTIONAL = {"PIL": (("Image", "ImageDraw"), "the JPEG reward and the report's images"),
            "einops": ((), "the embedded world's networks")}


def stub_missing(optional: dict) -> None:
  """Where a package of `optional` is not installed (the GPU machine this is for has jax,
  flax, optax, orbax, chex, numpy, ml_collections and torch), a stub stands in: it imports,
  and raises ImportError when used."""
  def fail(name, attr):
    if attr.startswith("__"):  # what the import system asks of a module
      raise AttributeError(attr)
    raise ImportError(f"{name} is not installed; experiments/bench_gpu.py stubbed it (the "
                      f"benchmark does not use it), yet {name}.{attr} was used")
  for name, (subs, users) in optional.items():
    try:
      importlib.import_module(name)
      continue
    except ImportError:
      pass
    for part in (name, *(f"{name}.{sub}" for sub in subs)):
      mod = types.ModuleType(part)
      mod.__getattr__ = lambda attr, part=part: fail(part, attr)
      sys.modules[part] = mod
      if part != name:  # `from PIL import Image` finds the submodule as an attribute
        setattr(sys.modules[name], part.rsplit(".", 1)[1], mod)
    print(f"[bench_gpu] {name} is not installed: stubbed (only {users} use it)",
          file=sys.stderr)


stub_missing(OPTIONAL)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import wan_memory  # noqa: E402
from euphonium_jax import bundles, parallel  # noqa: E402
from euphonium_jax import policy as policy_lib  # noqa: E402
from euphonium_jax.rl import grpo  # noqa: E402

HARD_S = 45  # at --budget + HARD_S seconds the table so far is written and the run ends
TINY_CONFIG = os.path.join(ROOT, "configs", "wan_tiny.py") + ":euphonium"
# The sizes of euphonium_jax/models/wan/tiny.py's folder (diffusers' defaults for the rest).
TINY_WAN = dict(wan_memory.WAN_1_3B, num_attention_heads=2, attention_head_dim=16, text_dim=32,
                freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
                cross_attn_norm=False)
TINY_VAE = dict(wan_memory.WAN21_VAE, base_dim=4, num_res_blocks=1)


@dataclasses.dataclass
class Row:
  program: str  # rollout | update
  mode: str  # lora | full
  remat: str
  attention: str  # wan.attention_impl
  guided: bool = True
  # Filled in by `Bench.run`:
  status: str = ""  # "" = measured; else OOM / skipped / error, with the reason
  compile_s: float = float("nan")
  median_s: float = float("nan")
  min_s: float = float("nan")
  units: int = 1  # sample-rollouts or trained transitions per call
  flops: float = float("nan")  # per unit
  temp_gib: float = float("nan")
  wall_s: float = 0.0

  @property
  def name(self) -> str:
    if self.program == "rollout":
      return f"rollout {'guided' if self.guided else 'unguided'}"
    return f"update {'LoRA' if self.mode == 'lora' else 'full'}"


def plan(platform: str, dtype) -> list[Row]:
  """The rows, most important first; the main rows' attention is cuDNN on a GPU (with bf16 or
  f16 matmuls: cuDNN has no float32 attention), 'blocked' on CPU (what 'auto' picks there)."""
  if platform == "gpu" and jnp.dtype(dtype) != jnp.float32:
    attn = "cudnn"
  else:
    attn = "blocked" if platform == "cpu" else "auto"
  return [Row("rollout", "lora", "full", attn, guided=False), Row("rollout", "lora", "full", attn),
          Row("update", "lora", "full", attn), Row("update", "lora", "none", attn),
          Row("update", "full", "full", attn), Row("update", "full", "none", attn),
          Row("rollout", "lora", "full", "xla"), Row("update", "lora", "full", "xla")]


# ------------------------------------------------------------------------------ Helpers


def write_folder(directory: str, transformer: dict, vae: dict) -> str:
  """A Wan pipeline folder holding only the two config.json files the shapes come from."""
  for sub, cfg in (("transformer", transformer), ("vae", vae)):
    path = os.path.join(directory, sub, "config.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(json.dumps(cfg))
  return directory


def timed(fn, repeats: int) -> list[float]:
  """Seconds of `repeats` calls of `fn` (already warmed up), each ended by block_until_ready."""
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return out


def matmul_peak(n: int, dtype, repeats: int) -> float:
  """FLOP/s of an n^3 jitted matmul in `dtype` with float32 accumulation: the median of
  `repeats` (at least 5) timings of 10 calls dispatched back to back."""
  ka, kb = jax.random.split(jax.random.key(1))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  jax.block_until_ready(mm(a, b))
  ts = timed(lambda: [mm(a, b) for _ in range(10)], max(repeats, 5))
  return 10 * 2.0 * n ** 3 / statistics.median(ts)


def is_oom(e: BaseException) -> bool:
  s = str(e).lower()
  return "resource_exhausted" in s or "out of memory" in s or "resource exhausted" in s


def random_arrays(like, key):
  """Arrays for a pytree of ShapeDtypeStructs, made on the device (with their shardings) in
  one jitted program from ONE normal draw: each float leaf N(0, 1 / fan_in), fan_in = the
  product of all but its last axis (1 for vectors); other leaves zero. (The networks' own
  initialisers compile slowly on XLA:CPU: 52 s for the tiny VAE's.)"""
  leaves, treedef = jax.tree.flatten(like)
  floats = [jnp.issubdtype(a.dtype, jnp.floating) for a in leaves]
  sizes = [int(np.prod(a.shape)) if f else 0 for a, f in zip(leaves, floats)]
  offsets = np.cumsum([0] + sizes)

  def make():
    draw = jax.random.normal(key, (int(offsets[-1]),), jnp.float32)
    out = []
    for a, f, lo, n in zip(leaves, floats, offsets, sizes):
      if not f:
        out.append(jnp.zeros(a.shape, a.dtype))
        continue
      scale = 1.0 / np.sqrt(max(1, int(np.prod(a.shape[:-1]))))
      out.append((draw[lo:lo + n].reshape(a.shape) * scale).astype(a.dtype))
    return jax.tree.unflatten(treedef, out)

  shardings = [getattr(a, "sharding", None) for a in leaves]
  if any(sh is None for sh in shardings):
    return jax.jit(make)()
  return jax.jit(make, out_shardings=jax.tree.unflatten(treedef, shardings))()


def pass_flops(c: dict, tokens: int, text_len: int, layers: int | None = None):
  """(W, A) matmul FLOPs of one network pass of one sample: weights, attention."""
  total = wan_memory.forward_flops(tokens, text_len, c, layers)
  d = c["num_attention_heads"] * c["attention_head_dim"]
  attn = 4 * tokens * (tokens + text_len) * d * (c["num_layers"] if layers is None else layers)
  return total - attn, attn


# ----------------------------------------------------------------------------- Benchmark


class Bench:
  """Everything the rows share: mesh, folder, random weights per mode, the update's data."""

  def __init__(self, args, folder: str, wan_cfg: dict):
    self.args, self.folder, self.wan_cfg = args, folder, wan_cfg
    self.mesh = parallel.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1])
    self.weights = {}  # mode -> {'model' | 'vae' | 'prm': (params, rest)}
    self.rollout_outs = None  # the guided rollout's outputs: the update rows' data
    self.key = jax.random.key(0)

  def config(self, row: Row):
    c = wan_memory.make_config("rollout", row.mode, row.remat, 1, self.folder, self.args.config,
                               self.video)
    c.wan.attention_impl = row.attention
    c.grpo.timestep_fraction = wan_memory.TRAINED_STEPS / (c.sampling.num_steps - 1)
    return c

  @property
  def video(self):
    return tuple(int(v) for v in self.args.video.split("x"))

  def networks(self, config, mode: str):
    """(model graphdef, params, vae, model rest, prm): this row's graphdefs (they hold its
    remat and attention settings) and the mode's random weights, made once per mode."""
    (model_g, vae_g, prm_g), like_p, like_frozen, _ = wan_memory.networks(config, self.mesh)
    likes = {"model": (like_p, like_frozen["model_rest"]), "vae": like_frozen["vae"],
             "prm": like_frozen["prm"]}
    if mode not in self.weights:
      self.weights[mode] = {name: random_arrays(like, jax.random.fold_in(self.key, 10 + i))
                            for i, (name, like) in enumerate(likes.items())}
    w = self.weights[mode]
    return (model_g, w["model"][0], (vae_g,) + w["vae"], w["model"][1],
            (prm_g,) + w["prm"])

  def inputs(self, config, batch: int):
    """The conditioning table (random encodings, a prompt of L/4 tokens) and prompt index."""
    rep = parallel.replicated(self.mesh)
    length, dim = config.wan.max_text_length, self.wan_cfg["text_dim"]
    k1, k2 = jax.random.split(jax.random.fold_in(self.key, 1))
    mask = jnp.arange(length)[None] < max(1, length // 4)
    text = lambda k: {"tokens": jax.device_put(jax.random.normal(k, (1, length, dim)), rep),
                      "mask": jax.device_put(mask, rep)}
    table = {"text": text(k1)}
    if config.grpo.cfg_scale != 1.0:
      table["negative"] = text(k2)
    return table, jax.device_put(jnp.zeros((batch,), jnp.int32),
                                 parallel.batch_sharding(self.mesh, 1))

  def flops(self, config, pol, row: Row) -> float:
    """Analytic FLOPs per unit (module docstring)."""
    t, h, w, _ = pol.shape
    _, ph, pw = self.wan_cfg["patch_size"]
    tokens, text = t * (h // ph) * (w // pw), config.wan.max_text_length
    cfg = 2 if config.grpo.cfg_scale != 1.0 else 1
    w_, a_ = pass_flops(self.wan_cfg, tokens, text)
    if row.program == "rollout":
      total = pol.sampler.num_steps * cfg * (w_ + a_)
      if row.guided and pol.prm_fn is not None:
        pw_, pa_ = pass_flops(self.wan_cfg, tokens, text, layers=config.prm.depth)
        total += int(pol.arrs.guided.sum()) * (2 * pw_ + 3 * pa_)
      return total
    back = (w_ if row.mode == "lora" else 2 * w_) + 2 * a_
    return cfg * (w_ + a_ + back) + (cfg * (w_ + a_) if pol.hp.kl_coef > 0 else 0)

  def run(self, row: Row) -> None:
    config = self.config(row)
    nets = bundles.get(config)
    model_g, params, vae, model_r, prm = self.networks(config, row.mode)
    pol = policy_lib.make_policy(config, nets, self.mesh, model_g, vae[0], prm[0])
    if not row.guided:
      s = pol.sampler
      pol = dataclasses.replace(pol, sampler=dataclasses.replace(
          s, guidance=dataclasses.replace(s.guidance, mode="off")))
    frozen, frozen_sh = policy_lib.frozen_inputs(vae, model_r, prm, self.mesh)
    p_sh = nets.model_param_shardings(self.mesh)
    table, prompt_index = self.inputs(config, pol.batch)
    rollout = policy_lib.make_rollout_program(pol, p_sh, frozen_sh)
    roll_args = (params, frozen, table, prompt_index, jax.random.fold_in(self.key, 2))
    row.flops = self.flops(config, pol, row)
    t0 = time.perf_counter()
    if row.program == "rollout":
      compiled = rollout.lower(*roll_args).compile()
      row.compile_s = time.perf_counter() - t0
      outs = jax.block_until_ready(compiled(*roll_args))
      if row.guided:
        self.rollout_outs = outs
      call, row.units = (lambda: compiled(*roll_args)), pol.batch
    else:
      outs = self.rollout_outs
      if outs is None:  # the guided rollout did not run: data of its shapes
        outs = random_arrays(jax.eval_shape(rollout, *roll_args), jax.random.fold_in(self.key, 3))
      rewards = jax.random.normal(jax.random.fold_in(self.key, 4),
                                  (len(pol.reward_names), pol.batch))
      prep = policy_lib.make_prepare_program(pol)(
          rewards, outs["process_rewards"], outs.get("sde_mask"),
          jax.random.fold_in(self.key, 5), jax.random.fold_in(self.key, 6))
      # One iteration's data as the stage assembles it (stages/grpo.py).
      data = policy_lib.update_data(pol, outs, prep, prompt_index)
      idx = prep["orders"][0]
      tx = policy_lib.make_tx(config)
      # The update donates its state: its own copy of the mode's parameters.
      state, state_sh = policy_lib.init_state(pol, tx, jax.tree.map(jnp.copy, params), p_sh,
                                              nets.reference_params)
      holder = [state]
      del state
      update = policy_lib.make_update_step(pol, tx, state_sh, frozen_sh)
      t0 = time.perf_counter()
      compiled = update.lower(holder[0], data, idx, frozen, table).compile()
      row.compile_s = time.perf_counter() - t0

      def call():
        holder[0], metrics = compiled(holder[0], data, idx, frozen, table)
        return metrics
      jax.block_until_ready(call())
      row.units = config.grpo.samples_per_update * grpo.num_trained_steps(
          pol.sampler.num_steps, config.grpo.timestep_fraction)
    try:
      row.temp_gib = compiled.memory_analysis().temp_size_in_bytes / 2.0 ** 30
    except Exception:  # noqa: BLE001 (not every backend reports it)
      pass
    ts = timed(call, self.args.repeats)
    row.median_s, row.min_s = statistics.median(ts), min(ts)


# ------------------------------------------------------------------------------- Report


def table(rows: list[Row], head: str, peak: float) -> str:
  lines = [head, "",
           "| row | mode | remat | attention | compile s | median s | min s | per | s per | "
           "TFLOP per | TFLOP/s | MFU | XLA temp GiB | wall s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    cells = [r.name, r.mode, r.remat, r.attention]
    unit = "sample-rollout" if r.program == "rollout" else "trained transition"
    if r.status:
      cells += [r.status] + [""] * 9
    else:
      per = r.median_s / r.units
      rate = r.flops / per
      cells += [f"{r.compile_s:.1f}", f"{r.median_s:.3g}", f"{r.min_s:.3g}", unit, f"{per:.3g}",
                f"{r.flops / 1e12:.4g}", f"{rate / 1e12:.4g}", f"{rate / peak:.3g}",
                f"{r.temp_gib:.3g}", f"{r.wall_s:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  """The benchmark; `--tiny` must also be on the command line (sys.argv): it picks the JAX
  platform and XLA flags before JAX starts."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tiny", action="store_true", help="configs/wan_tiny.py sizes, on CPU")
  p.add_argument("--config", default=None, help="default: the 1.3B config's :euphonium "
                 "(configs/wan_tiny.py:euphonium with --tiny)")
  p.add_argument("--video", default=None, help="frames x height x width (33x240x416; 9x32x32 "
                 "with --tiny)")
  p.add_argument("--repeats", type=int, default=None, help="timed calls per row (3; 2 tiny)")
  p.add_argument("--matmul", type=int, default=None, help="side of the peak matmul (8192; "
                 "512 with --tiny)")
  p.add_argument("--budget", type=float, default=420.0, help="seconds from the start: a row "
                 "that would end later (as long as the longest of its kind so far) is "
                 f"skipped; at budget + {HARD_S} s the table so far is written and the run "
                 "ends (exit status 3)")
  p.add_argument("--rows", default="", help="comma-separated row numbers (1-8, in the "
                 "table's order) to run; default all")
  p.add_argument("--compilation_cache", default="", help="a folder for JAX's persistent "
                 "compilation cache: a rerun skips XLA compilation (its compile s is then the "
                 "cache's load time)")
  p.add_argument("--out", default=None, help="markdown file (default experiments/results/"
                 "bench_gpu_<platform>[_tiny].md; '' = print only)")
  args = p.parse_args(argv)
  tiny = args.tiny
  args.config = args.config or (TINY_CONFIG if tiny else wan_memory.CONFIG)
  args.video = args.video or ("9x32x32" if tiny else "33x240x416")
  args.repeats = args.repeats or (2 if tiny else 3)
  args.matmul = args.matmul or (512 if tiny else 8192)
  platform = jax.default_backend()
  if args.out is None:
    args.out = os.path.join(HERE, "results", f"bench_gpu_{platform}{'_tiny' if tiny else ''}.md")
  log = lambda *a: print("[bench_gpu]", *a, file=sys.stderr, flush=True)
  dev = jax.devices()[0]
  if args.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
  done: list[Row] = []

  with tempfile.TemporaryDirectory() as tmp:
    wan_cfg = TINY_WAN if tiny else wan_memory.WAN_1_3B
    bench = Bench(args, write_folder(tmp, wan_cfg, TINY_VAE if tiny else wan_memory.WAN21_VAE),
                  wan_cfg)
    dtype = jnp.dtype(bench.config(Row("rollout", "lora", "full", "auto")).wan.dtype)
    rows = plan(platform, dtype)
    if args.rows:
      rows = [rows[int(i) - 1] for i in args.rows.split(",")]
    peak = matmul_peak(args.matmul, dtype, args.repeats)
    log(f"{dtype.name} {args.matmul}^3 matmul peak: {peak / 1e12:.4g} TFLOP/s")
    command = "python experiments/bench_gpu.py" + "".join(f" {a}" for a in (
        sys.argv[1:] if argv is None else argv))
    f, h, w = bench.video
    path, _, method = args.config.partition(":")
    config_name = os.path.relpath(os.path.abspath(path), ROOT) + (":" + method if method else "")
    head = (
        f"`{command}` ({datetime.date.today().isoformat()}; {dev.device_kind} "
        f"({platform}){'' if platform != 'cpu' else ', ' + wan_memory.machine()}; "
        f"jax {jax.__version__}).\n\n"
        f"{'Tiny Wan (configs/wan_tiny.py sizes)' if tiny else 'Wan2.1-T2V-1.3B'} at "
        f"{h}x{w}x{f}, random weights, `{config_name}` with one sample per program on one "
        "device; "
        f"matmuls {dtype.name} (float32 accumulation). Peak: {dtype.name} {args.matmul}^3 "
        f"matmul, {peak / 1e12:.4g} TFLOP/s measured in this run; MFU = analytic matmul "
        f"FLOPs / median time / peak (see experiments/bench_gpu.py). Rollout rows: all "
        f"sampling steps (no scaling) + the VAE decode; update rows: one optimiser step of "
        f"1 sample x {wan_memory.TRAINED_STEPS} trained transitions, per transition. "
        f"Median / min of {args.repeats} calls after a warm-up; budget {args.budget:.0f} s"
        + ("; XLA:CPU backend optimisation level 0 (a check of the path, not a measurement)."
           if tiny and platform == "cpu" else "."))

    def report(running: str = "") -> None:
      rest = [dataclasses.replace(r, status=running if i == 0 else "skipped: the run was "
                                  "stopped") for i, r in enumerate(rows[len(done):])]
      stats = dev.memory_stats() or {}
      text = table(done + rest, head, peak) + f"\n\nTotal {time.time() - T_START:.0f} s" + (
          f"; device peak bytes in use {stats['peak_bytes_in_use'] / 2.0 ** 30:.1f} GiB."
          if "peak_bytes_in_use" in stats else ".")
      print(text, flush=True)
      if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as fh:
          fh.write(text + "\n")

    def hard_stop():
      log(f"hard time limit: {args.budget + HARD_S:.0f} s")
      report(running=f"stopped at the hard time limit ({args.budget + HARD_S:.0f} s)")
      os._exit(3)
    watchdog = threading.Timer(max(1.0, args.budget + HARD_S - (time.time() - T_START)),
                               hard_stop)
    watchdog.daemon = True
    watchdog.start()

    longest = {}  # program -> the longest wall time of its rows so far
    for row in rows:
      left = args.budget - (time.time() - T_START)
      guess = longest.get(row.program, max(longest.values(), default=0.0))
      label = f"{row.name} ({row.mode}, remat {row.remat}, {row.attention})"
      if guess > left or left <= 0:
        row.status = (f"skipped: {max(left, 0):.0f} s of the {args.budget:.0f} s budget left"
                      + (f", a {row.program} row took {guess:.0f} s" if guess > 0 else ""))
        log(f"{label}: {row.status}")
        done.append(row)
        continue
      log(f"{label} ...")
      t0 = time.time()
      try:
        bench.run(row)
      except Exception as e:  # noqa: BLE001 (a row's failure is reported, the run goes on)
        if tiny and not is_oom(e):
          raise
        row.status = "OOM" if is_oom(e) else "error: " + str(e).splitlines()[0][:160]
        row.status = row.status.replace("|", "/")
      gc.collect()
      row.wall_s = time.time() - t0
      longest[row.program] = max(longest.get(row.program, 0.0), row.wall_s)
      log(f"  {row.status or f'{row.median_s:.3g} s per call'} ({row.wall_s:.0f} s)")
      done.append(row)
    watchdog.cancel()
    report()


if __name__ == "__main__":
  main()
