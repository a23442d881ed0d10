"""The `vae` stage: train the video VAE on clips of the embedded world.

Clips are rendered inside the jitted step from a per-step key, so a resumed run sees exactly
the data an uninterrupted one would. At the end the latent normalisation is measured, and the
stage reports PSNR and the outcome reward's round trip on held-out clips.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from euphonium_jax import checkpoint, embedded, parallel, report, training
from euphonium_jax.data import world
from euphonium_jax.models import vae as vae_lib
from euphonium_jax.rewards import registry as rewards


def stage_dir(workdir: str) -> str:
  return os.path.join(workdir, "vae")


def is_done(workdir: str) -> bool:
  return checkpoint.is_done(os.path.join(stage_dir(workdir), "final"))


def run(config, workdir: str) -> dict:
  tc = config.vae_train
  out = stage_dir(workdir)
  frames_n, size = config.world.frames, config.world.size

  # ---------------------------------------------------------------------------- Mesh
  mesh = parallel.mesh_from_config(config)
  if not parallel.batch_size_ok(tc.batch_size, mesh):
    raise ValueError(f"config.vae_train.batch_size={tc.batch_size} must be divisible by the "
                     f"data-parallel size {parallel.data_parallel_size(mesh)}")

  # --------------------------------------------------------------------------- Model
  module = embedded.build("vae", config, seed=config.seed)
  graphdef, params, rest = embedded.split_params(module)
  tx = training.optimizer(tc.lr, tc.warmup_steps, tc.weight_decay, tc.grad_clip)

  # --------------------------------------------------------------------------- Shard
  p_sh = training.param_shardings(module, mesh, config.sharding.rules)
  rep = parallel.replicated(mesh)
  state_sh = {"params": p_sh, "opt": training.opt_shardings(tx, params, p_sh, mesh),
              "step": rep}
  state = training.place({"params": params, "opt": tx.init(params),
                          "step": jnp.zeros((), jnp.int32)}, state_sh)
  rest = training.place(rest, jax.tree.map(lambda _: rep, rest))
  base_key = jax.random.key(config.seed)
  frames_sh = parallel.batch_sharding(mesh, 5)

  # -------------------------------------------------------------------------- Update
  @functools.partial(jax.jit, in_shardings=(state_sh, None), out_shardings=(state_sh, None),
                     donate_argnums=0)
  def train_step(state, rest):
    key = jax.random.fold_in(base_key, state["step"])
    k_data, k_loss = jax.random.split(key)
    clips, _ = world.sample_batch(k_data, tc.batch_size, "train", frames_n, size)
    clips = jax.lax.with_sharding_constraint(clips, frames_sh)

    def loss_fn(p):
      return vae_lib.vae_loss(nnx.merge(graphdef, p, rest), clips, k_loss, tc.kl_weight)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    params, opt, ok = training.guarded_update(tx, grads, loss, state["params"], state["opt"])
    metrics = dict(metrics, loss=loss, grad_norm=_global_norm(grads), skipped=1 - ok)
    return {"params": params, "opt": opt, "step": state["step"] + 1}, metrics

  # ---------------------------------------------------------------------- Checkpoint
  mgr = checkpoint.manager(os.path.join(out, "checkpoints"))
  state = training.resume(mgr, state, "vae")
  writer = report.MetricWriter(workdir, "vae")

  # ---------------------------------------------------------------------------- Loop
  start = int(state["step"])
  t0 = time.time()
  with training.Preemption() as preempt:
    for step in tqdm.trange(start, tc.steps, initial=start, total=tc.steps, desc="vae",
                            disable=jax.process_index() != 0):
      state, metrics = train_step(state, rest)
      done = step + 1
      training.end_of_step(
          "vae", done, tc.steps, metrics, state, log_every=tc.log_every,
          ckpt_every=tc.ckpt_every, writer=writer, mgr=mgr, preempt=preempt,
          rate=(done - start) / (time.time() - t0))
  train_time = time.time() - t0

  # --------------------------------------------------------------------------- Evals
  model = nnx.merge(graphdef, state["params"], rest)
  results = evaluate_and_normalise(model, config, jax.random.key(config.seed + 1))
  results["train_seconds"] = train_time
  writer.write(tc.steps, {f"eval/{k}": v for k, v in results.items()})
  writer.close()
  _, params, rest = embedded.split_params(model)
  checkpoint.save_final(os.path.join(out, "final"),
                        {"vae": {"params": params, "rest": rest}},
                        dict(results, stage="vae", steps=tc.steps),
                        config_json=config.to_json_best_effort(indent=2))
  print(f"[vae] done: " + ", ".join(f"{k}={v:.4g}" for k, v in results.items()))
  return results


def evaluate_and_normalise(model, config, key) -> dict:
  """Sets the latent normalisation from training clips; PSNR and reward on held-out clips."""
  n, frames_n, size = config.vae_train.eval_clips, config.world.frames, config.world.size
  k_train, k_held = jax.random.split(key)
  clips, _ = world.sample_batch(k_train, n, "train", frames_n, size)
  mean, _ = jax.jit(lambda c: model.encode(c))(clips)
  model.set_latent_stats(mean)

  clips, attrs = world.sample_batch(k_held, n, "heldout", frames_n, size)
  recon = jax.jit(lambda c: model.decode_latents(model.encode_latents(c)))(clips)
  mse = jnp.mean((recon - clips) ** 2, axis=(1, 2, 3, 4))
  psnr = -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))
  reward = rewards.get("shapes_fidelity")
  prompts = world.captions(np.asarray(attrs))
  r_true, r_recon = reward(clips, prompts), reward(recon, prompts)
  return {
      "psnr_db": float(jnp.mean(psnr)),
      "reward_ground_truth": float(jnp.mean(r_true)),
      "reward_reconstruction": float(jnp.mean(r_recon)),
      "reward_abs_change": float(jnp.mean(jnp.abs(r_true - r_recon))),
  }


def _global_norm(tree) -> jax.Array:
  import optax
  return optax.global_norm(tree)
