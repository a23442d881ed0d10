"""The `grpo` stage: post-train the flow model with dual-reward GRPO (DESIGN.md section 4).

Euphonium, DanceGRPO and Flow-GRPO are the same loop with different `config.sampling`
(guidance on / off, the noise schedule) and `config.grpo` (which advantages enter). Each
iteration:

1. samples `prompts_per_iteration` training prompts and expands each into a group of G
   (`sampling.group_size`, optionally sharing one initial noise);
2. rolls them out with the configured sampler, guided by the PRM gradient where configured,
   and decodes the scored latent (one jitted program, sharded over the batch);
3. scores the videos with the outcome reward(s) on the host; a reward that raises stops the
   run with its name, a non-finite reward skips the iteration (counted);
4. computes outcome advantages per group and process advantages per group and step;
5. trains a random subset of each sample's transitions (`timestep_fraction` of steps
   0 .. N - 2, never the last) with the clipped-ratio loss, the kernel KL and distillation, in
   optimiser steps of `samples_per_update` samples (one jitted, sharded update with donated
   state; a non-finite loss or gradient skips the step and is counted);
6. every `eval_every` iterations (and at the start and the end) samples held-out prompts with
   the Euler ODE and NO reward model, and records the mean outcome reward with its standard
   error (the same prompts and noise every time, from `eval.seed`, so runs with other training
   seeds or methods are scored on the same ones) and a video grid.

Randomness: every training key derives from (config.seed, iteration). The rollout draws its noise for
the whole global batch from one replicated key; JAX's partitionable threefry makes each
device compute only its own slice of that draw, so no two devices (or processes) share noise
and the result does not depend on the mesh. Prompt choice and transition subsets are
replicated host computations (every process must agree on them).

Checkpoints (`WORKDIR/grpo/checkpoints`, every `ckpt_every` iterations, and on SIGTERM):
parameters, optimiser state, the KL reference (when `kl_coef > 0`), the RNG, the iteration
(which is also the data position: the prompts of iteration i are a function of (seed, i)) and
the non-finite counter. Resuming reproduces an uninterrupted run exactly.

Outputs: `WORKDIR/grpo/final` (model, VAE and text encoder: a drop-in `init.pretrain` for the
`sample` stage), `WORKDIR/grpo/eval/` (video grids and scores per evaluation),
`WORKDIR/grpo/curves.png`, metrics in `WORKDIR/metrics.jsonl` and TensorBoard.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from euphonium_jax import (checkpoint, embedded, generate, parallel, report, sampling,
                           training)
from euphonium_jax.data import world
from euphonium_jax.rewards import registry as rewards
from euphonium_jax.rl import grpo

PRM_FINAL = "prm_final"


def stage_dir(workdir: str) -> str:
  return os.path.join(workdir, "grpo")


def is_done(workdir: str) -> bool:
  return checkpoint.is_done(os.path.join(stage_dir(workdir), "final"))


def uses_prm(config, arrs: sampling.GridArrays) -> bool:
  g = config.grpo
  return bool(arrs.scored.any() or g.advantage_mode != "none"
              or any(name == PRM_FINAL for name, _ in g.rewards))


def hyper(config, sampler: sampling.SamplerConfig) -> grpo.Hyper:
  g = config.grpo
  return grpo.Hyper(mode=g.advantage_mode, outcome_coef=float(g.outcome_coef),
                    process_coef=float(g.process_coef),
                    outcome_weights=tuple(float(w) for _, w in g.rewards),
                    clip_range=float(g.clip_range), kl_coef=float(g.kl_coef),
                    distill_coef=float(g.distill_coef), logprob_mean=sampler.logprob_mean)


def score_rewards(names, frames: np.ndarray, prompts, extra: dict[str, np.ndarray]) -> np.ndarray:
  """`[T, B]` float32 outcome rewards; a reward that raises stops the run, naming it."""
  rows = []
  for name in names:
    if name in extra:
      rows.append(np.asarray(extra[name], np.float32))
      continue
    try:
      row = np.asarray(rewards.get(name)(jnp.asarray(frames), list(prompts)), np.float32)
    except Exception as e:  # The run must not go on with a made-up reward.
      raise RuntimeError(f"[grpo] the outcome reward {name!r} raised {type(e).__name__}: {e}"
                         ) from e
    if row.shape != (len(prompts),):
      raise RuntimeError(f"[grpo] the outcome reward {name!r} returned shape {row.shape}, "
                         f"expected ({len(prompts)},)")
    rows.append(row)
  return np.stack(rows) if rows else np.zeros((0, len(prompts)), np.float32)


def make_update_step(policy, tx, arrs: sampling.GridArrays, hp: grpo.Hyper, accumulation: int,
                     mesh, state_sh, data_sh, keep_means: bool, frozen_sh=None):
  """The jitted, sharded optimiser step `update_step(state, data, idx, frozen) -> (state,
  metrics)` on the samples `idx` (replicated int `[samples_per_update]`) of one iteration's
  `data` (batch-sharded: latents, logprobs, adv_outcome, adv_process, steps, combo, and
  means_guided / guidance with `keep_means`). `policy(frozen)` returns the velocity
  `(params, x, t, cond)`; `frozen['text']` is the text encoder's output per prompt index.
  State shardings are declared in and out and the state is donated; `frozen_sh` (default
  replicated) are the frozen inputs' shardings (a large frozen base model stays sharded)."""
  rep = parallel.replicated(mesh)
  frozen_sh = rep if frozen_sh is None else frozen_sh

  def constrain(mb: grpo.Batch) -> grpo.Batch:
    return jax.tree.map(
        lambda a: jax.lax.with_sharding_constraint(a, parallel.batch_sharding(mesh, a.ndim)), mb)

  @functools.partial(jax.jit, in_shardings=(state_sh, data_sh, rep, frozen_sh),
                     out_shardings=(state_sh, rep), donate_argnums=0)
  def update_step(state, data, idx, frozen):
    take = lambda a: a[idx]
    cond = jax.tree.map(lambda a: a[take(data["combo"])], frozen["text"])
    mb = grpo.Batch(latents=take(data["latents"]), logprobs=take(data["logprobs"]),
                    adv_outcome=take(data["adv_outcome"]), adv_process=take(data["adv_process"]),
                    steps=take(data["steps"]), cond=cond,
                    means_guided=take(data["means_guided"]) if keep_means else None,
                    guidance=take(data["guidance"]) if keep_means else None)
    update = grpo.make_update(policy(frozen), tx, arrs, hp, accumulation,
                              guard=training.guarded_update, constrain=constrain)
    return update(state, mb)

  return update_step


def run(config, workdir: str) -> dict:
  gc = config.grpo
  out = stage_dir(workdir)
  os.makedirs(out, exist_ok=True)

  # ---------------------------------------------------------------------- Sampler
  sampler = sampling.sampler_config_from(config.sampling)
  arrs = sampling.grid_arrays(sampler)
  hp = hyper(config, sampler)
  group, n_steps = sampler.group_size, sampler.num_steps
  batch = gc.prompts_per_iteration * group  # global rollouts per iteration
  per_update = gc.samples_per_update
  updates_per_epoch = batch // per_update
  keep_means = hp.distill_coef > 0 or hp.logprob_mean == "guided"
  need_prm = uses_prm(config, arrs)
  reward_names = [name for name, _ in gc.rewards]

  # ------------------------------------------------------------------------- Mesh
  mesh = parallel.mesh_from_config(config)
  for key, n in (("grpo.prompts_per_iteration x sampling.group_size", batch),
                 ("grpo.samples_per_update / grpo.accumulation", per_update // gc.accumulation)):
    if not parallel.batch_size_ok(n, mesh):
      raise ValueError(f"config.{key} = {n} must be divisible by the data-parallel size "
                       f"{parallel.data_parallel_size(mesh)}")
  rep = parallel.replicated(mesh)
  b_sh = lambda ndim: parallel.batch_sharding(mesh, ndim)

  # ---------------------------------------------------------------------- Networks
  nets = embedded.bundle(config)  # embedded world or Wan: the same calls
  vae, text, model, source = nets.load_networks(config, workdir, mesh)
  model_g, model_p, model_r = model
  table = nets.prompt_table(config)
  text_table = jax.jit(nets.text_fn(text[0]), out_shardings=rep)(
      text[1:], table.ids, table.mask)  # the frozen text encoder's output for every prompt
  prm_params, prm_fn, prm_source = None, None, None
  if need_prm:
    prm_source = embedded.prm_dir(config, workdir)
    prm_g, prm_p, prm_r = embedded.load("prm", config, prm_source)
    prm_params = jax.device_put((prm_p, prm_r), rep)
    prm_fn = embedded.prm_fn(prm_g)
  rest_sh = jax.tree.map(lambda a: a.sharding if isinstance(a, jax.Array) and len(
      a.sharding.device_set) == mesh.size else rep, model_r)
  frozen = {"text": text_table, "vae": vae[1:], "model_rest": jax.device_put(model_r, rest_sh),
            "prm": prm_params}
  frozen_sh = jax.tree.map(lambda a: a.sharding, frozen)
  null_index = table.null_index
  decode = nets.decode_fn(vae[0])
  shape = tuple(nets.latent_shape(config))

  def policy(frozen):
    """The policy's velocity `(params, x, t, cond)`: CFG-combined when grpo.cfg_scale != 1."""
    null = jax.tree.map(lambda a: a[null_index:null_index + 1], frozen["text"])
    v = embedded.cfg_velocity(nets.velocity_fn(model_g), gc.cfg_scale, null)
    return lambda p, x, t, c: v((p, frozen["model_rest"]), x, t, c)

  # ------------------------------------------------------------------------- State
  tx = training.optimizer(gc.lr, gc.warmup_steps, gc.weight_decay, gc.grad_clip, gc.b1, gc.b2)
  p_sh = nets.model_param_shardings(config, mesh)
  state_sh = {"params": p_sh, "opt": training.opt_shardings(tx, model_p, p_sh, mesh),
              "step": rep, "nonfinite": rep, "rng": rep}
  state = {"params": model_p, "opt": jax.jit(tx.init)(model_p),
           "step": jnp.zeros((), jnp.int32), "nonfinite": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(jax.random.key(config.seed))}
  if hp.kl_coef > 0:
    state_sh["ref"] = p_sh
    state["ref"] = nets.reference_params(config, model_p)  # own buffers: state is donated
  state = training.place(state, state_sh)

  # ----------------------------------------------------------------------- Rollout
  data_keys = ["latents", "logprobs", "process_rewards"] + (
      ["means_guided", "guidance"] if keep_means else [])
  roll_out_sh = {"latents": b_sh(6), "logprobs": b_sh(2), "process_rewards": b_sh(2),
                 "frames": b_sh(5), "finite": rep}
  if keep_means:
    roll_out_sh.update(means_guided=b_sh(6), guidance=b_sh(6))
  if PRM_FINAL in reward_names:
    roll_out_sh[PRM_FINAL] = b_sh(1)

  @functools.partial(jax.jit, in_shardings=(p_sh, frozen_sh, rep, b_sh(1)),
                     out_shardings=roll_out_sh)
  def rollout_program(params, frozen, key, combo):
    """Guided (or not) rollout of the batch, the decoded scored latent, and a finite flag."""
    cond = jax.tree.map(lambda a: a[combo], frozen["text"])
    roll = sampling.make_rollout(policy(frozen), prm_fn, sampler, b_sh(5), keep_means)
    res = roll(params, frozen["prm"], key, cond, (batch,) + shape)
    scored = res.x0_hat if gc.score == "x0_hat" else res.latents[:, -1]
    res_d = res._asdict()
    outs = {k: res_d[k] for k in data_keys}
    outs["frames"] = decode(frozen["vae"], scored)
    if PRM_FINAL in reward_names:
      outs[PRM_FINAL] = prm_fn(frozen["prm"], scored, jnp.zeros((batch,), jnp.float32),
                               cond).astype(jnp.float32)
    outs["finite"] = training.all_finite(outs)
    return outs

  # ------------------------------------------------------------------------ Update
  data_sh = {k: roll_out_sh[k] for k in data_keys}
  data_sh.update(adv_outcome=b_sh(2), adv_process=b_sh(2), steps=b_sh(2), combo=b_sh(1))

  update_step = make_update_step(policy, tx, arrs, hp, gc.accumulation, mesh, state_sh,
                                 data_sh, keep_means, frozen_sh)

  # ------------------------------------------------------------------- Evaluation
  gen = generate.Generator(config, vae, text, (model_g, None, frozen["model_rest"]), mesh,
                           nets)
  eval_key = jax.random.fold_in(jax.random.key(config.eval.seed), 777)

  # Scored by the first pixel reward of grpo.rewards (shapes_fidelity when there is none).
  eval_reward = next((n for n in reward_names if n != PRM_FINAL), "shapes_fidelity")

  def evaluate(params, iteration: int) -> dict:
    gen.model = (model_g, params, frozen["model_rest"])
    t0 = time.time()
    res = gen.evaluate(eval_key, os.path.join(out, "eval"), f"iter_{iteration:05d}",
                       reward_name=eval_reward)
    return {"eval_reward": res["reward_mean"], "eval_stderr": res["reward_stderr"],
            "eval_seconds": time.time() - t0}

  # --------------------------------------------------------------------- Resume
  mgr = checkpoint.manager(os.path.join(out, "checkpoints"))
  state = training.resume(mgr, state, "grpo")
  writer = report.MetricWriter(workdir, "grpo")
  start = int(state["step"])
  if start == 0:
    writer.write(0, evaluate(state["params"], 0))

  # ------------------------------------------------------------------------- Loop
  t_start = time.time()
  with training.Preemption() as preempt:
    for it in tqdm.trange(start, gc.iterations, initial=start, total=gc.iterations,
                          desc="grpo", disable=jax.process_index() != 0):
      base = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), it)
      k_prompts, k_roll, k_steps, k_perm = jax.random.split(base, 4)

      # Prompts: P training prompts, each expanded into a group of G.
      attrs = np.repeat(np.asarray(world.sample_attrs(k_prompts, gc.prompts_per_iteration,
                                                      gc.split)), group, axis=0)
      combo = np.asarray(embedded.combo_index(attrs), np.int32)
      prompts = world.captions(attrs)

      # Rollout, decode, score.
      t0 = time.time()
      outs = rollout_program(state["params"], frozen, k_roll, parallel.global_array(combo,
                                                                                    b_sh(1)))
      frames = parallel.to_host(outs["frames"])
      rollout_s = time.time() - t0
      extra = {PRM_FINAL: parallel.to_host(outs[PRM_FINAL])} if PRM_FINAL in outs else {}
      r = score_rewards(reward_names, frames, prompts, extra)  # [T, B]
      finite = bool(outs["finite"]) and bool(np.isfinite(r).all())

      # Advantages (host; every process computes the same numbers).
      pr = parallel.to_host(outs["process_rewards"])  # [B, N]
      adv_o = np.asarray(grpo.outcome_advantages(jnp.asarray(r), group, gc.adv_clip)).T
      if gc.advantage_mode == "none":
        adv_p = np.zeros_like(pr)
      else:
        adv_p = np.asarray(grpo.process_advantages(jnp.asarray(pr), group, gc.adv_clip,
                                                   gc.process_source))
      steps = np.asarray(grpo.select_steps(k_steps, batch, n_steps, gc.timestep_fraction))
      row = {f"reward/{name}": float(np.mean(r[i])) for i, name in enumerate(reward_names)}
      for i, name in enumerate(reward_names):
        rep_ = grpo.group_report(jnp.asarray(r[i]), group)
        row[f"reward/{name}_group_std"] = float(rep_["group_std"])
        row[f"reward/{name}_zero_std_fraction"] = float(rep_["zero_std_fraction"])
      if arrs.scored.any():
        row["process_reward"] = float(np.mean(pr[:, arrs.scored]))

      # Updates.
      t0 = time.time()
      update_metrics = []
      if finite:
        data = {k: outs[k] for k in data_keys}
        data.update(adv_outcome=parallel.global_array(adv_o, b_sh(2)),
                    adv_process=parallel.global_array(adv_p, b_sh(2)),
                    steps=parallel.global_array(steps, b_sh(2)),
                    combo=parallel.global_array(combo, b_sh(1)))
        for epoch in range(gc.inner_epochs):
          order = np.asarray(jax.random.permutation(jax.random.fold_in(k_perm, epoch), batch))
          for u in range(updates_per_epoch):
            idx = parallel.global_array(order[u * per_update:(u + 1) * per_update], rep)
            state, met = update_step(state, data, idx, frozen)
            met = jax.device_get(met)
            update_metrics.append(met)
            bad = int(met["skipped"])
            state["nonfinite"] = jax.device_put(
                jnp.where(bad, state["nonfinite"] + 1, 0).astype(jnp.int32), rep)
            _check_nonfinite(state, gc.max_nonfinite, mgr, it)
      else:
        state["nonfinite"] = jax.device_put(state["nonfinite"] + 1, rep)
        print(f"[grpo] iteration {it + 1}: non-finite rollout or reward; update skipped")
        _check_nonfinite(state, gc.max_nonfinite, mgr, it)
      update_s = time.time() - t0
      state["step"] = jax.device_put(jnp.asarray(it + 1, jnp.int32), rep)

      # Log, evaluate, checkpoint.
      done = it + 1
      if update_metrics:
        row.update({k: float(np.mean([m[k] for m in update_metrics]))
                    for k in update_metrics[0]})
      row.update(skipped_iteration=0 if finite else 1, nonfinite_in_a_row=int(state["nonfinite"]),
                 rollout_seconds=rollout_s, update_seconds=update_s,
                 updates=len(update_metrics))
      if (gc.eval_every and done % gc.eval_every == 0) or done == gc.iterations:
        row.update(evaluate(state["params"], done))
      if done % gc.log_every == 0 or "eval_reward" in row or done == gc.iterations:
        writer.write(done, row)
      if done % gc.ckpt_every == 0 or done == gc.iterations or preempt.requested:
        checkpoint.save(mgr, done, state)
      if preempt.requested:
        print(f"[grpo] SIGTERM: saved iteration {done}, exiting")
        writer.close()
        raise SystemExit(0)
  train_s = time.time() - t_start
  writer.close()

  # ------------------------------------------------------------------------ Final
  rows = report.read_metrics(workdir, "grpo")
  evals = [(r_["step"], r_["eval_reward"], r_["eval_stderr"]) for r_ in rows
           if "eval_reward" in r_]
  first, last = evals[0], evals[-1]
  summary = {"stage": "grpo", "iterations": gc.iterations, "source": source,
             "prm": prm_source, "sampler": sampler.name,
             "eval_reward_start": first[1], "eval_stderr_start": first[2],
             "eval_reward_end": last[1], "eval_stderr_end": last[2],
             "eval_gain": last[1] - first[1], "train_seconds_this_process": train_s,
             "config": config.grpo.to_dict()}
  if jax.process_index() == 0:
    train = [(r_["step"], r_[f"reward/{reward_names[0]}"]) for r_ in rows
             if reward_names and f"reward/{reward_names[0]}" in r_]
    series = {"eval (ODE, no reward model)": ([e[0] for e in evals], [e[1] for e in evals])}
    if train:
      series[f"train rollouts ({reward_names[0]})"] = ([x for x, _ in train],
                                                       [y for _, y in train])
    report.plot_curves(os.path.join(out, "curves.png"), series, xlabel="iteration",
                       title=f"grpo ({sampler.name})")
  nets.save_final(os.path.join(out, "final"), state["params"], model_r, vae, text, summary,
                  config)
  print(f"[grpo] evaluation reward {first[1]:.4f} +- {first[2]:.4f} -> {last[1]:.4f} +- "
        f"{last[2]:.4f} (gain {last[1] - first[1]:+.4f}) after {gc.iterations} iterations")
  return summary


def _check_nonfinite(state, limit: int, mgr, iteration: int) -> None:
  count = int(state["nonfinite"])
  if count >= limit:
    latest = mgr.latest_step()
    raise FloatingPointError(
        f"[grpo] {count} non-finite updates in a row at iteration {iteration + 1} "
        f"(grpo.max_nonfinite = {limit}): stopping. Parameters were never updated with "
        f"non-finite values; the last good checkpoint is iteration {latest} in "
        f"{mgr.directory}.")
