"""The GRPO programs at module level: the policy, its rollout program, its update step, its state.

The grpo stage, `experiments/bench_grpo.py` and `experiments/wan_memory.py` build these with
the same calls, so a benchmark or a memory table measures exactly what training runs.

  policy = make_policy(config, bundle, mesh, model_graphdef, vae_graphdef, prm_graphdef)
  state, state_sh = init_state(policy, tx, params, param_shardings, reference)
  rollout = make_rollout_program(policy, param_shardings, frozen_shardings)
  update = make_update_step(policy, tx, state_sh, frozen_shardings)

  outs = rollout(params, frozen, cond_table, prompt_index, key)
  state, metrics = update(state, data, sample_index, frozen, cond_table)

`frozen` = {'vae': (params, rest), 'model_rest': the velocity network's non-trained state
(a large frozen base stays sharded), 'prm': (params, rest) or None}. `cond_table` =
{'text': [P, ...], 'negative': [P, ...]}: the text encodings of the iteration's P prompts and
their negative prompts (replicated: a few rows); `prompt_index` `[B]` (batch-sharded) says
which row each rollout belongs to, so the B = P x G rollouts never carry G copies of the text.
The policy's velocity is the classifier-free guidance combination (`grpo.cfg_scale`,
`sampling/cfg.py`) of the network; the PRM scores the prompt only, and its gradient is taken
with respect to the latent.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from euphonium_jax import parallel, sampling, training
from euphonium_jax.rl import grpo
from euphonium_jax.sampling import cfg as cfg_lib

PRM_FINAL = "prm_final"  # the outcome reward "PRM of the final clean latent"


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
                    distill_coef=float(g.distill_coef), logprob_mean=sampler.logprob_mean,
                    distill_teacher=str(g.distill_teacher))


def make_tx(config):
  g = config.grpo
  return training.optimizer(g.lr, g.warmup_steps, g.weight_decay, g.grad_clip, g.b1, g.b2)


@dataclasses.dataclass(frozen=True)
class Policy:
  """Static description of one GRPO run's programs (no arrays)."""
  config: Any
  mesh: Any
  sampler: sampling.SamplerConfig
  arrs: sampling.GridArrays
  hp: grpo.Hyper
  batch: int  # global rollouts per iteration (P x G)
  shape: tuple  # latent shape of one sample
  keep_means: bool
  reward_names: tuple
  network_velocity: Callable  # ((params, rest), x, t, text) -> v
  decode: Callable  # ((params, rest), z) -> frames
  prm_fn: Optional[Callable]  # ((params, rest), x, t, cond) -> [B], the prompt only

  @property
  def data_keys(self) -> tuple:
    return ("latents", "logprobs", "process_rewards") + (
        ("means_guided", "guidance") if self.keep_means else ()) + (
        ("sde_mask",) if self.sampler.windowed else ())

  @property
  def trainable(self) -> int:
    """SDE steps per sample that `grpo.select_steps` draws from (N - 1 without a window)."""
    return sampling.trainable_per_sample(self.sampler)

  def velocity(self, frozen) -> Callable:
    """The policy's velocity `(params, x, t, cond)`: CFG-combined when grpo.cfg_scale != 1."""
    v = cfg_lib.cfg_velocity(self.network_velocity, self.config.grpo.cfg_scale)
    return lambda p, x, t, c: v((p, frozen["model_rest"]), x, t, c)


def make_policy(config, bundle, mesh, model_graphdef, vae_graphdef, prm_graphdef=None) -> Policy:
  sampler = sampling.sampler_config_from(config.sampling)
  arrs = sampling.grid_arrays(sampler)
  hp = hyper(config, sampler)
  prm_fn = None
  if prm_graphdef is not None:
    prm_fn = cfg_lib.text_only(bundle.prm_fn(prm_graphdef))
  elif uses_prm(config, arrs):
    raise ValueError("this GRPO config needs a PRM (guidance, process advantages or the "
                     "'prm_final' reward) but none was given")
  return Policy(
      config=config, mesh=mesh, sampler=sampler, arrs=arrs, hp=hp,
      batch=config.grpo.prompts_per_iteration * sampler.group_size,
      shape=tuple(bundle.latent_shape()),
      keep_means=hp.distill_coef > 0 or hp.logprob_mean == "guided",
      reward_names=tuple(name for name, _ in config.grpo.rewards),
      network_velocity=bundle.velocity_fn(model_graphdef),
      decode=bundle.decode_fn(vae_graphdef), prm_fn=prm_fn)


def frozen_inputs(vae, model_rest, prm, mesh) -> tuple[dict, dict]:
  """(frozen, its shardings): the VAE, the model's non-trained state and the PRM, each kept
  where it is (sharded arrays stay sharded; anything else is replicated)."""
  rep = parallel.replicated(mesh)
  keep = lambda a: a.sharding if isinstance(a, jax.Array) and len(
      a.sharding.device_set) == mesh.size else rep
  frozen = {"vae": tuple(vae[1:]), "model_rest": model_rest,
            "prm": None if prm is None else tuple(prm[1:])}
  frozen = jax.tree.map(lambda a: jax.device_put(a, keep(a)), frozen)
  return frozen, jax.tree.map(lambda a: a.sharding, frozen)


def _b(policy: Policy, ndim: int):
  return parallel.batch_sharding(policy.mesh, ndim)


def rollout_shardings(policy: Policy) -> dict:
  b = functools.partial(_b, policy)
  nd = len(policy.shape) + 1
  sh = {"latents": b(nd + 1), "logprobs": b(2), "process_rewards": b(2), "frames": b(5),
        "finite": parallel.replicated(policy.mesh)}
  if policy.keep_means:
    sh.update(means_guided=b(nd + 1), guidance=b(nd + 1))
  if policy.sampler.windowed:
    sh["sde_mask"] = b(2)
  if PRM_FINAL in policy.reward_names:
    sh[PRM_FINAL] = b(1)
  return sh


def data_shardings(policy: Policy) -> dict:
  """Shardings of one iteration's training data (`make_update_step`'s `data`)."""
  roll = rollout_shardings(policy)
  sh = {k: roll[k] for k in policy.data_keys if k != "process_rewards"}
  b = functools.partial(_b, policy)
  sh.update(adv_outcome=b(2), adv_process=b(2), steps=b(2), prompt=b(1))
  return sh


def gather_cond(cond_table, prompt_index):
  """Per-sample conditioning `[B, ...]` from the iteration's table `[P, ...]`."""
  return jax.tree.map(lambda a: a[prompt_index], cond_table)


def make_rollout_program(policy: Policy, p_sh, frozen_sh, cond_sh=None):
  """jit `(params, frozen, cond_table, prompt_index, key) -> outs`: the (guided) rollout of the
  iteration's batch, the decoded scored latent (`frames`), the PRM of the final clean latent
  when it is a reward, and a finite flag, in one program.

  A windowed sampler (`sampling.window.mode != 'off'`) takes the iteration as a sixth input,
  `(..., key, iteration)` (a replicated int32 scalar, traced: one program for every window
  position), and its `outs` hold `sde_mask` `[B, N]`: the window of every sample is
  `sampling.window_starts(sampler, key, iteration, B)`, a function of (seed, iteration)."""
  rep = parallel.replicated(policy.mesh)
  cond_sh = rep if cond_sh is None else cond_sh
  gc = policy.config.grpo
  x_sh = _b(policy, len(policy.shape) + 1)
  windowed = policy.sampler.windowed
  in_sh = (p_sh, frozen_sh, cond_sh, _b(policy, 1), rep) + ((rep,) if windowed else ())

  @functools.partial(jax.jit, in_shardings=in_sh, out_shardings=rollout_shardings(policy))
  def rollout_program(params, frozen, cond_table, prompt_index, key, *iteration):
    cond = gather_cond(cond_table, prompt_index)
    roll = sampling.make_rollout(policy.velocity(frozen), policy.prm_fn, policy.sampler, x_sh,
                                 policy.keep_means)
    starts = (sampling.window_starts(policy.sampler, key, iteration[0], policy.batch)
              if windowed else None)
    res = roll(params, frozen["prm"], key, cond, (policy.batch,) + policy.shape,
               window_start=starts)
    scored = res.x0_hat if gc.score == "x0_hat" else res.latents[:, -1]
    res_d = res._asdict()
    outs = {k: res_d[k] for k in policy.data_keys}
    outs["frames"] = policy.decode(frozen["vae"], scored)
    if PRM_FINAL in policy.reward_names:
      outs[PRM_FINAL] = policy.prm_fn(frozen["prm"], scored,
                                      jnp.zeros((policy.batch,), jnp.float32),
                                      cond).astype(jnp.float32)
    outs["finite"] = training.all_finite(outs)
    return outs

  return rollout_program


def make_update_step(policy: Policy, tx, state_sh, frozen_sh, cond_sh=None):
  """jit `(state, data, idx, frozen, cond_table) -> (state, metrics)`: one optimiser step on
  the samples `idx` (replicated int `[samples_per_update]`) of the iteration's `data`
  (`data_shardings`). State shardings are declared in and out and the state is donated; a
  non-finite loss, gradient or result keeps the old state (`training.guarded_update`) and
  counts in `state['nonfinite']` (updates skipped in a row)."""
  mesh = policy.mesh
  rep = parallel.replicated(mesh)
  cond_sh = rep if cond_sh is None else cond_sh
  gc = policy.config.grpo
  keep = policy.keep_means
  ema = float(gc.ema_decay)
  limit = int(gc.max_nonfinite)

  def constrain(mb: grpo.Batch) -> grpo.Batch:
    return jax.tree.map(
        lambda a: jax.lax.with_sharding_constraint(a, parallel.batch_sharding(mesh, a.ndim)), mb)

  @functools.partial(jax.jit, in_shardings=(state_sh, data_shardings(policy), rep, frozen_sh,
                                            cond_sh),
                     out_shardings=(state_sh, rep), donate_argnums=0)
  def update_step(state, data, idx, frozen, cond_table):
    take = lambda a: a[idx]
    mb = grpo.Batch(latents=take(data["latents"]), logprobs=take(data["logprobs"]),
                    adv_outcome=take(data["adv_outcome"]), adv_process=take(data["adv_process"]),
                    steps=take(data["steps"]), cond=gather_cond(cond_table, take(data["prompt"])),
                    means_guided=take(data["means_guided"]) if keep else None,
                    guidance=take(data["guidance"]) if keep else None,
                    sde_mask=take(data["sde_mask"]) if policy.sampler.windowed else None)
    update = grpo.make_update(policy.velocity(frozen), tx, policy.arrs, policy.hp,
                              gc.accumulation, guard=training.guarded_update,
                              constrain=constrain)
    new, metrics = update(state, mb)
    # Non-finite updates in a row, counted here (no host round trip per step): a kept update
    # resets it, except once it has reached grpo.max_nonfinite (the loop stops at the end of
    # the iteration; the skipped updates left the parameters unchanged).
    n = state["nonfinite"]
    new["nonfinite"] = jnp.where(metrics["skipped"] > 0, n + 1,
                                 jnp.where(n >= limit, n, 0)).astype(jnp.int32)
    if ema > 0:  # the evaluation weights follow the trained ones (a kept update only moves)
      new["ema"] = jax.tree.map(lambda e, p: ema * e + (1.0 - ema) * p, state["ema"],
                                new["params"])
    return new, metrics

  return update_step


def state_shardings(policy: Policy, tx, params, p_sh) -> dict:
  rep = parallel.replicated(policy.mesh)
  sh = {"params": p_sh, "opt": training.opt_shardings(tx, params, p_sh, policy.mesh),
        "step": rep, "nonfinite": rep, "rng": rep}
  if policy.hp.kl_coef > 0:
    sh["ref"] = p_sh
  if policy.hp.distill_coef > 0 and policy.hp.distill_teacher == "frozen":
    sh["teacher"] = p_sh
  if policy.config.grpo.ema_decay > 0:
    sh["ema"] = p_sh
  return sh


def init_state(policy: Policy, tx, params, p_sh, reference: Callable | None = None):
  """(state, its shardings): parameters, optimiser state, step, non-finite counter, the RNG
  of `config.seed`, the KL reference (`reference(params)`: own buffers, the state is
  donated) when `grpo.kl_coef > 0`, the distillation teacher (a copy of the parameters) when
  `grpo.distill_teacher = 'frozen'`, and an EMA of the parameters (updated after every
  optimiser step, `ema <- d ema + (1 - d) params`) when `grpo.ema_decay = d > 0`; placed with
  the shardings."""
  sh = state_shardings(policy, tx, params, p_sh)
  state = {"params": params, "opt": jax.jit(tx.init)(params),
           "step": jnp.zeros((), jnp.int32), "nonfinite": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(jax.random.key(policy.config.seed))}
  if policy.hp.kl_coef > 0:
    state["ref"] = (reference or (lambda p: jax.tree.map(jnp.copy, p)))(params)
  if "teacher" in sh:
    state["teacher"] = jax.tree.map(jnp.copy, params)
  if policy.config.grpo.ema_decay > 0:
    state["ema"] = jax.tree.map(jnp.copy, params)
  return training.place(state, sh), sh


def eval_params(policy: Policy, state):
  """The weights evaluations and the final model use: the EMA when `grpo.ema_decay > 0`."""
  return state["ema"] if policy.config.grpo.ema_decay > 0 else state["params"]


def make_prepare_program(policy: Policy):
  """jit `(rewards [T, B], process_rewards [B, N], sde_mask [B, N] | None, k_steps, k_perm)
  -> prep`: everything between scoring and the optimiser steps, on the device, in one
  program: outcome advantages per group (`adv_outcome` `[B, T]`), process advantages per group
  and step (`adv_process` `[B, N]`, zeros when `advantage_mode = 'none'`), the trained
  transitions (`steps` `[B, K]`, only SDE steps of a windowed rollout), the sample order of
  every optimiser step of the iteration (`orders` `[inner_epochs x updates per epoch,
  samples_per_update]`, epoch e a permutation of fold_in(k_perm, e)) and the iteration's
  reward metrics (replicated scalars, fetched with the update metrics once per iteration).
  `rewards` is the one host -> device transfer an iteration needs (rewards are scored on the
  host)."""
  rep = parallel.replicated(policy.mesh)
  gc = policy.config.grpo
  group, n_steps, batch = policy.sampler.group_size, policy.sampler.num_steps, policy.batch
  per_update = gc.samples_per_update
  updates = batch // per_update
  b = functools.partial(_b, policy)
  names = list(policy.reward_names)
  scored = jnp.asarray(policy.arrs.scored)

  def prepare(rewards, process_rewards, sde_mask, k_steps, k_perm):
    adv_o = grpo.outcome_advantages(rewards, group, gc.adv_clip, adv_std=gc.adv_std,
                                    adv_eps=gc.adv_eps).T
    if gc.advantage_mode == "none":
      adv_p = jnp.zeros_like(process_rewards)
    else:
      adv_p = grpo.process_advantages(process_rewards, group, gc.adv_clip, gc.process_source,
                                      adv_std=gc.adv_std, adv_eps=gc.adv_eps)
    steps = grpo.select_steps(k_steps, batch, n_steps, gc.timestep_fraction,
                              selection=gc.step_selection, mask=sde_mask,
                              trainable=policy.trainable)
    orders = jnp.concatenate([
        jax.random.permutation(jax.random.fold_in(k_perm, e), batch).reshape(
            updates, per_update) for e in range(gc.inner_epochs)]).astype(jnp.int32)
    metrics = {}
    for i, name in enumerate(names):
      rep_ = grpo.group_report(rewards[i], group)
      metrics[f"reward/{name}"] = jnp.mean(rewards[i])
      metrics[f"reward/{name}_group_std"] = rep_["group_std"]
      metrics[f"reward/{name}_zero_std_fraction"] = rep_["zero_std_fraction"]
    if policy.arrs.scored.any():
      metrics["process_reward"] = (jnp.sum(jnp.where(scored, process_rewards, 0.0))
                                   / (batch * jnp.sum(scored)))
    return {"adv_outcome": adv_o.astype(jnp.float32), "adv_process": adv_p.astype(jnp.float32),
            "steps": steps, "orders": orders, "metrics": metrics}

  out_sh = {"adv_outcome": b(2), "adv_process": b(2), "steps": b(2), "orders": rep,
            "metrics": {k: rep for k in (
                [f"reward/{n}{s}" for n in names
                 for s in ("", "_group_std", "_zero_std_fraction")]
                + (["process_reward"] if policy.arrs.scored.any() else []))}}
  return jax.jit(prepare, out_shardings=out_sh)


def update_data(policy: Policy, outs: dict, prep: dict, prompt_index) -> dict:
  """The update step's `data`: the rollout's stored arrays (`outs`, the process rewards
  aside: they enter through `prep`'s advantages), the prepare program's advantages and
  trained transitions, and the prompt index of each sample (the update gathers its text)."""
  data = {k: outs[k] for k in policy.data_keys if k != "process_rewards"}
  data.update(adv_outcome=prep["adv_outcome"], adv_process=prep["adv_process"],
              steps=prep["steps"], prompt=prompt_index)
  return data


def refresh_teacher(policy: Policy, state: dict, iterations_done: int) -> dict:
  """`state` with the frozen distillation teacher replaced by a copy of the parameters when
  `grpo.teacher_refresh_every = K > 0` and `iterations_done` is a multiple of K (called after
  each iteration's updates, before its checkpoint: a resumed run holds the same teacher)."""
  k = int(policy.config.grpo.teacher_refresh_every)
  if "teacher" in state and k > 0 and iterations_done % k == 0:
    state = dict(state, teacher=jax.tree.map(jnp.copy, state["params"]))
  return state
