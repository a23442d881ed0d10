"""The `grpo` stage: post-train the flow model with dual-reward GRPO (DESIGN.md section 4).

Euphonium, DanceGRPO and Flow-GRPO are the same loop with different `config.sampling`
(guidance on / off, the noise schedule) and `config.grpo` (which advantages enter). Each
iteration:

1. samples `prompts_per_iteration` training prompts of the prompt set (`config.data.prompts`:
   the world's captions or a user's file) and expands each into a group of G
   (`sampling.group_size`, optionally sharing one initial noise); their text encodings (and
   negative prompts' under CFG) form the iteration's conditioning table;
2. rolls them out with the configured sampler, guided by the PRM gradient where configured,
   and decodes the scored latent (one jitted program, sharded over the batch: the programs
   are `policy.py`'s, the same that the benchmarks time);
3. scores the videos with the outcome reward(s): on-device rewards on the device, the others
   on one host copy, remote ones concurrently; a reward that fails stops the run with its
   name, a non-finite reward skips the iteration (counted);
4. computes outcome advantages per group, process advantages per group and step, the
   trained transitions, the sample order of every optimiser step and the reward metrics in
   one jitted program (`policy.make_prepare_program`; the rewards are the iteration's one
   host -> device transfer);
5. trains a random subset of each sample's transitions (`timestep_fraction` of steps
   0 .. N - 2, never the last; only SDE steps under an SDE window) with the clipped-ratio
   loss, the kernel KL and distillation, in optimiser steps of `samples_per_update` samples
   (one jitted, sharded update with donated state, dispatched back to back; a non-finite
   loss, gradient or result skips the step and is counted inside the step); the metrics and
   the counter are fetched once per iteration;
6. every `eval_every` iterations (and at the start and the end) samples held-out prompts with
   the Euler ODE and NO reward model, and records the mean outcome reward with its standard
   error (the same prompts and noise every time, from `eval.seed`, so runs with other training
   seeds or methods are scored on the same ones) and a video grid.

Randomness: every training key derives from (config.seed, iteration). The rollout draws its noise for
the whole global batch from one replicated key; JAX's partitionable threefry makes each
device compute only its own slice of that draw, so no two devices (or processes) share noise
and the result does not depend on the mesh. Prompt choice is a replicated host computation
and transition subsets and update orders replicated device ones (every process agrees).

Checkpoints (`WORKDIR/grpo/checkpoints`, every `ckpt_every` iterations, and on SIGTERM):
parameters, optimiser state, the KL reference (when `kl_coef > 0`), the distillation teacher
(when `distill_teacher = 'frozen'`; refreshed after an iteration's updates), the RNG, the iteration
(which is also the data position: the prompts of iteration i are a function of (seed, i)) and
the non-finite counter. Resuming reproduces an uninterrupted run exactly.

Outputs: `WORKDIR/grpo/final` (model, VAE and text encoder: a drop-in `init.pretrain` for the
`sample` stage; with `grpo.ema_decay > 0` the model is the EMA of the trained weights, which
the evaluations also use), `WORKDIR/grpo/eval/` (video grids and scores per evaluation),
`WORKDIR/grpo/curves.png`, metrics in `WORKDIR/metrics.jsonl` and TensorBoard.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from euphonium_jax import bundles, checkpoint, generate, parallel, paths, report, sampling
from euphonium_jax import policy as policy_lib
from euphonium_jax import training
from euphonium_jax.data import prompts as prompts_lib
from euphonium_jax.data import world
from euphonium_jax.rewards import registry as rewards

PRM_FINAL = policy_lib.PRM_FINAL


# The settings that decide which arrays the state holds (named when a resume finds another).
LAYOUT_HINTS = {
    "ref": "grpo.kl_coef > 0 keeps a KL reference copy of the parameters (state 'ref')",
    "ema": "grpo.ema_decay > 0 keeps an EMA of the parameters (state 'ema')",
    "teacher": "grpo.distill_teacher = 'frozen' keeps the distillation teacher (state "
               "'teacher')",
    "params": "the trained parameters: the model, or wan.lora_rank / wan.lora_targets",
    "opt": "the optimiser state follows the trained parameters (wan.lora_rank / lora_targets)",
}


def stage_dir(workdir: str) -> str:
  return os.path.join(workdir, "grpo")


def is_done(workdir: str) -> bool:
  return checkpoint.is_done(os.path.join(stage_dir(workdir), "final"))


def score_rewards(names, frames, prompts, extra: dict[str, np.ndarray], metadata=None,
                  built: dict | None = None, concurrent: bool = True) -> np.ndarray:
  """`[T, B]` float32 outcome rewards in the order of `names`; a reward that fails stops the
  run, naming it (a RewardError).

  `extra`: rewards computed elsewhere (the PRM's 'prm_final'). `built`: the run's rewards
  (`registry.build_many`, once per run; plain rewards are built here when None). `frames`
  [B, T, H, W, 3] may stay on the device: on-device rewards score it there, the others share
  one host copy, and io-bound (remote) ones are scored in threads, concurrently with the
  rest (`concurrent=False`: one after another, for comparison)."""
  if built is None:
    built = rewards.build_many([n for n in names if n not in extra])
  todo = {n: built[n] for n in dict.fromkeys(names) if n not in extra}
  scores = rewards.score_many(todo, frames, list(prompts), metadata, to_host=parallel.to_host,
                              concurrent=concurrent)
  rows = [np.asarray(extra[n], np.float32) if n in extra else scores[n] for n in names]
  return np.stack(rows) if rows else np.zeros((0, len(prompts)), np.float32)


def iteration_prompts(config, prompt_set: prompts_lib.PromptSet, key, iteration: int):
  """The P prompts of `iteration` and their metadata: a function of (seed, iteration) only.

  The world's captions are drawn as attribute triples from `grpo.split` (as the embedded
  results always were); a prompt file's from its train split (`iteration_indices`)."""
  gc = config.grpo
  n = gc.prompts_per_iteration
  if prompt_set.is_world:
    attrs = np.asarray(world.sample_attrs(key, n, gc.split))
    return world.captions(attrs), [{} for _ in range(n)]
  prompts, meta = prompt_set.split("train")
  idx = prompts_lib.iteration_indices(len(prompts), n, config.seed, iteration)
  return [prompts[i] for i in idx], [meta[i] for i in idx]


def cond_table(config, encode, prompts, meta, null_prompt: str) -> dict:
  """{'text': encodings of the P prompts, 'negative': of their negative prompts} (the
  negative only with CFG: a prompt's `negative_prompt` field, else data.negative_prompt)."""
  table = {"text": encode(prompts)}
  if config.grpo.cfg_scale != 1.0:
    table["negative"] = encode(generate.negative_prompts(config, null_prompt, meta))
  return table


def run(config, workdir: str) -> dict:
  gc = config.grpo
  out = stage_dir(workdir)
  os.makedirs(out, exist_ok=True)

  # ------------------------------------------------------------------------- Mesh
  mesh = parallel.mesh_from_config(config)
  rep = parallel.replicated(mesh)
  b_sh = lambda ndim: parallel.batch_sharding(mesh, ndim)

  # ---------------------------------------------------------------- Prompts, networks
  prompt_set = prompts_lib.load(config.data.prompts, seed=config.seed,
                                test_fraction=config.data.test_fraction)
  nets = bundles.get(config)
  vae, text, model, source = nets.load_networks(workdir, mesh)
  model_g, model_p, model_r = model
  need_prm = policy_lib.uses_prm(config, _grid(config))
  prm, prm_source = None, None
  if need_prm:
    prm_source = prm_dir(config, workdir)
    prm = nets.load_prm(prm_source, mesh)
  encode = bundles.run_text_encoder(config, nets, text, mesh, prompt_set, workdir)

  # ------------------------------------------------------------------- Programs
  pol = policy_lib.make_policy(config, nets, mesh, model_g, vae[0],
                               None if prm is None else prm[0])
  frozen, frozen_sh = policy_lib.frozen_inputs(vae, model_r, prm, mesh)
  group, batch = pol.sampler.group_size, pol.batch
  per_update = gc.samples_per_update
  updates_per_epoch = batch // per_update
  reward_names = list(pol.reward_names)
  # Each reward built once (weights loaded, servers' health checked) before anything compiles;
  # evaluations are scored by the first pixel reward of grpo.rewards (else shapes_fidelity).
  eval_reward = next((n for n in reward_names if n != PRM_FINAL), "shapes_fidelity")
  built_rewards = rewards.build_many(reward_names + [eval_reward], config.rewards)
  tx = policy_lib.make_tx(config)
  p_sh = nets.model_param_shardings(mesh)
  state, state_sh = policy_lib.init_state(pol, tx, model_p, p_sh, nets.reference_params)
  rollout_program = policy_lib.make_rollout_program(pol, p_sh, frozen_sh)
  update_step = policy_lib.make_update_step(pol, tx, state_sh, frozen_sh)
  prepare_program = policy_lib.make_prepare_program(pol)

  # ------------------------------------------------------------------- Evaluation
  gen = generate.Generator(config, vae, text, (model_g, None, frozen["model_rest"]), mesh,
                           nets, encode=encode)
  eval_key = jax.random.fold_in(jax.random.key(config.eval.seed), 777)
  eval_prompts = generate.eval_prompts(config, prompt_set, eval_key)

  # The training sampler on the same prompts and noise (eval.sde): guided, unguided.
  sde_gens = {kind: generate.Generator(
      config, vae, text, gen.model, mesh, nets, encode=encode,
      sampler=generate.train_sampler(config, guided=kind == "guided"),
      prm=None if prm is None else (nets.prm_fn(prm[0]), frozen["prm"]))
      for kind in config.eval.sde}

  def evaluate(params, iteration: int) -> dict:
    row = {}
    t0 = time.time()
    for kind, g in [("", gen)] + [(f"_sde_{k}", v) for k, v in sde_gens.items()]:
      g.model = (model_g, params, frozen["model_rest"])
      res = g.evaluate(eval_key, os.path.join(out, "eval"), f"iter_{iteration:05d}{kind}",
                       prompts=eval_prompts[0], metadata=eval_prompts[1],
                       reward_name=built_rewards[eval_reward])
      row.update({f"eval_reward{kind}": res["reward_mean"],
                  f"eval_stderr{kind}": res["reward_stderr"]})
    row["eval_seconds"] = time.time() - t0
    return row

  # --------------------------------------------------------------------- Resume
  mgr = checkpoint.manager(os.path.join(out, "checkpoints"))
  state = training.resume(mgr, state, "grpo", LAYOUT_HINTS)
  writer = report.MetricWriter(workdir, "grpo")
  start = int(state["step"])
  if start == 0:
    writer.write(0, evaluate(policy_lib.eval_params(pol, state), 0))

  # ------------------------------------------------------------------------- Loop
  t_start = time.time()
  with training.Preemption() as preempt:
    for it in tqdm.trange(start, gc.iterations, initial=start, total=gc.iterations,
                          desc="grpo", disable=jax.process_index() != 0):
      base = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), it)
      k_prompts, k_roll, k_steps, k_perm = jax.random.split(base, 4)

      # Prompts: P training prompts, each expanded into a group of G.
      prompts_p, meta_p = iteration_prompts(config, prompt_set, k_prompts, it)
      table = cond_table(config, encode, prompts_p, meta_p, nets.null_prompt)
      pidx = np.repeat(np.arange(len(prompts_p), dtype=np.int32), group)
      prompts = [prompts_p[i] for i in pidx]
      meta = [meta_p[i] for i in pidx]
      prompt_index = parallel.global_array(pidx, b_sh(1))

      # Rollout, decode, score.
      t0 = time.time()
      window = (jnp.int32(it),) if pol.sampler.windowed else ()  # SDE window: traced input
      outs = rollout_program(state["params"], frozen, table, prompt_index, k_roll, *window)
      jax.block_until_ready(outs["frames"])
      rollout_s = time.time() - t0
      extra = {PRM_FINAL: parallel.to_host(outs[PRM_FINAL])} if PRM_FINAL in outs else {}
      t0 = time.time()
      try:  # frames stay on the device for on-device rewards; the others get a host copy
        r = score_rewards(reward_names, outs["frames"], prompts, extra, meta,
                          built=built_rewards)  # [T, B]
      except rewards.RewardError as e:
        good = training.last_good_checkpoint(mgr)
        raise rewards.RewardError(
            f"{e}\n[grpo] stopped at iteration {it + 1}: " + (
                f"the last verified checkpoint is iteration {good} in {mgr.directory}"
                if good is not None else f"no verified checkpoint in {mgr.directory} yet")
        ) from e
      reward_s = time.time() - t0
      finite = bool(outs["finite"]) and bool(np.isfinite(r).all())

      # Advantages, trained transitions, update orders and reward metrics: one program on
      # the device (the rewards are the iteration's one host -> device transfer).
      prep = prepare_program(parallel.global_array(r, rep), outs["process_rewards"],
                             outs.get("sde_mask"), k_steps, k_perm)

      # Updates: dispatched back to back; metrics and the non-finite counter (kept inside
      # the update step) are fetched once, after the iteration's last step.
      t0 = time.time()
      update_metrics = []
      if finite:
        data = policy_lib.update_data(pol, outs, prep, prompt_index)
        for j in range(gc.inner_epochs * updates_per_epoch):
          state, met = update_step(state, data, prep["orders"][j], frozen, table)
          update_metrics.append(met)
      else:
        state["nonfinite"] = jax.device_put(state["nonfinite"] + 1, rep)
        print(f"[grpo] iteration {it + 1}: non-finite rollout or reward; update skipped")
      update_metrics, row = jax.device_get((update_metrics, prep["metrics"]))
      row = {k: float(v) for k, v in row.items()}
      _check_nonfinite(state, gc.max_nonfinite, mgr, it)
      update_s = time.time() - t0
      state["step"] = jax.device_put(jnp.asarray(it + 1, jnp.int32), rep)
      state = policy_lib.refresh_teacher(pol, state, it + 1)

      # Log, evaluate, checkpoint.
      done = it + 1
      if update_metrics:
        row.update({k: float(np.mean([m[k] for m in update_metrics]))
                    for k in update_metrics[0]})
      row.update(skipped_iteration=0 if finite else 1, nonfinite_in_a_row=int(state["nonfinite"]),
                 rollout_seconds=rollout_s, reward_seconds=reward_s, update_seconds=update_s,
                 updates=len(update_metrics))
      if (gc.eval_every and done % gc.eval_every == 0) or done == gc.iterations:
        row.update(evaluate(policy_lib.eval_params(pol, state), done))
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
             "prm": prm_source, "sampler": pol.sampler.name,
             "prompts": prompt_set.source,
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
                       title=f"grpo ({pol.sampler.name})")
  nets.save_final(os.path.join(out, "final"), policy_lib.eval_params(pol, state), model_r, vae,
                  text, summary)
  print(f"[grpo] evaluation reward {first[1]:.4f} +- {first[2]:.4f} -> {last[1]:.4f} +- "
        f"{last[2]:.4f} (gain {last[1] - first[1]:+.4f}) after {gc.iterations} iterations")
  return summary


def _grid(config):
  return sampling.grid_arrays(sampling.sampler_config_from(config.sampling))


def prm_dir(config, workdir: str) -> str:
  """The PRM: config.init.prm, else this workdir's prm stage."""
  return paths.stage_source(config.init.prm, workdir, "prm")


def _check_nonfinite(state, limit: int, mgr, iteration: int) -> None:
  count = int(state["nonfinite"])
  if count >= limit:
    good = training.last_good_checkpoint(mgr)
    where = (f"the last verified checkpoint is iteration {good} in {mgr.directory}"
             if good is not None else f"there is no verified checkpoint in {mgr.directory} yet")
    raise FloatingPointError(
        f"[grpo] {count} non-finite updates in a row at iteration {iteration + 1} "
        f"(grpo.max_nonfinite = {limit}): stopping. Skipped updates left the parameters "
        f"unchanged; {where}.")
