"""The `prm` stage: a latent process reward model trained on the base model's own rollouts.

1. Data: unguided SDE rollouts of the base model (`config.prm.data.sampler`) on training
   prompts; every step's latent is kept, the decoded final clean estimate is scored with the
   outcome reward. Cached in chunks under `WORKDIR/prm/cache/train/` (`.npz`, fingerprinted
   by base model, reward and config: see `data/rollout_cache.py`).
2. Training on `(x_t, t, text) -> reward` with `config.prm.loss` (regression | bce |
   bradley_terry), resumable orbax checkpoints.
3. Report on held-out prompts (`WORKDIR/prm/report.{json,png}`): Spearman correlation of
   `R_phi(x_t, t)` with the final reward per time bucket, and the guidance check (a step along
   the PRM gradient vs a random step of the same norm, finished with the ODE sampler).
4. `WORKDIR/prm/final`: the PRM (and the text encoder its inputs come from), with the
   report's numbers in `info.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from scipy import stats

from euphonium_jax import bundles, checkpoint, parallel, prm_report, report, sampling, training
from euphonium_jax.data import prompt_table, rollout_cache, world
from euphonium_jax.data import prompts as prompts_lib
from euphonium_jax.rewards import registry as rewards
from euphonium_jax.sampling import cfg as cfg_lib
from euphonium_jax.rl import prm_losses


def stage_dir(workdir: str) -> str:
  return os.path.join(workdir, "prm")


def is_done(workdir: str) -> bool:
  return checkpoint.is_done(os.path.join(stage_dir(workdir), "final"))


def data_sampler(config) -> sampling.SamplerConfig:
  """The unguided sampler of the rollout data (the preset's guidance is switched off)."""
  d = config.prm.data
  over = dict(num_steps=d.num_steps, shift=d.shift, group_size=d.group_size,
              share_noise_in_group=d.share_noise, score_unguided_steps=False,
              guidance=dict(mode="off"))
  if d.eta is not None:
    over["eta"] = d.eta
  return sampling.preset(d.sampler, **over)


def labels(config, reward: np.ndarray) -> np.ndarray:
  """The training label of each rollout: its reward, transformed for the regression loss by
  `prm.target` (log: log(r + log_eps); quantile: its rank among the training rewards, in
  (0, 1)). bce and bradley_terry use the reward itself (they see only order / a threshold)."""
  pc = config.prm
  reward = np.asarray(reward, np.float64)
  if pc.loss != "regression" or pc.target == "reward":
    return reward.astype(np.float32)
  if pc.target == "log":
    return np.log(reward + pc.log_eps).astype(np.float32)
  return ((stats.rankdata(reward) - 0.5) / reward.size).astype(np.float32)


def _rms_unit(x: jax.Array) -> jax.Array:
  """Per-sample direction of unit root-mean-square over the latent dims."""
  rms = jnp.sqrt(jnp.mean(x.reshape(x.shape[0], -1) ** 2, axis=-1))
  return x / (rms.reshape((-1,) + (1,) * (x.ndim - 1)) + 1e-12)


def run(config, workdir: str) -> dict:
  pc = config.prm
  out = stage_dir(workdir)
  group = pc.data.group_size
  chunk = pc.data.chunk_prompts * group  # rollouts per chunk

  # ---------------------------------------------------------------------------- Mesh
  mesh = parallel.mesh_from_config(config)
  for key, n in (("prm.batch_size", pc.batch_size), ("prm.data.chunk_prompts * group_size",
                                                    chunk)):
    if not parallel.batch_size_ok(n, mesh):
      raise ValueError(f"config.{key}={n} must be divisible by the data-parallel size "
                       f"{parallel.data_parallel_size(mesh)}")
  rep = parallel.replicated(mesh)

  # ----------------------------------------------------------------------- Base model
  nets = bundles.get(config)  # the embedded world or Wan: the same calls
  vae, text, model, source = nets.load_networks(workdir, mesh)
  if nets.family == "embedded":  # small networks: a full copy on every device
    vae, text, model = ((n[0],) + jax.device_put(n[1:], rep) for n in (vae, text, model))
  prompt_set = prompts_lib.load(config.data.prompts, seed=config.seed,
                                test_fraction=config.data.test_fraction)
  # The prompts rollouts may use, indexed by the cached `combo` field: the world's captions
  # in combo order, or the prompt set's train then test prompts.
  if prompt_set.is_world:
    plist = prompt_table.all_captions()
    pmeta = [{}] * len(plist)
  else:
    plist = list(prompt_set.train + prompt_set.test)
    pmeta = list(prompt_set.train_meta + prompt_set.test_meta)
  encode = bundles.run_text_encoder(config, nets, text, mesh, prompt_set, workdir)
  text_table = encode(plist)  # the frozen text encoder's output for every prompt
  null = encode([config.data.negative_prompt or nets.null_prompt])
  velocity = cfg_lib.cfg_velocity(nets.velocity_fn(model[0]), pc.data.cfg_scale)
  decode = nets.decode_fn(vae[0])
  shape = nets.latent_shape()
  base = {"model": model[1:], "vae": vae[1:]}
  x_sh = parallel.batch_sharding(mesh, len(shape) + 1)

  def cond_of(combo):
    return jax.tree.map(lambda a: a[combo], text_table)

  def sampler_cond(combo):
    """The rollout's conditioning: the prompts, and the negative prompt under CFG."""
    text_ = cond_of(combo)
    return cfg_lib.broadcast_negative(text_, null) if pc.data.cfg_scale != 1.0 else \
        cfg_lib.make_cond(text_)

  def score(frames, combo) -> np.ndarray:
    idx = np.asarray(combo)
    return np.asarray(rewards.call(pc.reward, frames, [plist[i] for i in idx],
                                   [pmeta[i] for i in idx]), np.float32)

  def split_indices(split: str) -> tuple[np.ndarray, str]:
    """Indices into `plist` of a file prompt set's split ('heldout' = its test split)."""
    n_train = len(prompt_set.train)
    if split == "train":
      return np.arange(n_train), split
    if split in ("heldout", "test"):
      return n_train + np.arange(len(prompt_set.test)), split
    return np.arange(len(plist)), split

  # ---------------------------------------------------------------------- Rollout data
  sampler = data_sampler(config)
  grid = sampling.time_grid(sampler).astype(np.float32)  # [S] = [N + 1]

  @jax.jit
  def rollout_program(params, key, cond):  # cond: the sampler's {'text', 'negative'}
    roll = sampling.make_rollout(velocity, None, sampler, x_sh)
    res = roll(params["model"], None, key, cond, (chunk,) + tuple(shape))
    return res.latents, res.x0_hat, decode(params["vae"], res.x0_hat)

  base_digest = rollout_cache.digest_arrays({"model": model[1:], "text": text[1:],
                                             "vae": vae[1:]})
  # The reward's source: an edited reward of the same name invalidates the cache too.
  reward_code = hashlib.sha256(
      inspect.getsource(sys.modules[rewards.get(pc.reward).__module__]).encode()
  ).hexdigest()[:16]

  def rollouts(split: str, num_prompts: int, tag: int) -> dict[str, np.ndarray]:
    """Cached rollouts of `num_prompts` prompts of `split` (x `group` each), chunk by chunk."""
    num_chunks = -(-num_prompts // pc.data.chunk_prompts)
    # Training on freshly noised clean estimates only (`prm.states = 'renoised'`) needs no
    # stored trajectory: the training cache keeps x0 alone (1 / (N + 1) of the states, what
    # makes real-size latents fit); the report's rollouts keep every state.
    x0_only = tag == 0 and pc.states == "renoised"
    data_key = jax.random.fold_in(jax.random.key(config.seed), 1000 + tag)

    def make_chunk(i):
      k_attr, k_roll = jax.random.split(jax.random.fold_in(data_key, i))
      if prompt_set.is_world:
        attrs = np.asarray(world.sample_attrs(k_attr, pc.data.chunk_prompts, split))
        combo = np.asarray(prompt_table.combo_index(attrs), np.int32)
      else:  # the chunk's prompts: a seeded draw from the split (as sample_attrs does)
        pool, _ = split_indices(split)
        combo = pool[prompts_lib.iteration_indices(len(pool), pc.data.chunk_prompts,
                                                   config.seed * 1000 + tag, i)]
      combo = np.repeat(combo, group).astype(np.int32)
      latents, x0, frames = rollout_program(base, k_roll,
                                            parallel.shard_batch(sampler_cond(combo), mesh))
      groups = i * pc.data.chunk_prompts + np.arange(chunk) // group
      out_ = {"x0": np.asarray(x0, np.float16), "reward": score(frames, combo),
              "combo": combo, "group": groups.astype(np.int32), "timesteps": grid}
      if not x0_only:
        out_["latents"] = np.asarray(latents, np.float16)
      return out_

    ingredients = {"base": base_digest, "reward": pc.reward, "reward_code": reward_code,
                   "split": split, "tag": tag,
                   "sampler": dataclasses.asdict(sampler), "cfg_scale": pc.data.cfg_scale,
                   "chunk_prompts": pc.data.chunk_prompts, "world": config.world.to_dict(),
                   "seed": config.seed, "latent_shape": shape, "format": 2}
    if not prompt_set.is_world:  # (a world run's fingerprint is unchanged)
      ingredients.update(prompts=prompt_set.fingerprint(), family=nets.family)
    if x0_only:
      ingredients["x0_only"] = True
    data = rollout_cache.load_or_make(
        os.path.join(out, "cache", split if tag == 0 else f"{split}_report"),
        rollout_cache.fingerprint(ingredients), num_chunks, make_chunk,
        keys=("x0", "reward", "combo", "group") + (() if x0_only else ("latents",)),
        ingredients=ingredients,
        write=jax.process_index() == 0, desc=f"rollouts ({split})",
        progress=jax.process_index() == 0)
    return {k: v[:num_prompts * group] for k, v in data.items()}

  t0 = time.time()
  train_data = rollouts(pc.data.split, pc.data.num_prompts, tag=0)
  data_time = time.time() - t0
  print(f"[prm] {len(train_data['reward'])} training rollouts x {len(grid)} states: reward "
        f"mean {train_data['reward'].mean():.3f}, std {train_data['reward'].std():.3f}")

  # -------------------------------------------------------------------------- Model
  prm_g, prm_p, prm_r = nets.init_prm(model, seed=config.seed + 11)
  prm_fn = nets.prm_fn(prm_g)
  tx = training.optimizer(pc.lr, pc.warmup_steps, pc.weight_decay, pc.grad_clip)

  # --------------------------------------------------------------------------- Shard
  p_sh = nets.prm_param_shardings(mesh)
  state_sh = {"params": p_sh, "opt": training.opt_shardings(tx, prm_p, p_sh, mesh),
              "step": rep}
  state = training.place({"params": prm_p, "opt": jax.jit(tx.init)(prm_p),
                          "step": jnp.zeros((), jnp.int32)}, state_sh)
  frozen = jax.device_put({"x0": train_data["x0"],
                           "label": labels(config, train_data["reward"]),
                           "combo": train_data["combo"],
                           "text": text_table, "t": grid, "rest": prm_r}, rep)
  if "latents" in train_data:
    frozen["latents"] = jax.device_put(train_data["latents"], rep)
  num_rows, num_states = train_data["x0"].shape[0], len(grid)
  base_key = jax.random.fold_in(jax.random.key(config.seed), 2)

  # -------------------------------------------------------------------------- Update
  def batch_of(frozen, key):
    """(x [B,...], t [B], text, label [B], group [B]) of random (rollout, step) pairs;
    whole groups at one step each for the Bradley-Terry loss. The state is the stored one,
    or (`prm.states`) the rollout's clean estimate noised afresh, (1 - t) x0 + t eps."""
    k_row, k_step, k_eps, k_mix = jax.random.split(key, 4)
    if pc.loss == "bradley_terry":
      ng = pc.batch_size // group
      g = jax.random.randint(k_row, (ng,), 0, num_rows // group)
      rows = (g[:, None] * group + jnp.arange(group)).reshape(-1)
      steps = jnp.repeat(jax.random.randint(k_step, (ng,), 0, num_states), group)
      gid = jnp.repeat(jnp.arange(ng), group)
    else:
      rows = jax.random.randint(k_row, (pc.batch_size,), 0, num_rows)
      steps = jax.random.randint(k_step, (pc.batch_size,), 0, num_states)
      gid = jnp.zeros((pc.batch_size,), jnp.int32)
    t = frozen["t"][steps]
    if "latents" in frozen:
      x = frozen["latents"][rows, steps].astype(jnp.float32)
    else:  # states = 'renoised' from an x0-only cache
      x = jnp.zeros((rows.shape[0],) + frozen["x0"].shape[1:], jnp.float32)
    if pc.states != "rollout":
      tb = t.reshape((-1,) + (1,) * (x.ndim - 1))
      eps = jax.random.normal(k_eps, x.shape, jnp.float32)
      fresh = (1.0 - tb) * frozen["x0"][rows].astype(jnp.float32) + tb * eps
      use = jnp.ones_like(t, bool) if pc.states == "renoised" else \
          jax.random.bernoulli(k_mix, 0.5, t.shape)
      x = jnp.where(use.reshape(tb.shape), fresh, x)
    text = jax.tree.map(lambda a: a[frozen["combo"][rows]], frozen["text"])
    return jax.lax.with_sharding_constraint(x, x_sh), t, text, frozen["label"][rows], gid

  def loss_fn(params, frozen, batch):
    x, t, text, r, gid = batch
    s = prm_fn((params, frozen["rest"]), x, t, text)
    return prm_losses.prm_loss(pc.loss, s, r, gid, threshold=pc.bce_threshold,
                               margin=pc.bt_margin)

  @functools.partial(jax.jit, in_shardings=(state_sh, rep), out_shardings=(state_sh, rep),
                     donate_argnums=0)
  def train_step(state, frozen):
    batch = batch_of(frozen, jax.random.fold_in(base_key, state["step"]))
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], frozen, batch)
    params, opt, ok = training.guarded_update(tx, grads, loss, state["params"], state["opt"])
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "skipped": 1 - ok}
    return {"params": params, "opt": opt, "step": state["step"] + 1}, metrics

  # ---------------------------------------------------------------------- Checkpoint
  mgr = checkpoint.manager(os.path.join(out, "checkpoints"))
  state = training.resume(mgr, state, "prm")
  writer = report.MetricWriter(workdir, "prm")

  # ---------------------------------------------------------------------------- Loop
  start = int(state["step"])
  t0 = time.time()
  last = {}
  with training.Preemption() as preempt:
    for step in tqdm.trange(start, pc.steps, initial=start, total=pc.steps, desc="prm",
                            disable=jax.process_index() != 0):
      state, metrics = train_step(state, frozen)
      done = step + 1
      logged = training.end_of_step(
          "prm", done, pc.steps, metrics, state, log_every=pc.log_every,
          ckpt_every=pc.ckpt_every, writer=writer, mgr=mgr, preempt=preempt,
          rate=(done - start) / (time.time() - t0))
      last = logged if logged is not None else last
  train_time = time.time() - t0
  params = (state["params"], prm_r)

  # -------------------------------------------------------------------------- Report
  t0 = time.time()
  held = rollouts(pc.report.split, pc.report.num_prompts, tag=1)
  values = _prm_values(prm_fn, params, held, grid, cond_of, chunk)
  table_ = prm_report.correlation_table(values, held["reward"], grid,
                                        tuple(pc.report.time_buckets), held["group"])
  check = guidance_check(config, velocity, decode, prm_fn, params, base, held, grid,
                         sampler_cond, score, chunk, x_sh)
  res = prm_report.nan_to_none({
      "split": pc.report.split, "num_rollouts": int(len(held["reward"])),
      "reward_mean": float(held["reward"].mean()), "reward_std": float(held["reward"].std()),
      "correlation": table_, "guidance_check": check, "loss": pc.loss,
      "train_loss": float(last.get("loss", np.nan)), "source": source,
      "seconds": {"data": data_time, "train": train_time, "report": time.time() - t0}})
  writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(out, "report.json"), "w") as f:
      json.dump(res, f, indent=1)
    prm_report.plot_report(os.path.join(out, "report.png"), res)

  # --------------------------------------------------------------------------- Final
  summary = {"stage": "prm", "steps": pc.steps, "loss": pc.loss, "source": source,
             "train_loss": res["train_loss"], "seconds": res["seconds"],
             "spearman_by_bucket": {f"{b['t_lo']:.2f}-{b['t_hi']:.2f}": b["spearman"]
                                    for b in table_["per_bucket"]},
             "guidance_grad_minus_random": check["grad_minus_random"],
             "report": os.path.join(out, "report.json"), "config": config.prm.to_dict()}
  nets.save_prm(os.path.join(out, "final"), (prm_g, state["params"], prm_r), text,
                prm_report.nan_to_none(summary))
  _print_summary(res)
  return summary


def _prm_values(prm_fn, params, data, grid, cond_of, batch: int) -> np.ndarray:
  """PRM value of every stored state: [R, S] float32."""
  program = jax.jit(prm_fn)
  lat, combo = data["latents"], data["combo"]
  out = np.zeros(lat.shape[:2], np.float32)
  for lo in range(0, lat.shape[0], batch):
    cond = cond_of(combo[lo:lo + batch])
    for s in range(lat.shape[1]):
      x = jnp.asarray(lat[lo:lo + batch, s], jnp.float32)
      t = jnp.full((x.shape[0],), grid[s], jnp.float32)
      out[lo:lo + batch, s] = np.asarray(program(params, x, t, cond))
  return out


def guidance_check(config, velocity, decode, prm_fn, params, base, data, grid, cond_of,
                   score, batch: int, x_sh) -> dict:
  """From the stored states at the grid step nearest `prm.report.guidance_t`, move x_t by
  `guidance_step` (RMS per element) along the PRM gradient, along minus it, along a random
  direction, or not at all; finish each with an Euler ODE and score the decoded result."""
  rc = config.prm.report
  i = int(np.argmin(np.abs(grid[:-1] - rc.guidance_t)))
  t_star = float(grid[i])
  ode = sampling.preset("ode", grid=tuple(np.linspace(t_star, 0.0, rc.ode_steps + 1)),
                        num_steps=rc.ode_steps)
  dirs = ("base", "grad", "neg", "random")

  @jax.jit
  def program(params, model_vae, x, cond, key):
    t = jnp.full((x.shape[0],), t_star, jnp.float32)
    grad = jax.grad(lambda y: jnp.sum(prm_fn(params, y, t, cond["text"])))(x)
    unit = _rms_unit(grad)
    rand = _rms_unit(jax.random.normal(key, x.shape, jnp.float32))
    # One ODE batch of the four starts [base | +grad | -grad | random] (4 B samples).
    starts = jnp.concatenate([x + rc.guidance_step * d for d in (0.0 * unit, unit, -unit,
                                                                   rand)])
    cond4 = jax.tree.map(lambda a: jnp.concatenate([a] * 4), cond)
    roll = sampling.make_rollout(velocity, None, ode, x_sh)
    res = roll(model_vae["model"], None, key, cond4, starts.shape, x_init=starts)
    return jnp.split(decode(model_vae["vae"], res.x0_hat), 4)

  rewards_ = {d: [] for d in dirs}
  key = jax.random.fold_in(jax.random.key(config.seed), 3)
  for lo in range(0, data["latents"].shape[0], batch):
    x = jnp.asarray(data["latents"][lo:lo + batch, i], jnp.float32)
    combo = data["combo"][lo:lo + batch]
    frames = program(params, base, x, cond_of(combo), jax.random.fold_in(key, lo))
    for d, f in zip(dirs, frames):
      rewards_[d].append(score(f, combo))
  r = {d: np.concatenate(v) for d, v in rewards_.items()}
  out = {"t": t_star, "step_index": i, "step_rms": float(rc.guidance_step),
         "ode_steps": int(rc.ode_steps),
         **{f"reward_{d}": float(v.mean()) for d, v in r.items()},
         "grad_minus_random": prm_report.paired_stats(r["grad"], r["random"]),
         "grad_minus_base": prm_report.paired_stats(r["grad"], r["base"]),
         "random_minus_base": prm_report.paired_stats(r["random"], r["base"]),
         "neg_minus_base": prm_report.paired_stats(r["neg"], r["base"])}
  return out


def _print_summary(res: dict) -> None:
  fmt = lambda v: "nan" if v is None else f"{v:+.3f}"
  rows = ", ".join(f"t in [{b['t_lo']:.2f},{b['t_hi']:.2f}]: {fmt(b['spearman'])} "
                   f"(within group {fmt(b.get('within_group'))})"
                   for b in res["correlation"]["per_bucket"])
  g = res["guidance_check"]
  d = g["grad_minus_random"]
  print(f"[prm] Spearman(R_phi, reward) on {res['num_rollouts']} {res['split']} rollouts: "
        f"{rows}")
  print(f"[prm] guidance check at t={g['t']:.2f}: reward base {g['reward_base']:.4f}, "
        f"gradient {g['reward_grad']:.4f}, random {g['reward_random']:.4f}, -gradient "
        f"{g['reward_neg']:.4f}; gradient - random = {fmt(d['mean'])} +- "
        f"{d['stderr'] if d['stderr'] is not None else float('nan'):.4f} (z = "
        f"{fmt(d['z'])})")
