"""The GRPO update under data + FSDP sharding and across processes (DESIGN.md section 4).

1. The jitted, sharded update step of the `grpo` stage on an 8-device (data 4 x fsdp 2) mesh
   equals a naive single-device implementation written here from the formulas (loops over
   samples and trained transitions, the Gaussian log-prob of DESIGN.md section 3, the clipped
   losses, the exact kernel KL and the distillation term), and keeps its declared shardings.
2. Two `jax.distributed` processes of 2 CPU devices each run the `grpo` stage of the tiny
   config and end with the parameters of one process with 4 devices.
"""

import dataclasses
import math
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from euphonium_jax import bundles, checkpoint, embedded, parallel, report, sampling, training
from euphonium_jax import policy as policy_lib
from euphonium_jax.rl import grpo
from conftest import tiny_world_config as tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def perturb(tree, key, scale):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def host(tree):
  return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)


# --------------------------------------------------------------------- 1. naive reference


def make_naive_transition(velocity, hp):
  """The loss of ONE transition (sample j, step k) written out from the formulas (DESIGN.md
  sections 3 and 4), float32, no rl/grpo.py helpers, and its gradient (`jax.value_and_grad`
  on one device; jitted once, called per transition)."""

  def transition(params, ref, x, x_next, t, t_next, g, old, adv_outcome, adv_process, guided,
                 mean_guided, cond):
    dt = t - t_next
    v = velocity(params, x[None], t[None], cond)[0]
    # The unguided Gaussian kernel of step k and the log-density of the stored sample.
    drift = v + (g * g / (2.0 * t)) * (x + (1.0 - t) * v)
    mean = x - dt * drift
    std = g * jnp.sqrt(dt)
    z = (x_next - mean) / std
    lp = jnp.mean(-0.5 * z * z - jnp.log(std) - 0.5 * math.log(2.0 * math.pi))
    ratio = jnp.exp(lp - old)
    lo, hi = 1.0 - hp.clip_range, 1.0 + hp.clip_range
    clipped = lambda a: jnp.maximum(-a * ratio, -a * jnp.clip(ratio, lo, hi))
    policy = 0.0
    for i, w in enumerate(hp.outcome_weights):
      policy = policy + hp.outcome_coef * w * clipped(adv_outcome[i])
    policy = policy + hp.process_coef * clipped(adv_process)
    # Exact KL between the kernels of v and of the frozen reference velocity.
    v_ref = jax.lax.stop_gradient(velocity(ref, x[None], t[None], cond)[0])
    kl = (dt / (2.0 * g * g) * (1.0 + g * g * (1.0 - t) / (2.0 * t)) ** 2
          * jnp.mean((v - v_ref) ** 2))
    # Distillation to the rollout's (held fixed) guided mean, on guided steps only.
    dist = guided * jnp.mean((mean - jax.lax.stop_gradient(mean_guided)) ** 2) / (2.0 * g * g * dt)
    loss = policy + hp.kl_coef * kl + hp.distill_coef * dist
    return loss, {"lp": lp, "ratio": ratio, "policy": policy, "kl": kl, "dist": dist}

  return jax.jit(jax.value_and_grad(transition, has_aux=True))


def naive_objective(params, ref, transition, data, idx, text_table, arrs, hp):
  """Loss, metrics, ratios and gradient of one optimiser step: a Python loop over the
  selected samples and each one's trained transitions, averaged over all M x K of them (the
  gradient of the mean is the mean of the per-transition gradients)."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  outs = []
  for j in (int(i) for i in idx):
    cond = {name: a[data["combo"][j]][None] for name, a in text_table.items()}
    for k in (int(s) for s in data["steps"][j]):
      outs.append(transition(
          params, ref, f32(data["latents"][j, k]), f32(data["latents"][j, k + 1]),
          f32(arrs.t[k]), f32(arrs.t[k + 1]), f32(arrs.g[k]), f32(data["logprobs"][j, k]),
          f32(data["adv_outcome"][j]), f32(data["adv_process"][j, k]), f32(arrs.guided[k]),
          f32(data["means_guided"][j, k]), cond))
  n = len(outs)
  avg = lambda xs: sum(xs) / n
  grad = jax.tree.map(lambda *g: sum(g) / n, *[o[1] for o in outs])
  outs = [o[0] for o in outs]
  ratios = [o[1]["ratio"] for o in outs]
  olds = [data["logprobs"][j, k] for j in idx for k in data["steps"][j]]
  ratio_mean = avg(ratios)
  metrics = {
      "loss": avg([o[0] for o in outs]),
      "policy_loss": avg([o[1]["policy"] for o in outs]),
      "kl": avg([o[1]["kl"] for o in outs]),
      "distill": avg([o[1]["dist"] for o in outs]),
      "ratio_mean": ratio_mean,
      "ratio_std": np.std(np.asarray(jax.device_get(ratios), np.float64)),
      "clip_fraction": avg([(jnp.abs(r - 1.0) > hp.clip_range).astype(jnp.float32)
                            for r in ratios]),
      "approx_kl": 0.5 * avg([(o[1]["lp"] - old) ** 2 for o, old in zip(outs, olds)])}
  return metrics, jnp.stack(ratios), grad


def test_update_on_8_devices_matches_naive():
  cfg = tiny_config()
  sampler = sampling.sampler_config_from(cfg.sampling)
  arrs = sampling.grid_arrays(sampler)
  assert sampler.num_steps == 6 and sampler.group_size == 4 and arrs.guided.any()
  shape = tuple(embedded.latent_shape(cfg))

  # Networks: the policy, a frozen text table and a PRM for the guided rollout.
  model_g, p0, model_r = embedded.split_params(embedded.build("model", cfg, seed=0))
  velocity_net = embedded.velocity_fn(model_g)
  text_g, text_p, text_r = embedded.split_params(embedded.build("text", cfg, seed=1))
  table = embedded.prompt_table(cfg)
  text_table = jax.jit(embedded.text_fn(text_g))((text_p, text_r), table.ids, table.mask)
  prm_g, prm_p, prm_r = embedded.split_params(embedded.build("prm", cfg, seed=2))
  prm_fn = embedded.prm_fn(prm_g)
  velocity = lambda p, x, t, c: velocity_net((p, model_r), x, t, c)

  # A guided rollout at p0: 6 prompts x a group of 4 = 24 rollouts, 16 of them trained.
  n_prompts, n_steps = 6, sampler.num_steps
  batch, per_update, accumulation = n_prompts * sampler.group_size, 16, 2
  key = jax.random.key(0)
  k_combo, k_roll, k_adv, k_steps, k_idx, k_perturb = jax.random.split(key, 6)
  combo = np.repeat(np.asarray(jax.random.randint(k_combo, (n_prompts,), 0,
                                                  table.null_index)), sampler.group_size)
  cond = jax.tree.map(lambda a: a[combo], text_table)
  roll = sampling.make_rollout(velocity, prm_fn, sampler, keep_means=True)
  res = jax.jit(roll, static_argnums=4)(p0, (prm_p, prm_r), k_roll, cond, (batch,) + shape)
  ka, kp = jax.random.split(k_adv)
  data = host({"latents": res.latents, "logprobs": res.logprobs,
               "means_guided": res.means_guided, "guidance": res.guidance,
               "adv_outcome": jax.random.normal(ka, (batch, 2)),
               "adv_process": jax.random.normal(kp, (batch, n_steps)),
               "steps": grpo.select_steps(k_steps, batch, n_steps, 0.6),
               "combo": jnp.asarray(combo, jnp.int32)})
  assert data["steps"].shape == (batch, 3) and data["steps"].max() <= n_steps - 2
  # The PRM moved the guided steps' means (D_k is not trivially 0), and only those.
  assert np.abs(data["guidance"][:, arrs.guided]).max() > 0
  assert np.abs(data["guidance"][:, ~arrs.guided]).max() == 0
  idx = np.asarray(jax.random.choice(k_idx, batch, (per_update,), replace=False), np.int32)

  # Trained parameters moved away from the rollout's (ratio != 1, some ratios clipped) and
  # from the KL reference p0 (KL != 0).
  p1 = host(perturb(p0, k_perturb, 0.03))
  p0 = host(p0)
  hp = grpo.Hyper(mode="both", distill_coef=0.5, kl_coef=0.1, outcome_weights=(1.0, 0.5),
                  clip_range=0.019)
  lr, grad_clip, b1 = 1e-2, 0.05, 0.9
  tx = training.optimizer(lr, 0, 1e-4, grad_clip, b1, 0.999)

  # ---- Naive single-device reference: loss, metrics, gradient, then the same AdamW step.
  dev0 = jax.devices()[0]
  on_dev0 = lambda tree: jax.device_put(tree, dev0)
  n_met, n_ratios, n_grad = host(naive_objective(
      on_dev0(p1), on_dev0(p0), make_naive_transition(velocity, hp), data, idx,
      host(text_table), arrs, hp))
  n_norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in jax.tree.leaves(n_grad)))
  n_met["grad_norm"] = n_norm
  n_params, n_opt = host(jax.jit(lambda g, p: (
      lambda u, o: (optax.apply_updates(p, u), o))(*tx.update(g, tx.init(p), p)))(
          on_dev0(n_grad), on_dev0(p1)))
  # The test exercises both branches of the clipped loss and the gradient clip.
  assert 0.2 < n_met["clip_fraction"] < 0.8, n_ratios
  gap = np.min(np.abs(np.abs(n_ratios - 1.0) - hp.clip_range))
  assert gap > 1e-4, "a ratio sits on the clip boundary: pick another clip_range"
  assert n_norm > 2 * grad_clip and n_met["kl"] > 0 and n_met["distill"] > 0

  # ---- The stage's sharded update on a data 4 x fsdp 2 mesh.
  mesh = parallel.make_mesh((4, 2), ("data", "fsdp"))
  rules = cfg.sharding.rules
  rep = parallel.replicated(mesh)
  p_sh = training.param_shardings(embedded.abstract("model", cfg), mesh, rules)
  state_sh = {"params": p_sh, "opt": training.opt_shardings(tx, p1, p_sh, mesh), "ref": p_sh,
              "step": rep, "nonfinite": rep, "ema": p_sh}
  split = [s.spec for s in jax.tree.leaves(p_sh) if "fsdp" in jax.tree.leaves(tuple(s.spec))]
  assert split, "no parameter is split over fsdp"
  b_sh = lambda ndim: parallel.batch_sharding(mesh, ndim)
  data_keys = ("latents", "logprobs", "means_guided", "guidance", "adv_outcome",
               "adv_process", "steps", "combo")
  data_sh = {k: b_sh(data[k].ndim) for k in data_keys}
  state = training.place({"params": p1, "opt": tx.init(p1), "ref": p0,
                          "step": np.zeros((), np.int32), "nonfinite": np.zeros((), np.int32),
                          "ema": p0}, state_sh)
  bundle = bundles.get(cfg)
  pol = dataclasses.replace(
      policy_lib.make_policy(cfg, bundle, mesh, model_g,
                             embedded.split_params(embedded.abstract("vae", cfg))[0], prm_g),
      hp=hp, keep_means=True)
  cfg.grpo.accumulation = accumulation
  cfg.grpo.ema_decay = 0.75  # the EMA of the policy moves after the step
  data["prompt"] = data.pop("combo")
  data_keys = tuple("prompt" if k == "combo" else k for k in data_keys)
  data_sh = policy_lib.data_shardings(pol)
  assert set(data_sh) == set(data_keys)
  frozen = jax.device_put({"vae": None, "model_rest": model_r, "prm": None}, rep)
  update_step = policy_lib.make_update_step(pol, tx, state_sh, jax.tree.map(
      lambda a: rep, frozen))
  new_state, met = update_step(
      state, {k: parallel.global_array(data[k], data_sh[k]) for k in data_keys},
      parallel.global_array(idx, rep), frozen, jax.device_put({"text": text_table}, rep))

  # (a) Every output leaf has its declared sharding; parameters really are split.
  flat_out = jax.tree_util.tree_flatten_with_path(new_state)[0]
  flat_sh = jax.tree.leaves(state_sh)
  assert len(flat_out) == len(flat_sh)
  for (path, leaf), sh in zip(flat_out, flat_sh):
    assert leaf.sharding.is_equivalent_to(sh, leaf.ndim), (jax.tree_util.keystr(path),
                                                           leaf.sharding, sh)
  kernel = new_state["params"]["blocks"][0]["fc1"]["kernel"]
  assert kernel.sharding.spec[0] == "fsdp"
  assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 2, kernel.shape[1])

  # (b) Loss, metrics, gradient, optimiser state and parameters equal the naive ones.
  met = host(met)
  assert int(met.pop("skipped")) == 0
  assert set(met) == set(n_met), (sorted(met), sorted(n_met))
  for name in met:
    tol = dict(rtol=1e-4, atol=1e-6) if name == "ratio_std" else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(met[name], n_met[name], err_msg=name, **tol)
  new_state = host(new_state)
  mu = new_state["opt"][1][0].mu  # the clipped gradient times (1 - b1)
  grad = jax.tree.map(lambda m: m / (1 - b1) * (n_norm / grad_clip), mu)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(n_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(new_state["opt"]), jax.tree.leaves(n_opt)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  change = 0.0
  for a, b, p in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(n_params),
                     jax.tree.leaves(p1)):
    # Adam's first step is lr * g / (|g| + 1e-8): an element whose gradient is ~1e-8 turns a
    # rounding difference of g into one of up to ~lr 1e-3 in its step.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3 * lr)
    change = max(change, float(np.max(np.abs(a - p))))
  assert change > 0.5 * lr  # the step is visible
  for e, a, p in zip(jax.tree.leaves(new_state["ema"]), jax.tree.leaves(new_state["params"]),
                     jax.tree.leaves(p0)):
    np.testing.assert_allclose(e, 0.75 * p + 0.25 * a, rtol=1e-6, atol=1e-7)
  for a, b in zip(jax.tree.leaves(new_state["ref"]), jax.tree.leaves(p0)):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ 2. two processes


# Runs `python -m euphonium_jax.main` (same argv) after hooking `checkpoint.save_final` so
# that each process prints a digest of the parameters it holds when the grpo stage writes its
# final checkpoint (a collective: every process gathers the full parameters).
DIGEST_MAIN = r"""
import hashlib, os, runpy, sys
import jax
import numpy as np
from euphonium_jax import checkpoint, parallel

_save_final = checkpoint.save_final

def save_final(directory, tree, info, **kwargs):
  if os.path.normpath(directory).endswith(os.path.join("grpo", "final")):
    leaves = [np.asarray(parallel.to_host(a), np.float32)
              for a in jax.tree.leaves(tree["model"]["params"])]
    sha = hashlib.sha256(b"".join(a.tobytes() for a in leaves)).hexdigest()[:16]
    sumsq = sum(float(np.sum(a.astype(np.float64) ** 2)) for a in leaves)
    print(f"DIGEST process={jax.process_index()} processes={jax.process_count()} "
          f"devices={jax.device_count()} sha={sha} sumsq={sumsq:.12e}", flush=True)
  return _save_final(directory, tree, info, **kwargs)

checkpoint.save_final = save_final
sys.argv[0] = "euphonium_jax.main"
runpy.run_module("euphonium_jax.main", run_name="__main__", alter_sys=True)
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def load_host(directory):
  """`checkpoint.load_final` of a checkpoint written on another device topology, as numpy
  (orbax cannot rebuild the saved shardings here, so the target is one local device)."""
  import orbax.checkpoint as ocp
  meta = ocp.StandardCheckpointer().metadata(os.path.join(directory, "arrays"))
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree)
  return host(checkpoint.load_final(directory, abstract))




LR = 1e-3  # the grpo stage's learning rate in test 2


def grpo_command(workdir, init):
  return [sys.executable, "-c", DIGEST_MAIN, "--config", TINY, "--workdir", workdir,
          "--config.stages=('grpo',)", f"--config.init.pretrain={init}/pretrain",
          f"--config.init.prm={init}/prm", "--config.mesh.shape=(-1,1)",
          "--config.grpo.iterations=2", "--config.grpo.eval_every=1",
          "--config.grpo.prompts_per_iteration=4", "--config.grpo.samples_per_update=8",
          "--config.grpo.accumulation=2", f"--config.grpo.lr={LR}"]


@pytest.mark.slow
def test_two_processes_agree(tiny_init, tmp_path):
  """2 processes x 2 CPU devices (jax.distributed over localhost, one shared workdir) train
  the same parameters as 1 process x 4 devices, and agree with each other."""
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  port = free_port()
  base = {k: v for k, v in os.environ.items()
          if not k.startswith(("EUPHONIUM_", "JAX_COORDINATOR"))}
  base.update(JAX_PLATFORMS="cpu",
              PYTHONPATH=os.pathsep.join(p for p in (REPO, base.get("PYTHONPATH")) if p))
  env = lambda devices, **kw: dict(
      base, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **kw)
  runs = [(multi, env(2, EUPHONIUM_DISTRIBUTED="1", EUPHONIUM_COORDINATOR=f"localhost:{port}",
                      EUPHONIUM_NUM_PROCESSES="2", EUPHONIUM_PROCESS_ID=str(i)))
          for i in range(2)] + [(single, env(4))]
  logs = [str(tmp_path / f"log_{i}.txt") for i in range(len(runs))]
  procs = []
  try:
    for (workdir, run_env), log in zip(runs, logs):
      with open(log, "w") as f:  # a file, not a pipe: a blocked writer could stall its peer
        procs.append(subprocess.Popen(grpo_command(workdir, tiny_init), cwd=REPO, env=run_env,
                                      stdout=f, stderr=subprocess.STDOUT))
    for p in procs:
      p.wait(timeout=480)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outs = []
  for log in logs:
    with open(log) as f:
      outs.append(f.read())
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-4000:]}"

  # Each process saw 4 global devices and printed the digest of the parameters it holds.
  digests = []
  for i, out in enumerate(outs):
    lines = [l.split() for l in out.splitlines() if l.startswith("DIGEST ")]
    assert len(lines) == 1, out[-4000:]
    d = dict(kv.split("=") for kv in lines[0][1:])
    assert d["devices"] == "4" and d["processes"] == ("2" if i < 2 else "1"), d
    digests.append(d)
  assert [d["process"] for d in digests[:2]] == ["0", "1"]
  assert digests[0]["sha"] == digests[1]["sha"]  # bitwise the same parameters
  np.testing.assert_allclose(float(digests[0]["sumsq"]), float(digests[2]["sumsq"]), rtol=1e-6)

  # The shared workdir's final checkpoint equals the single-process run's (up to the
  # reduction order of the all-reduces: 4 Adam steps of size ~lr amplify rounding of the
  # smallest gradients), and training moved the parameters far beyond that tolerance.
  got, want = load_host(os.path.join(multi, "grpo", "final")), load_host(
      os.path.join(single, "grpo", "final"))
  start = load_host(os.path.join(tiny_init, "pretrain"))
  moved = 0.0
  for a, b, s in zip(jax.tree.leaves(got["model"]["params"]),
                     jax.tree.leaves(want["model"]["params"]),
                     jax.tree.leaves(start["model"]["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3 * LR)
    moved = max(moved, float(np.max(np.abs(a - s))))
  assert moved > LR
  # One consistent set of outputs in the shared workdir: the metrics (written by process 0)
  # match the single-process run's, every update ran, the evaluation ran each iteration.
  rows = lambda d, key: [r for r in report.read_metrics(d, "grpo") if key in r]
  got_rows, want_rows = rows(multi, "loss"), rows(single, "loss")
  assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows] == [1, 2]
  for r, s in zip(got_rows, want_rows):
    assert r["updates"] == 2 and r["skipped"] == 0 and r["skipped_iteration"] == 0
    for key in ("loss", "grad_norm", "ratio_mean", "process_reward"):
      np.testing.assert_allclose(r[key], s[key], rtol=1e-4, atol=1e-7, err_msg=key)
  evals = [(r["step"], r["eval_reward"]) for r in rows(multi, "eval_reward")]
  assert [e[0] for e in evals] == [0, 1, 2]
  np.testing.assert_allclose([e[1] for e in evals],
                             [r["eval_reward"] for r in rows(single, "eval_reward")],
                             rtol=1e-3, atol=1e-6)
  assert sorted(os.listdir(os.path.join(multi, "grpo", "checkpoints"))) == ["1", "2"]
