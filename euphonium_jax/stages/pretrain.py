"""The `pretrain` stage: rectified-flow training of the video transformer and text encoder.

Each step renders clips of the training combos, encodes them with the frozen VAE, and
regresses the velocity `eps - x0` at `x_t = (1 - t) x0 + t eps`, with t from a (shifted)
logit-normal law and captions dropped at random for classifier-free guidance. Data-parallel
over the mesh; parameters sharded by the logical-axis rules; EMA weights kept for sampling.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from euphonium_jax import checkpoint, embedded, generate, parallel, report, training
from euphonium_jax.data import prompt_table, world


def stage_dir(workdir: str) -> str:
  return os.path.join(workdir, "pretrain")


def is_done(workdir: str) -> bool:
  return checkpoint.is_done(os.path.join(stage_dir(workdir), "final"))


def sample_times(key, n: int, law: str, shift: float) -> jax.Array:
  """t in (0, 1): logit-normal or uniform, then the time shift s t / (1 + (s - 1) t)."""
  if law == "logit_normal":
    t = jax.nn.sigmoid(jax.random.normal(key, (n,)))
  else:
    t = jax.random.uniform(key, (n,), minval=1e-3, maxval=1.0 - 1e-3)
  return shift * t / (1.0 + (shift - 1.0) * t)


def flow_matching_loss(velocity, params, x0, t, eps, text) -> jax.Array:
  """Mean squared error between v(x_t, t) and eps - x0 (float32)."""
  tb = t.reshape((-1,) + (1,) * (x0.ndim - 1))
  x_t = (1.0 - tb) * x0 + tb * eps
  v = velocity(params, x_t, t, text).astype(jnp.float32)
  return jnp.mean((v - (eps - x0)) ** 2)


def encode_dataset(encode, vae_state, config, key, chunk: int = 256):
  """A fixed set of training clips as VAE latents: ([D, T', h, w, C] float32, combo [D]).

  Encoding every batch afresh costs about as much as the flow model's own step on a CPU;
  a cached set of `config.pretrain.dataset_size` clips removes that cost.
  """
  n = config.pretrain.dataset_size
  program = jax.jit(lambda k: _encode_chunk(encode, vae_state, config, k, chunk))
  keys = jax.random.split(key, -(-n // chunk))
  parts = [program(k) for k in tqdm.tqdm(keys, desc="encoding clips",
                                         disable=jax.process_index() != 0)]
  latents = jnp.concatenate([p[0] for p in parts])[:n]
  combos = jnp.concatenate([p[1] for p in parts])[:n]
  return latents, combos


def _encode_chunk(encode, vae_state, config, key, chunk):
  clips, attrs = world.sample_batch(key, chunk, "train", config.world.frames, config.world.size)
  return encode(vae_state, clips), prompt_table.combo_index(attrs)


def run(config, workdir: str) -> dict:
  tc = config.pretrain
  out = stage_dir(workdir)

  # ---------------------------------------------------------------------------- Mesh
  mesh = parallel.mesh_from_config(config)
  if not parallel.batch_size_ok(tc.batch_size, mesh):
    raise ValueError(f"config.pretrain.batch_size={tc.batch_size} must be divisible by the "
                     f"data-parallel size {parallel.data_parallel_size(mesh)}")
  rep = parallel.replicated(mesh)

  # -------------------------------------------------------------------------- Models
  vae_g, vae_p, vae_r = embedded.load("vae", config, embedded.vae_dir(config, workdir))
  encode = embedded.encode_fn(vae_g)
  dit = embedded.build("model", config, seed=config.seed)
  text = embedded.build("text", config, seed=config.seed + 1)
  dit_g, dit_p, dit_r = embedded.split_params(dit)
  text_g, text_p, text_r = embedded.split_params(text)
  velocity = embedded.velocity_fn(dit_g)
  text_fn = embedded.text_fn(text_g)
  table = embedded.prompt_table(config)
  tx = training.optimizer(tc.lr, tc.warmup_steps, tc.weight_decay, tc.grad_clip)

  # --------------------------------------------------------------------------- Shard
  params = {"model": dit_p, "text": text_p}
  p_sh = {"model": training.param_shardings(dit, mesh, config.sharding.rules),
          "text": training.param_shardings(text, mesh, config.sharding.rules)}
  state_sh = {"params": p_sh, "ema": p_sh, "step": rep,
              "opt": training.opt_shardings(tx, params, p_sh, mesh)}
  state = training.place({"params": params, "ema": jax.tree.map(np.array, params),
                          "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}, state_sh)
  frozen = {"vae": (vae_p, vae_r), "rest": (dit_r, text_r), "ids": table.ids,
            "mask": table.mask}
  if tc.dataset_size:
    frozen["data"] = encode_dataset(encode, frozen["vae"], config,
                                    jax.random.key(config.seed + 3))
  frozen = jax.device_put(frozen, rep)
  base_key = jax.random.key(config.seed)
  x_sh = parallel.batch_sharding(mesh, 5)
  latent_shape = embedded.latent_shape(config)

  # -------------------------------------------------------------------------- Update
  def loss_fn(params, frozen, x0, t, eps, idx):
    cond = text_fn((params["text"], frozen["rest"][1]), frozen["ids"][idx], frozen["mask"][idx])
    return flow_matching_loss(velocity, (params["model"], frozen["rest"][0]), x0, t, eps, cond)

  @functools.partial(jax.jit, in_shardings=(state_sh, rep), out_shardings=(state_sh, rep),
                     donate_argnums=0)
  def train_step(state, frozen):
    key = jax.random.fold_in(base_key, state["step"])
    k_data, k_t, k_eps, k_drop = jax.random.split(key, 4)
    if tc.dataset_size:  # a cached set of encoded clips
      pick = jax.random.randint(k_data, (tc.batch_size,), 0, tc.dataset_size)
      x0, combo = frozen["data"][0][pick], frozen["data"][1][pick]
    else:  # fresh clips every step
      clips, attrs = world.sample_batch(k_data, tc.batch_size, "train", config.world.frames,
                                        config.world.size)
      x0 = encode(frozen["vae"], jax.lax.with_sharding_constraint(clips, x_sh))
      combo = prompt_table.combo_index(attrs)
    x0 = jax.lax.with_sharding_constraint(x0, x_sh)
    t = sample_times(k_t, tc.batch_size, tc.time_sampling, tc.time_shift)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    drop = jax.random.bernoulli(k_drop, tc.caption_dropout, (tc.batch_size,))
    idx = jnp.where(drop, table.null_index, combo)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], frozen, x0, t, eps, idx)
    params, opt, ok = training.guarded_update(tx, grads, loss, state["params"], state["opt"])
    # EMA with warmup: min(decay, (1 + step) / (10 + step)) forgets the initial weights
    # early, so evaluations of short runs are not an average with the random init.
    step = state["step"].astype(jnp.float32)
    decay = jnp.minimum(tc.ema_decay, (1.0 + step) / (10.0 + step))
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], params)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "skipped": 1 - ok}
    return {"params": params, "ema": ema, "opt": opt, "step": state["step"] + 1}, metrics

  # ---------------------------------------------------------------------- Checkpoint
  mgr = checkpoint.manager(os.path.join(out, "checkpoints"))
  state = training.resume(mgr, state, "pretrain")
  writer = report.MetricWriter(workdir, "pretrain")

  gen = generate.Generator.from_params(  # one instance: its programs compile once
      config, vae=(vae_g, vae_p, vae_r), text=None, model=None, mesh=mesh)

  def evaluate(step):
    gen.text = (text_g, state["ema"]["text"], text_r)
    gen.model = (dit_g, state["ema"]["model"], dit_r)
    res = gen.evaluate(jax.random.key(config.seed + 7), os.path.join(out, "samples"),
                       f"step_{step:06d}")
    writer.write(step, {f"eval/{k}": v for k, v in res.items() if np.isscalar(v)})
    return res

  # ---------------------------------------------------------------------------- Loop
  start = int(state["step"])
  t0 = time.time()
  with training.Preemption() as preempt:
    for step in tqdm.trange(start, tc.steps, initial=start, total=tc.steps, desc="pretrain",
                            disable=jax.process_index() != 0):
      state, metrics = train_step(state, frozen)
      done = step + 1
      training.end_of_step(
          "pretrain", done, tc.steps, metrics, state, log_every=tc.log_every,
          ckpt_every=tc.ckpt_every, writer=writer, mgr=mgr, preempt=preempt,
          rate=(done - start) / (time.time() - t0))
      if done % tc.eval_every == 0 and done != tc.steps:
        evaluate(done)
  train_time = time.time() - t0

  # --------------------------------------------------------------------------- Final
  results = evaluate(tc.steps)
  writer.close()
  summary = {k: v for k, v in results.items() if np.isscalar(v)}
  summary.update(stage="pretrain", steps=tc.steps, train_seconds=train_time,
                 samples=os.path.join(out, "samples"))
  checkpoint.save_final(os.path.join(out, "final"), {
      "model": {"params": state["ema"]["model"], "rest": dit_r},
      "text": {"params": state["ema"]["text"], "rest": text_r},
      "vae": {"params": vae_p, "rest": vae_r},
  }, summary, config_json=config.to_json_best_effort(indent=2))
  print("[pretrain] done: " + ", ".join(
      f"{k}={v:.4g}" for k, v in summary.items() if isinstance(v, float)))
  return summary
