"""Dual-reward GRPO: advantages, the clipped-ratio loss, the kernel KL, distillation, the update.

The math of DESIGN.md section 4, as pure functions of arrays (no network, no mesh), and
`make_update`, which turns a velocity function into the GRPO optimiser step

  update(state, batch) -> (state, metrics)

that the `grpo` stage jits with its shardings (and a test re-implements naively).

Per trained transition (sample j, step k):

  ratio     = exp(log pi_theta(x_{k+1} | x_k) - log pi_old(x_{k+1} | x_k))
  A^o_{j,i} = clip((r_{i,j} - mean_group) / (std_group + adv_eps), +-adv_clip)   per term i
  A^p_{j,k} = clip((R_{j,k} - mean_group,k) / (std_group,k + adv_eps), +-adv_clip)
  L_clip(A) = mean max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))
  L         = c_o sum_i w_i L_clip(A^o_i) + c_p L_clip(A^p) + c_kl KL_k + c_d D_k

Standard deviations are unbiased (`adv_std = 'sample'`, ddof = 1) and `adv_eps = 1e-8` by
default (DESIGN.md); Flow-GRPO uses the population std (ddof = 0) + 1e-4. A group whose
rewards are all equal gets advantage 0 exactly (its deviations are only rounding error, which
a small eps would blow up). The networks of step k are evaluated at `arrs.t_model[k]` (t_k, or
Wan's truncated integer timestep), the kernel at t_k. With an SDE window (Flow-GRPO-Fast,
MixGRPO) only the window's steps are SDE steps: `select_steps` draws among them (`mask`) and
`Batch.sde_mask` keeps any other step out of the loss.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from euphonium_jax import sampling

ADVANTAGE_MODES = ("none", "only", "both")  # which of the process advantage enters
PROCESS_SOURCES = ("pre", "post", "delta")
ADV_STDS = ("sample", "population")  # the group std: ddof 1 (DESIGN.md) | ddof 0 (Flow-GRPO)
STEP_SELECTIONS = ("random", "first")  # trained transitions: a random subset | the first K
ZERO_STD = 1e-6  # a group std at or below this (relative to the reward scale) counts as zero


# ------------------------------------------------------------------------------ Advantages


def _ddof(adv_std: str) -> int:
  if adv_std not in ADV_STDS:
    raise ValueError(f"grpo.adv_std = {adv_std!r} is not allowed: choose one of "
                     + ", ".join(ADV_STDS))
  return 1 if adv_std == "sample" else 0


def group_stats(values: jax.Array, group_size: int, adv_std: str = "sample"):
  """Per-group mean and std of `values` `[B, ...]` (consecutive groups of G); the std is the
  unbiased one (`adv_std = 'sample'`, ddof 1) or the population one (ddof 0).

  Returns (mean, std) broadcast back to `[B, ...]`.
  """
  b = values.shape[0]
  v = values.astype(jnp.float32).reshape((b // group_size, group_size) + values.shape[1:])
  mean = jnp.mean(v, axis=1, keepdims=True)
  std = jnp.std(v, axis=1, keepdims=True, ddof=_ddof(adv_std))
  back = lambda a: jnp.broadcast_to(a, v.shape).reshape(values.shape)
  return back(mean), back(std)


def normalise(values: jax.Array, group_size: int, clip: float, adv_std: str = "sample",
              adv_eps: float = 1e-8) -> jax.Array:
  """`clip((v - mean_group) / (std_group + adv_eps), -clip, clip)` along axis 0 (`[B, ...]`);
  0 in groups whose values are all equal."""
  mean, std = group_stats(values, group_size, adv_std)
  scale = 1.0 + jnp.abs(mean)
  adv = (values.astype(jnp.float32) - mean) / (std + adv_eps)
  adv = jnp.where(std > ZERO_STD * scale, adv, 0.0)
  return jnp.clip(adv, -clip, clip)


def outcome_advantages(rewards: jax.Array, group_size: int, clip: float,
                       adv_std: str = "sample", adv_eps: float = 1e-8) -> jax.Array:
  """`[T, B]` outcome rewards (one row per named term) -> `[T, B]` advantages."""
  return jax.vmap(lambda r: normalise(r, group_size, clip, adv_std, adv_eps))(rewards)


def process_values(process_rewards: jax.Array, source: str) -> jax.Array:
  """The process reward of transition k `[B, N]` from the PRM scores at the pre-step states.

  `pre`: R(x_k) (the reference's; independent of the action taken at k); `post`:
  R(x_{k+1}) (0 for the last step, whose post-step state is never scored); `delta`: the change
  R(x_{k+1}) - R(x_k). Unscored states carry 0, so `post` / `delta` are meaningful where both
  states are scored (e.g. with `sampling.score_unguided_steps`).
  """
  pre = process_rewards.astype(jnp.float32)
  post = jnp.concatenate([pre[:, 1:], jnp.zeros_like(pre[:, :1])], axis=1)
  if source == "pre":
    return pre
  if source == "post":
    return post
  if source == "delta":
    return post - pre
  raise ValueError(f"grpo.process_source = {source!r} is not allowed: choose one of "
                   + ", ".join(PROCESS_SOURCES))


def process_advantages(process_rewards: jax.Array, group_size: int, clip: float,
                       source: str = "pre", adv_std: str = "sample",
                       adv_eps: float = 1e-8) -> jax.Array:
  """`[B, N]` per-step process advantages, normalised per group and step."""
  return normalise(process_values(process_rewards, source), group_size, clip, adv_std, adv_eps)


def group_report(rewards: jax.Array, group_size: int) -> dict[str, jax.Array]:
  """Per-group diagnostics of one reward `[B]`: mean of group means and stds, and the
  fraction of groups whose rewards are all equal (they carry no outcome signal)."""
  v = rewards.astype(jnp.float32).reshape(-1, group_size)
  std = jnp.std(v, axis=1, ddof=1)
  zero = std <= ZERO_STD * (1.0 + jnp.abs(jnp.mean(v, axis=1)))
  return {"mean": jnp.mean(v), "group_std": jnp.mean(std),
          "zero_std_fraction": jnp.mean(zero.astype(jnp.float32))}


# ----------------------------------------------------------------------------- Losses


def clipped_loss(ratio: jax.Array, adv: jax.Array, eps: float) -> jax.Array:
  """`mean max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))` over all entries."""
  adv = adv.astype(jnp.float32)
  return jnp.mean(jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - eps, 1.0 + eps)))


def kl_weight(t, t_next, g) -> jax.Array:
  """`(dt / (2 g^2)) (1 + g^2 (1 - t) / (2 t))^2`: KL_k per unit mean((v - v_ref)^2)."""
  dt = t - t_next
  g2 = g * g
  return dt / (2.0 * g2) * (1.0 + g2 * (1.0 - t) / (2.0 * t)) ** 2


def kernel_kl(v: jax.Array, v_ref: jax.Array, t, t_next, g) -> jax.Array:
  """Exact KL `[B]` between the unguided Gaussian kernels of velocities `v` and `v_ref` at
  one step (same variance g^2 dt), per latent dimension (mean, matching the log-probs)."""
  d = (v.astype(jnp.float32) - v_ref.astype(jnp.float32)).reshape(v.shape[0], -1)
  return kl_weight(t, t_next, g) * jnp.mean(d * d, axis=-1)


def distillation(mean_theta: jax.Array, mean_guided: jax.Array, t, t_next, g) -> jax.Array:
  """`D_k` `[B]`: KL from the guided rollout kernel (mean `mean_guided`, held fixed) to the
  network's unguided kernel, per latent dimension: `mean((mu - mu^G)^2) / (2 g^2 dt)`."""
  d = (mean_theta.astype(jnp.float32)
       - jax.lax.stop_gradient(mean_guided.astype(jnp.float32))).reshape(mean_theta.shape[0], -1)
  return jnp.mean(d * d, axis=-1) / (2.0 * g * g * (t - t_next))


# ---------------------------------------------------------------------------- Transitions


def num_trained_steps(num_steps: int, fraction: float, trainable: int | None = None) -> int:
  """How many transitions each sample trains: `int(fraction * trainable)`, at least 1, of its
  `trainable` SDE steps among 0 .. N - 2 (default N - 1: every step but the last, N - 1, which
  is never trained; with an SDE window, `sampling.trainable_per_sample`)."""
  trainable = num_steps - 1 if trainable is None else trainable
  return max(1, int(fraction * trainable + 1e-9))


def select_steps(key: jax.Array, batch: int, num_steps: int, fraction: float,
                 selection: str = "random", mask: jax.Array | None = None,
                 trainable: int | None = None) -> jax.Array:
  """`[B, K]` int32 trained transitions per sample, from the trainable steps 0 .. N - 2:
  `random`: the first K entries of the sample's own random permutation (DESIGN.md);
  `first`: 0 .. K - 1 in order for every sample (Flow-GRPO's; `key` unused).

  `mask` `[B, N]` bool (a windowed rollout's `sde_mask`) restricts both to each sample's SDE
  steps: `random` keeps the permutation's order among them (a uniform subset; with an all-True
  mask exactly the unmasked selection), `first` takes them in order. Every sample must have at
  least `trainable` of them (K = `num_trained_steps(num_steps, fraction, trainable)`); ODE steps
  are never selected. Jittable (`batch`, `num_steps`, `fraction`, `trainable` static)."""
  k = num_trained_steps(num_steps, fraction, trainable)
  if selection not in STEP_SELECTIONS:
    raise ValueError(f"grpo.step_selection = {selection!r} is not allowed: choose one of "
                     + ", ".join(STEP_SELECTIONS))
  if mask is None:
    if selection == "first":
      return jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (batch, k))
    keys = jax.random.split(key, batch)
    perm = jax.vmap(lambda kk: jax.random.permutation(kk, num_steps - 1))(keys)
    return perm[:, :k].astype(jnp.int32)
  ok = jnp.asarray(mask, bool)[:, :num_steps - 1]  # the last transition is never trained
  if selection == "first":
    order = jnp.broadcast_to(jnp.arange(num_steps - 1, dtype=jnp.int32), (batch, num_steps - 1))
  else:
    keys = jax.random.split(key, batch)
    order = jax.vmap(lambda kk: jax.random.permutation(kk, num_steps - 1))(keys)
  on = jnp.take_along_axis(ok, order, axis=1)
  first_sde = jnp.argsort(~on, axis=1, stable=True)  # SDE steps first, in `order`'s order
  return jnp.take_along_axis(order, first_sde, axis=1)[:, :k].astype(jnp.int32)


# ----------------------------------------------------------------------------- Update


class Hyper(NamedTuple):
  """Static loss settings (hashable)."""
  mode: str = "both"             # none | only | both (process advantage)
  outcome_coef: float = 1.0
  process_coef: float = 1.0
  outcome_weights: tuple = (1.0,)  # w_i per outcome term
  clip_range: float = 1e-4
  kl_coef: float = 0.0
  distill_coef: float = 0.0
  logprob_mean: str = "unguided"   # the rollout's: log-probs under the unguided / guided mean
  distill_teacher: str = "rollout"  # D_k's target: the rollout's guided mean | a frozen one's


class Batch(NamedTuple):
  """What one optimiser step trains on; leading axis = samples `M` (accumulation x micro).

  latents `[M, N + 1, ...]`, logprobs `[M, N]` (old), adv_outcome `[M, T]`, adv_process
  `[M, N]`, steps `[M, K]` (trained transitions), cond: text pytree `[M, ...]`,
  means_guided `[M, N, ...]` (the rollout's guided means; needed for D_k and for
  guided-mean log-probs, else None), guidance `[M, N, ...]` (mu^G - mu at the rollout;
  needed for guided-mean log-probs, else None), sde_mask `[M, N]` bool (a windowed rollout's
  SDE steps, else None): a transition off it (an ODE step) contributes nothing to the loss,
  its gradient or the metrics' numerators (ratio 1, advantage 0).
  """
  latents: jax.Array
  logprobs: jax.Array
  adv_outcome: jax.Array
  adv_process: jax.Array
  steps: jax.Array
  cond: Any
  means_guided: Optional[jax.Array] = None
  guidance: Optional[jax.Array] = None
  sde_mask: Optional[jax.Array] = None


def _take(a: jax.Array, idx: jax.Array) -> jax.Array:
  """`a[b, idx[b]]` for `a` `[M, S, ...]`, `idx` `[M]`."""
  return jnp.take_along_axis(a, idx.reshape((-1, 1) + (1,) * (a.ndim - 2)), axis=1)[:, 0]


def transition_loss(params, ref_params, batch: Batch, col: int | jax.Array, velocity_fn,
                    arrs: sampling.GridArrays, hp: Hyper, teacher_params=None):
  """Loss of the `col`-th trained transition of every sample in `batch` and its diagnostics.

  `teacher_params` (used when `hp.distill_teacher == 'frozen'`): the frozen teacher whose
  guided kernel, mu(x_k; v_teacher) + the rollout's guidance shift at x_k, is D_k's target."""
  s = batch.steps[:, col]  # [M] step index per sample
  t_all, g_all = jnp.asarray(arrs.t), jnp.asarray(arrs.g)
  t, t_next, g = t_all[s], t_all[s + 1], g_all[s]
  t_net = jnp.asarray(arrs.t_model)[s]  # the networks' time (t unless truncated)
  guided = jnp.asarray(arrs.guided)[s].astype(jnp.float32)
  x_k = _take(batch.latents, s).astype(jnp.float32)
  x_next = _take(batch.latents, s + 1).astype(jnp.float32)
  v = velocity_fn(params, x_k, t_net, batch.cond).astype(jnp.float32)
  shift = None
  if hp.logprob_mean == "guided":
    shift = _take(batch.guidance, s)
  lp = sampling.step_logprob(x_k, x_next, v, t, t_next, g, guidance_term=shift)
  old = jnp.take_along_axis(batch.logprobs, s[:, None], axis=1)[:, 0]
  if batch.sde_mask is None:
    log_ratio = lp - old
    on = lambda a: a
  else:  # an ODE step of a windowed rollout: ratio 1, advantage 0, no KL or distillation
    sde = jnp.take_along_axis(batch.sde_mask, s[:, None], axis=1)[:, 0]
    log_ratio = jnp.where(sde, lp - old, 0.0)
    on = lambda a: jnp.where(sde, a, 0.0)
  ratio = jnp.exp(log_ratio)
  zero = jnp.zeros((), jnp.float32)
  policy = zero
  if hp.mode in ("none", "both"):
    for i, w in enumerate(hp.outcome_weights):
      policy = policy + hp.outcome_coef * w * clipped_loss(ratio, on(batch.adv_outcome[:, i]),
                                                           hp.clip_range)
  if hp.mode in ("only", "both"):
    adv_p = jnp.take_along_axis(batch.adv_process, s[:, None], axis=1)[:, 0]
    policy = policy + hp.process_coef * clipped_loss(ratio, on(adv_p), hp.clip_range)
  kl = zero
  if hp.kl_coef > 0:
    v_ref = jax.lax.stop_gradient(velocity_fn(ref_params, x_k, t_net, batch.cond))
    kl = jnp.mean(on(kernel_kl(v, v_ref, t, t_next, g)))
  dist = zero
  if hp.distill_coef > 0:
    mu = sampling.step_mean(x_k, v, t, t_next, g)
    if hp.distill_teacher == "frozen":  # the shift depends on x_k and the PRM only
      v_teacher = velocity_fn(teacher_params, x_k, t_net, batch.cond).astype(jnp.float32)
      target = sampling.step_mean(x_k, v_teacher, t, t_next, g) + _take(batch.guidance, s)
    else:
      target = _take(batch.means_guided, s)
    d = distillation(mu, target, t, t_next, g)
    dist = jnp.mean(on(guided * d))
  loss = policy + hp.kl_coef * kl + hp.distill_coef * dist
  metrics = {"loss": loss, "policy_loss": policy, "kl": kl, "distill": dist,
             "ratio_mean": jnp.mean(ratio), "ratio_dev_sq": jnp.mean((ratio - 1.0) ** 2),
             "clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > hp.clip_range)
                                       .astype(jnp.float32)),
             "approx_kl": 0.5 * jnp.mean(log_ratio ** 2)}
  return loss, metrics


def make_loss(velocity_fn: Callable, arrs: sampling.GridArrays, hp: Hyper):
  """`loss(params, ref_params, batch) -> (loss, metrics)`: the mean over all M x K trained
  transitions (what one optimiser step minimises; `make_update` computes its gradient in
  micro-batches instead)."""

  def loss(params, ref_params, batch: Batch, teacher_params=None):
    k = batch.steps.shape[1]
    outs = [transition_loss(params, ref_params, batch, j, velocity_fn, arrs, hp, teacher_params)
            for j in range(k)]
    return (sum(o[0] for o in outs) / k,
            jax.tree.map(lambda *m: sum(m) / k, *[o[1] for o in outs]))
  return loss


def make_update(velocity_fn: Callable, tx: optax.GradientTransformation,
                arrs: sampling.GridArrays, hp: Hyper, accumulation: int = 1,
                guard: Callable | None = None, constrain: Callable | None = None):
  """The optimiser step `update(state, batch) -> (state, metrics)`.

  `state` is `{'params', 'opt', 'ref', 'teacher', ...}` (`ref` the frozen reference
  parameters, used when `hp.kl_coef > 0`; `teacher` the frozen distillation teacher, used when
  `hp.distill_teacher == 'frozen'`); other keys pass through. The batch of M samples is split
  into `accumulation` micro-batches; for each, and each of its K trained transitions, the
  gradient of that transition's loss is accumulated (a `lax.scan`: memory of one forward
  and backward of a micro-batch). The step applies the mean gradient (the gradient of
  `make_loss`), unless the loss or the gradient is non-finite (`guard`:
  `training.guarded_update`-like `(tx, grads, loss, params, opt) -> (params, opt, ok)`).
  `constrain` is applied to each micro-batch (e.g. a sharding constraint).
  """
  grad_fn = jax.value_and_grad(transition_loss, has_aux=True)

  def update(state, batch: Batch):
    params = state["params"]
    ref = state.get("ref", params)
    teacher = state.get("teacher")
    m, k = batch.steps.shape
    if m % accumulation:
      raise ValueError(f"{m} samples per update do not split into {accumulation} micro-batches")
    micro = jax.tree.map(lambda a: a.reshape((accumulation, m // accumulation) + a.shape[1:]),
                         batch)

    def one_micro(acc, mb):
      if constrain is not None:
        mb = constrain(mb)

      def one_col(acc, col):
        (loss, met), g = grad_fn(params, ref, mb, col, velocity_fn, arrs, hp, teacher)
        return jax.tree.map(jnp.add, acc, (g, met)), None

      return jax.lax.scan(one_col, acc, jnp.arange(k))[0], None

    zeros = (jax.tree.map(jnp.zeros_like, params),
             jax.eval_shape(lambda: grad_fn(params, ref, jax.tree.map(lambda a: a[0], micro),
                                            0, velocity_fn, arrs, hp, teacher)[0][1]))
    zeros = (zeros[0], jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros[1]))
    grads, met = jax.lax.scan(one_micro, zeros, micro)[0]
    n = accumulation * k
    grads = jax.tree.map(lambda g: g / n, grads)
    met = jax.tree.map(lambda a: a / n, met)
    if guard is None:
      updates, opt = tx.update(grads, state["opt"], params)
      new_params, ok = optax.apply_updates(params, updates), jnp.array(True)
    else:
      new_params, opt, ok = guard(tx, grads, met["loss"], params, state["opt"])
    # Var(r) = E[(r - 1)^2] - (E[r] - 1)^2: about 1, E[r^2] - E[r]^2 cancels in float32.
    dev = met["ratio_mean"] - 1.0
    met["ratio_std"] = jnp.sqrt(jnp.maximum(met.pop("ratio_dev_sq") - dev * dev, 0.0))
    met["grad_norm"] = optax.tree.norm(grads)
    met["skipped"] = 1 - ok.astype(jnp.int32)
    return dict(state, params=new_params, opt=opt), met

  return update
