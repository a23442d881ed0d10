r"""Cost of one GRPO iteration on this machine: the rollout (guided and unguided), the update,
their achieved FLOP/s against a matmul peak measured in the same run, and peak memory.

  python experiments/bench_grpo.py [--config configs/euphonium.py] [--repeats 5] [--quick]
  python experiments/bench_grpo.py --config.grpo.prompts_per_iteration=2   # any config key

Everything is built as the `grpo` stage builds it (euphonium_jax/stages/grpo.py), from the
config's networks (`init.pretrain`, `init.prm`: the shipped assets for configs/euphonium.py):

- rollout: `policy.make_rollout_program`, the program the stage runs:
  `sampling.make_rollout` over the policy velocity and the PRM, N SDE steps in one
  `lax.scan`, PRM value-and-gradient on the guided steps, then the VAE decode of the scored
  latent, `prm_final` if configured and the finite flag; one jitted program with the stage's
  shardings, for the batch `grpo.prompts_per_iteration x sampling.group_size`. DECODE IS
  INCLUDED (it is timed alone in the "parts" rows). "unguided" is the same program with
  `sampling.guidance.mode = 'off'` (no PRM call unless `score_unguided_steps`).
- update: `policy.make_update_step` with the config's optimiser and loss settings, on
  the guided rollout's latents / log-probs, advantages from the config's outcome rewards
  scored on its decoded frames and the PRM's process rewards, and the stage's transition
  selection; one optimiser step = `grpo.samples_per_update` samples x K trained transitions.

Timings are medians (and minima) over `--repeats` calls of the compiled executables, after
one warm-up call; the programs are called in turn within each repeat, so a change in the
load of a shared machine hits every row alike. Tracing + lowering and XLA compilation
(`jax.jit(f).lower(...)`, `.compile()`) are timed separately from execution.

FLOPs. XLA's `cost_analysis()` counts the body of a `while` loop (`lax.scan`) once,
whatever its trip count, and a `lax.switch` as its costliest branch (checked in this run on
a toy scan). So the counts are corrected by compiling one trip of each loop on its own:

  rollout = XLA(program) + (N - 1) F(one step: velocity + noise + SDE update)
            + (n_guided - 1) F(PRM value and gradient)   [+ n_scored F(PRM forward)]
  update  = XLA(program) + (accumulation K - 1) F(value and gradient of one transition's loss
            on a micro-batch)

FLOP/s = corrected FLOPs / median time. The peak is a 2048^3 jitted matmul, float32 and
bfloat16 inputs with float32 accumulation (`--matmul_size`); also timed: the model's own
matmul shapes (the MLP's [B tokens x width] x [width x 4 width], attention's QK^T per head)
and an in-place elementwise stream (memory bandwidth, for the roofline lines). Memory: the
process's peak RSS (or, on an accelerator, `peak_bytes_in_use`) after each phase, and each
program's XLA temp buffers. The last lines check the issue's target (`--target`, 40% of the
float32 peak) and, where it is missed, say what limits the programs.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
import re
import resource
import statistics
import sys
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from euphonium_jax import bundles, config as config_lib, embedded, parallel, sampling
from euphonium_jax import policy as policy_lib
from euphonium_jax.data import prompts as prompts_lib
from euphonium_jax.rl import grpo
from euphonium_jax.stages import grpo as stage

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/euphonium.py", "Config file with get_config().", lock_config=False)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per program (median reported).")
_QUICK = flags.DEFINE_bool(
    "quick", False, "Smoke test: one prompt per iteration, samples_per_update = one group, "
    "2 repeats, 512^3 matmuls.")
_MATMUL = flags.DEFINE_integer("matmul_size", 2048, "Side of the peak matmul.")
_TARGET = flags.DEFINE_float(
    "target", 0.40, "The issue's target: rollout and update at >= this fraction of the "
    "measured f32 matmul peak.")


# ------------------------------------------------------------------------------ Helpers


def machine(load: str) -> str:
  model = platform.processor() or "?"
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    model = names[0] if names else model
  except OSError:
    pass
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = os.cpu_count()
  dev = jax.devices()[0]
  return (f"machine: {model}; {os.cpu_count()} cores ({usable} usable); load avg at the "
          f"start {load}\n"
          f"jax {jax.__version__}; backend {jax.default_backend()}; device {dev.device_kind} "
          f"x{jax.device_count()}; python {platform.python_version()}")


def compile_timed(jitted, *args):
  """(compiled, trace+lower seconds, compile seconds)."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, t1 - t0, time.perf_counter() - t1


def cost(compiled) -> tuple[float, float]:
  """(flops, bytes accessed) of XLA's cost analysis (a dict, or a list of one per module)."""
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  ca = ca or {}
  return float(ca.get("flops", float("nan"))), float(ca.get("bytes accessed", float("nan")))


def while_loops(compiled) -> str:
  """The trip counts of the compiled program's while loops ('?' where XLA does not know)."""
  trips = []
  for line in compiled.as_text().splitlines():
    if " while(" in line:
      m = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
      trips.append(m.group(1) if m else "?")
  return f"{len(trips)} while loop(s), trip counts [{', '.join(trips)}]"


def temp_bytes(compiled) -> float:
  try:
    return float(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # Not every backend reports it.
    return float("nan")


def peak_memory() -> str:
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    stats = dev.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use", float("nan")) / 2**20
    return f"device peak_bytes_in_use {peak:.0f} MiB"
  try:
    import psutil  # pylint: disable=import-outside-toplevel
    rss = psutil.Process().memory_info().rss / 2**20
  except ImportError:
    rss = float("nan")
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
  return f"host peak RSS {peak:.0f} MiB (current {rss:.0f} MiB)"


def wall_times(fns, repeats):
  """Median and min seconds per call of each zero-argument fn (already warmed up); the calls
  are interleaved so that a change in machine load hits every fn alike."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def scan_counts_once() -> bool:
  """Whether XLA's cost analysis counts a scan body once (True on jax 0.10 / XLA:CPU)."""
  w = jnp.ones((64, 64))
  f = lambda x, n: jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=n)[0]
  one, four = (cost(jax.jit(f, static_argnums=1).lower(jnp.ones((8, 64)), n).compile())[0]
               for n in (1, 4))
  return four < 2 * one


# ----------------------------------------------------------------------------- Benchmark


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every read at INFO
  config = _CONFIG.value
  repeats = _REPEATS.value
  size = _MATMUL.value
  if _QUICK.value:
    config.grpo.prompts_per_iteration = 1
    config.grpo.samples_per_update = config.sampling.group_size or 8
    config.grpo.accumulation = 1
    repeats, size = min(repeats, 2), min(size, 512)
  config_lib.validate(config)
  gc = config.grpo
  log = lambda *a: print(*a, file=sys.stderr, flush=True)  # progress; the table is stdout
  load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())

  # Sampler, batch, mesh: as the stage.
  sampler = sampling.sampler_config_from(config.sampling)
  plain = dataclasses.replace(sampler, guidance=dataclasses.replace(sampler.guidance,
                                                                    mode="off"))
  arrs = sampling.grid_arrays(sampler)
  hp = policy_lib.hyper(config, sampler)
  group, n_steps = sampler.group_size, sampler.num_steps
  batch = gc.prompts_per_iteration * group
  per_update = gc.samples_per_update
  keep_means = hp.distill_coef > 0 or hp.logprob_mean == "guided"
  need_prm = policy_lib.uses_prm(config, arrs)
  reward_names = [name for name, _ in gc.rewards]
  k_trained = grpo.num_trained_steps(n_steps, gc.timestep_fraction)
  n_guided = int(arrs.guided.sum())
  n_scored = int((arrs.scored & ~arrs.guided).sum())
  mesh = parallel.mesh_from_config(config)
  rep = parallel.replicated(mesh)
  b_sh = lambda ndim: parallel.batch_sharding(mesh, ndim)

  # Networks and programs: the stage's own (euphonium_jax/policy.py), built as it builds them.
  log("[bench] loading networks")
  nets = bundles.get(config)
  vae, text, model, source = nets.load_networks("/nonexistent-workdir", mesh)
  model_g, model_p, model_r = model
  prm = nets.load_prm(stage.prm_dir(config, "/nonexistent"), mesh) if need_prm else None
  pol = policy_lib.make_policy(config, nets, mesh, model_g, vae[0],
                               None if prm is None else prm[0])
  frozen, frozen_sh = policy_lib.frozen_inputs(vae, model_r, prm, mesh)
  tx = policy_lib.make_tx(config)
  p_sh = nets.model_param_shardings(mesh)
  state, state_sh = policy_lib.init_state(pol, tx, model_p, p_sh, nets.reference_params)
  encode = nets.text_encoder(text, mesh)
  mem = {"networks loaded": peak_memory()}

  def make_rollout_program(cfg):
    return policy_lib.make_rollout_program(dataclasses.replace(pol, sampler=cfg), p_sh,
                                           frozen_sh)

  key = jax.random.key(config.seed)
  k_prompts, k_roll, k_steps, k_perm = jax.random.split(key, 4)
  prompts_p, meta_p = stage.iteration_prompts(config, prompts_lib.load(
      config.data.prompts, seed=config.seed, test_fraction=config.data.test_fraction),
      k_prompts, 0)
  table = stage.cond_table(config, encode, prompts_p, meta_p, nets.null_prompt)
  pidx = np.repeat(np.arange(len(prompts_p), dtype=np.int32), group)
  prompts = [prompts_p[i] for i in pidx]
  prompt_index = parallel.global_array(pidx, b_sh(1))
  # The update donates its state: the other programs get their own copy of the parameters.
  params = jax.tree.map(jnp.copy, state["params"])
  roll_args = (params, frozen, table, prompt_index, k_roll)

  rows = {}  # name -> dict(lower, compile, flops, flops_raw, bytes, temp, fn, note)
  programs = {}
  for name, cfg in (("rollout guided", sampler), ("rollout unguided", plain)):
    log(f"[bench] compiling {name}")
    compiled, lo, co = compile_timed(make_rollout_program(cfg), *roll_args)
    programs[name] = dict(whiles=while_loops(compiled),
                          callbacks=compiled.as_text().count("callback"))
    f, b = cost(compiled)
    rows[name] = dict(lower=lo, compile=co, flops_raw=f, bytes_raw=b, temp=temp_bytes(compiled),
                      fn=lambda c=compiled: c(*roll_args))
  t0 = time.perf_counter()
  outs = jax.block_until_ready(rows["rollout guided"]["fn"]())
  first_guided = time.perf_counter() - t0
  jax.block_until_ready(rows["rollout unguided"]["fn"]())
  mem["rollouts run"] = peak_memory()

  # A realistic update batch from the guided rollout, as the stage builds it.
  log("[bench] scoring rewards, compiling the update")
  frames = parallel.to_host(outs["frames"])
  extra = {stage.PRM_FINAL: parallel.to_host(outs[stage.PRM_FINAL])} if (
      stage.PRM_FINAL in outs) else {}
  r = stage.score_rewards(reward_names, frames, prompts, extra)
  prep = policy_lib.make_prepare_program(pol)(parallel.global_array(r, rep),
                                              outs["process_rewards"], outs.get("sde_mask"),
                                              k_steps, k_perm)
  data = policy_lib.update_data(pol, outs, prep, prompt_index)
  idx = prep["orders"][0]
  update_step = policy_lib.make_update_step(pol, tx, state_sh, frozen_sh)
  compiled, lo, co = compile_timed(update_step, state, data, idx, frozen, table)
  f, b = cost(compiled)
  programs["GRPO update step"] = dict(whiles=while_loops(compiled))
  mem["update compiled"] = peak_memory()
  holder = [state]

  def run_update(c=compiled):
    holder[0], met = c(holder[0], data, idx, frozen, table)  # the state is donated
    return met

  rows["GRPO update step"] = dict(lower=lo, compile=co, flops_raw=f, bytes_raw=b,
                                  temp=temp_bytes(compiled), fn=run_update)
  met = jax.device_get(jax.block_until_ready(run_update()))
  mem["update run"] = peak_memory()

  # Parts: one trip of each loop body, compiled alone (FLOP corrections, roofline).
  log("[bench] compiling parts")
  x = outs["latents"][:, n_steps // 2]
  t_b = jnp.full((batch,), float(arrs.t[n_steps // 2]), jnp.float32)
  cond = policy_lib.gather_cond(table, prompt_index)
  i0 = int(np.argmax(arrs.guided)) if n_guided else 0

  def one_step(p, fr, x, c, k):
    v = pol.velocity(fr)(p, x, jnp.full((batch,), arrs.t[i0], jnp.float32), c)
    noise = sampling.standard_normal(jax.random.fold_in(k, i0), x.shape)
    out = sampling.sde_step(x, v, arrs.t[i0], arrs.t[i0 + 1], arrs.g[i0], noise,
                            logprob_mean=sampler.logprob_mean)
    return out.sample, out.logprob, sampling.x0_hat(x, v, arrs.t[i0])

  def prm_value_and_grad(pp, x, t, c):
    def total(y):
      r = pol.prm_fn(pp, y, t, c).astype(jnp.float32)
      return jnp.sum(r), r
    (_, r), g = jax.value_and_grad(total, has_aux=True)(x)
    return (sampling.normalize_grad(g) if sampler.guidance.normalize else g), r

  micro = per_update // gc.accumulation
  mi = jnp.asarray(np.asarray(idx)[:micro])
  mb = grpo.Batch(latents=data["latents"][mi], logprobs=data["logprobs"][mi],
                  adv_outcome=data["adv_outcome"][mi], adv_process=data["adv_process"][mi],
                  steps=data["steps"][mi], cond=policy_lib.gather_cond(table, prompt_index[mi]),
                  means_guided=data["means_guided"][mi] if keep_means else None,
                  guidance=data["guidance"][mi] if keep_means else None)
  grad_fn = jax.value_and_grad(grpo.transition_loss, has_aux=True)
  parts = {
      "velocity fwd": (jax.jit(lambda p, fr, x, t, c: pol.velocity(fr)(p, x, t, c)),
                       (params, frozen, x, t_b, cond)),
      "rollout step": (jax.jit(one_step), (params, frozen, x, cond, k_roll)),
      "decode": (jax.jit(pol.decode), (frozen["vae"], x)),
      "transition grad": (
          jax.jit(lambda p, fr, mb: grad_fn(p, fr["ref"], mb, 0, pol.velocity(fr), arrs, hp)),
          (params, dict(frozen, ref=params), mb)),
  }
  if pol.prm_fn is not None:
    parts["PRM fwd"] = (jax.jit(pol.prm_fn), (frozen["prm"], x, t_b, cond))
    parts["PRM value+grad"] = (jax.jit(prm_value_and_grad), (frozen["prm"], x, t_b, cond))
  part_rows = {}
  for name, (fn, args) in parts.items():
    compiled, lo, co = compile_timed(fn, *args)
    f, b = cost(compiled)
    part_rows[name] = dict(lower=lo, compile=co, flops=f, bytes=b, temp=temp_bytes(compiled),
                           fn=lambda c=compiled, a=args: c(*a))
    jax.block_until_ready(part_rows[name]["fn"]())

  # FLOP corrections (see the module doc).
  once = scan_counts_once()
  f_step = part_rows["rollout step"]["flops"]
  f_vg = part_rows["PRM value+grad"]["flops"] if "PRM value+grad" in part_rows else 0.0
  f_pf = part_rows["PRM fwd"]["flops"] if "PRM fwd" in part_rows else 0.0
  f_tr = part_rows["transition grad"]["flops"]
  for name, n_g, n_s in (("rollout guided", n_guided, n_scored),
                         ("rollout unguided", 0, int(plain.score_unguided_steps) * n_steps)):
    row = rows[name]
    extra_f = 0.0
    if once:
      extra_f = (n_steps - 1) * f_step
      if n_g:
        extra_f += (n_g - 1) * f_vg + n_s * f_pf
      elif n_s:
        extra_f += (n_s - 1) * f_pf
    row["flops"] = row["flops_raw"] + extra_f
    row["how"] = f"XLA + {'corrected' if once else 'as counted'}"
  n_trans = gc.accumulation * k_trained
  row = rows["GRPO update step"]
  row["flops"] = row["flops_raw"] + ((n_trans - 1) * f_tr if once else 0.0)
  row["how"] = f"XLA + {'corrected' if once else 'as counted'}"

  # Machine: matmul peaks, model-shaped matmuls, memory bandwidth.
  log("[bench] compiling matmuls")
  ka, kb = jax.random.split(jax.random.key(1))
  mcfg = embedded.network_configs(config).model
  shape = pol.shape
  tokens = int(np.prod([s // p for s, p in zip(mcfg.latent_shape, mcfg.patch_size)]))
  width, heads = int(mcfg.width), int(mcfg.heads)
  mat = lambda m, k, n, dt: (jax.random.normal(ka, (m, k)).astype(dt),
                             jax.random.normal(kb, (k, n)).astype(dt))
  dot32 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  att = jax.jit(lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k))
  hd = width // heads
  q = jax.random.normal(ka, (batch, heads, tokens, hd))
  bw_n = (8 if _QUICK.value else 32) * 2**20
  bw_box = [jnp.ones((bw_n,), jnp.float32)]
  stream = jax.jit(lambda a: a * 0.5 + 1.0, donate_argnums=0)

  def run_stream(c):  # in place (donated): no fresh output pages to fault in per call
    bw_box[0] = c(bw_box[0])
    return bw_box[0]
  machine_rows = {
      f"matmul f32 {size}^3": (dot32, mat(size, size, size, jnp.float32), 2.0 * size**3),
      f"matmul bf16->f32 {size}^3": (dot32, mat(size, size, size, jnp.bfloat16), 2.0 * size**3),
      f"matmul f32 {batch * tokens}x{width}x{4 * width}": (
          dot32, mat(batch * tokens, width, 4 * width, jnp.float32),
          2.0 * batch * tokens * width * 4 * width),
      f"attention QK^T f32 {batch * heads}x({tokens}x{hd}x{tokens})": (
          att, (q, q), 2.0 * batch * heads * tokens * tokens * hd),
      f"stream f32 {bw_n * 4 // 2**20} MiB in place": (stream, (bw_box[0],), 0.0),
  }
  m_rows = {}
  for name, (fn, args, f) in machine_rows.items():
    compiled, lo, co = compile_timed(fn, *args)
    m_rows[name] = dict(lower=lo, compile=co, flops=f, fn=lambda c=compiled, a=args: c(*a))
    if name.startswith("stream"):
      m_rows[name]["fn"] = lambda c=compiled: run_stream(c)
    jax.block_until_ready(m_rows[name]["fn"]())
  mem["parts and matmuls"] = peak_memory()

  # Timing: every program once per round, rounds interleaved.
  log(f"[bench] timing, {repeats} rounds")
  fns = {n: r_["fn"] for n, r_ in {**rows, **part_rows, **m_rows}.items()}
  timings = wall_times(fns, repeats)

  # ------------------------------------------------------------------------ Report
  name32, name16 = f"matmul f32 {size}^3", f"matmul bf16->f32 {size}^3"
  peak32 = m_rows[name32]["flops"] / timings[name32][0]
  peak16 = m_rows[name16]["flops"] / timings[name16][0]
  bw_name = [n for n in m_rows if n.startswith("stream")][0]
  bandwidth = 2 * bw_n * 4 / timings[bw_name][0]  # read + write
  balance = peak32 / bandwidth
  gf = lambda v: f"{v / 1e9:9.3f}"
  pct = lambda v: f"{100 * v:5.1f}%"
  lines = [
      f"bench_grpo: {machine(load_start)}",
      f"config: {config_flags.get_config_filename(flags.FLAGS['config'])} "
      f"{'(--quick) ' if _QUICK.value else ''}| sampler {sampler.name}: N = {n_steps}, "
      f"guided steps = {n_guided} ({sampler.guidance.mode}), scored-only steps = {n_scored} | "
      f"batch {gc.prompts_per_iteration} prompts x G {group} = {batch}, latent "
      f"{list(shape)}, model width {width} depth {mcfg.depth}, {tokens} tokens/sample, "
      f"dtype {mcfg.dtype}",
      f"update: {per_update} samples/step x K = {k_trained} transitions "
      f"(timestep_fraction {gc.timestep_fraction}), accumulation {gc.accumulation}, "
      f"advantages {gc.advantage_mode}, kl {hp.kl_coef}, distill {hp.distill_coef}, "
      f"cfg_scale {gc.cfg_scale} | median of {repeats} (interleaved rounds, after 1 warm-up)",
      "rollout rows = the stage's rollout_program: N-step scan + PRM guidance + VAE decode "
      "of the scored latent (decode INCLUDED) + finite flag; one jitted program each",
      "",
      "| program                            | lower s | compile s | median s |  min s  |"
      "  GFLOP    | FLOPs counted as          | GFLOP/s | %f32 pk | %bf16 pk | temp MiB |",
      "|------------------------------------|---------|-----------|----------|---------|"
      "-----------|---------------------------|---------|---------|----------|----------|",
  ]

  def table_row(name, row, how):
    med, mn = timings[name]
    f = row.get("flops", float("nan"))
    rate = f / med if f == f and f > 0 else float("nan")
    tmp = row.get("temp", float("nan")) / 2**20
    lines.append(f"| {name:34s} | {row['lower']:7.2f} | {row['compile']:9.2f} | {med:8.4f} | "
                 f"{mn:7.4f} | {gf(f)} | {how:25s} | {rate / 1e9:7.2f} | "
                 f"{pct(rate / peak32):>7s} | {pct(rate / peak16):>8s} | {tmp:8.1f} |")
    return rate

  rates = {}
  for name, row in rows.items():
    rates[name] = table_row(name, row, row["how"])
  for name, row in part_rows.items():
    rates[name] = table_row(name, row, "XLA (no loop)")
  for name, row in m_rows.items():
    rates[name] = table_row(name, row, "analytic 2mkn" if row["flops"] else "(bandwidth: below)")

  g_med, u_med = timings["rollout guided"][0], timings["rollout unguided"][0]
  up_med = timings["GRPO update step"][0]
  lines += [
      "",
      f"FLOP counting: XLA cost_analysis counts a scan body once: {once} (toy check); "
      f"raw XLA GFLOP guided {gf(rows['rollout guided']['flops_raw']).strip()}, unguided "
      f"{gf(rows['rollout unguided']['flops_raw']).strip()}, update "
      f"{gf(rows['GRPO update step']['flops_raw']).strip()}; corrected with one compiled "
      f"trip: step {gf(f_step).strip()}, PRM value+grad {gf(f_vg).strip()}, transition grad "
      f"{gf(f_tr).strip()} GFLOP (x{n_steps - 1}, x{max(n_guided - 1, 0)}, x{n_trans - 1} "
      "added)",
      f"one compiled program: guided rollout = 1 executable, {programs['rollout guided']['whiles']}"
      f", {programs['rollout guided']['callbacks']} host callbacks (first call incl. dispatch "
      f"{first_guided:.3f} s); update = 1 executable, {programs['GRPO update step']['whiles']}",
      f"guidance overhead: guided / unguided = {g_med / u_med:.3f} "
      f"(from the minima {timings['rollout guided'][1] / timings['rollout unguided'][1]:.3f}); "
      f"FLOP ratio {rows['rollout guided']['flops'] / rows['rollout unguided']['flops']:.3f}",
      f"update: {up_med:.4f} s per optimiser step = {1e3 * up_med / (per_update * k_trained):.3f}"
      f" ms per trained transition ({per_update} x {k_trained}); "
      f"{1e3 * up_med / per_update:.2f} ms per sample; loss {float(met['loss']):.4g}, "
      f"skipped {int(met['skipped'])}",
      f"iteration estimate: guided rollout + {batch // per_update * gc.inner_epochs} update "
      f"step(s) = {g_med + batch // per_update * gc.inner_epochs * up_med:.3f} s "
      "(reward scoring on the host not included)",
      f"peak: f32 {peak32 / 1e9:.1f} GFLOP/s, bf16->f32 {peak16 / 1e9:.1f} GFLOP/s "
      f"({peak16 / peak32:.2f}x f32); memory bandwidth (XLA stream x * 0.5 + 1 in place, "
      f"read + write) "
      f"{bandwidth / 1e9:.1f} GB/s; machine balance {balance:.1f} FLOP/byte (f32)",
      "memory: " + "; ".join(f"after {k}: {v}" for k, v in mem.items()),
      "",
      "roofline of the parts (XLA bytes accessed, an upper bound on traffic after fusion):",
  ]
  for name, row in part_rows.items():
    ai = row["flops"] / row["bytes"] if row["bytes"] > 0 else float("nan")
    bound = min(peak32, ai * bandwidth)
    lines.append(f"  {name:16s} {ai:7.1f} FLOP/byte -> roofline bound {bound / 1e9:7.1f} GFLOP/s "
                 f"({pct(bound / peak32).strip()} of f32 peak); achieved "
                 f"{rates[name] / 1e9:7.1f} GFLOP/s ({pct(rates[name] / peak32).strip()})")
  t_vg = timings["PRM value+grad"][0] if "PRM value+grad" in timings else 0.0
  t_pf = timings["PRM fwd"][0] if "PRM fwd" in timings else 0.0
  t_st, t_dec = timings["rollout step"][0], timings["decode"][0]
  parts_g = n_steps * t_st + n_guided * t_vg + n_scored * t_pf + t_dec
  parts_u = n_steps * t_st + t_dec
  lines.append(f"  sum of the parts (N step + n_guided PRM value+grad + decode): guided "
               f"{parts_g:.4f} s (measured / parts {g_med / parts_g:.2f}), unguided "
               f"{parts_u:.4f} s ({u_med / parts_u:.2f}); update {n_trans} x transition grad "
               f"{n_trans * timings['transition grad'][0]:.4f} s "
               f"({up_med / (n_trans * timings['transition grad'][0]):.2f})")
  if "decode" in part_rows:
    dec_s = timings["decode"][0]
    lines.append(f"  decode share of the guided rollout: {100 * dec_s / g_med:.1f}% of time, "
                 f"{100 * part_rows['decode']['flops'] / rows['rollout guided']['flops']:.1f}% "
                 "of FLOPs")

  target = _TARGET.value
  lines += ["", f"target: rollout and update at >= {100 * target:.0f}% of the measured f32 "
            "matmul peak"]
  below = []
  for name in ("rollout guided", "rollout unguided", "GRPO update step"):
    frac = rates[name] / peak32
    ok = frac >= target
    below += [] if ok else [name]
    lines.append(f"  {name:18s} {pct(frac)} of f32 peak, {pct(rates[name] / peak16)} of bf16 "
                 f"peak: {'MET' if ok else 'NOT MET'}")
  if below:
    mm = [n for n in m_rows if n.startswith(f"matmul f32 {batch * tokens}x")][0]
    an = [n for n in m_rows if n.startswith("attention")][0]
    ai = lambda n: part_rows[n]["flops"] / part_rows[n]["bytes"]
    of = lambda n: pct(rates[n] / peak32).strip()
    vg = (f", the PRM value+grad {of('PRM value+grad')} ({ai('PRM value+grad'):.1f} FLOP/byte)"
          if "PRM value+grad" in part_rows else "")
    low = [n for n in part_rows if ai(n) < balance]
    bw = (f"not memory bandwidth (every part's arithmetic intensity is above the machine "
          f"balance {balance:.1f} FLOP/byte)" if not low else
          f"memory bandwidth in part ({', '.join(low)} below the machine balance "
          f"{balance:.1f} FLOP/byte)")
    slow = [f"{n} {of(n)} ({ai(n):.1f} FLOP/byte)" for n in part_rows
            if rates[n] / peak32 < target]
    fwd = rates["velocity fwd"]
    lines.append(
        f"  limits: {bw}. The model's main matmul shape [{batch * tokens}x{width}]x[{width}x"
        f"{4 * width}] runs at {of(mm)} of the peak, attention QK^T ({tokens}x{hd} per head) "
        f"at {of(an)}. Parts below the target: {'; '.join(slow) or 'none'}. The backward "
        f"passes (PRM value+grad on the guided steps, the transition value+grad that is the "
        f"update's unit) run at {rates['transition grad'] / fwd:.2f}x the velocity forward's "
        f"rate ({of('velocity fwd')}, {ai('velocity fwd'):.1f} FLOP/byte): weight-gradient and "
        "transposed matmuls, the attention backward and the elementwise gradients of layer "
        "norm, GELU, softmax and the loss, at lower arithmetic intensity.")
  lines.append(f"load avg at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
  out = "\n".join(lines)
  print(out, flush=True)


if __name__ == "__main__":
  app.run(main)
