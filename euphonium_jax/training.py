"""What every training stage shares: the optimiser, the sharded train state, preemption.

A train state is a plain dict pytree `{'params', 'opt', 'step', ...}` of pure-dict parameter
trees (from `nnx.split` + `nnx.to_pure_dict`): orbax saves it as is and `nnx.merge` accepts
the parameter dicts directly.
"""

from __future__ import annotations

import signal
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from euphonium_jax import checkpoint, parallel


def optimizer(lr: float, warmup_steps: int, weight_decay: float, grad_clip: float,
              b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
  """AdamW after global-norm clipping, linear warmup then a constant rate."""
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, lr, max(warmup_steps, 1)), optax.constant_schedule(lr)],
      [max(warmup_steps, 1)]) if warmup_steps > 0 else lr
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
  return optax.chain(*parts)


def param_shardings(module_or_state, mesh: Mesh, rules) -> Any:
  """Pure-dict tree of NamedShardings for a module's nnx.Param leaves (logical rules)."""
  state = module_or_state
  if isinstance(module_or_state, nnx.Module):
    state = nnx.state(module_or_state, nnx.Param)
  return nnx.to_pure_dict(parallel.state_shardings(state, mesh, rules))


def opt_shardings(tx: optax.GradientTransformation, params: Any, p_shardings: Any,
                  mesh: Mesh) -> Any:
  """Shardings of the optimiser state: moments follow their parameters, scalars replicate."""
  abstract_opt = jax.eval_shape(tx.init, params)
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, p_shardings,
      transform_non_params=lambda _: parallel.replicated(mesh),
      is_leaf=lambda x: isinstance(x, NamedSharding))


def place(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def all_finite(tree: Any) -> jax.Array:
  """A bool scalar: every floating leaf of `tree` is free of NaN and inf (traceable)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def guarded_update(tx: optax.GradientTransformation, grads, loss, params, opt_state):
  """One optimiser update, kept only if the loss, the gradients, the new parameters and the
  new optimiser state are all finite: a select inside the jitted step (no host sync), so a
  NaN from the optimiser itself (b1 = 1, lr = inf, a corrupt moment) is a no-op too.

  Returns (params, opt_state, ok) with ok a bool scalar: False means the step was skipped.
  """
  updates, new_opt = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  ok = (jnp.isfinite(loss) & all_finite(grads) & all_finite(new_params)
        & all_finite(new_opt))
  keep = lambda new, old: jnp.where(ok, new, old)
  return jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt, opt_state), ok


def resume(mgr, state, stage: str, layout_hints: dict[str, str] | None = None):
  """The newest intact checkpoint of `mgr` restored into `state`'s shapes and shardings, or
  `state` when there is none (damaged newer ones are named and set aside; a checkpoint of
  another layout is refused naming the setting from `layout_hints`: `checkpoint`)."""
  restored = checkpoint.restore_latest(mgr, checkpoint.abstract_like(state), layout_hints)
  if restored is None:
    return state
  print(f"[{stage}] resumed from step {restored[0]}")
  return restored[1]


def last_good_checkpoint(mgr) -> int | None:
  """The newest step of `mgr` verified now against its digest (it was finite when saved,
  `checkpoint.save` refuses anything else), or None: what a stop message may name."""
  return checkpoint.last_intact_step(mgr)


def end_of_step(stage: str, done: int, total: int, metrics, state, *, log_every: int,
                ckpt_every: int, writer, mgr, preempt: "Preemption", rate: float):
  """What every training loop does after a step: log (refusing a non-finite loss), save a
  checkpoint when due or when SIGTERM arrived, and exit cleanly after that save.

  Returns the host copy of `metrics` when they were logged, else None.
  """
  logged = None
  if done % log_every == 0 or done == total:
    logged = jax.device_get(metrics)
    if not np.isfinite(logged["loss"]):
      raise FloatingPointError(f"[{stage}] non-finite loss at step {done}")
    writer.write(done, dict(logged, steps_per_s=rate))
  if done % ckpt_every == 0 or done == total or preempt.requested:
    checkpoint.save(mgr, done, state)
  if preempt.requested:
    print(f"[{stage}] SIGTERM: saved step {done}, exiting")
    writer.close()
    raise SystemExit(0)
  return logged


class Preemption:
  """Turns SIGTERM into a flag the loop checks: save, then exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. inside a notebook worker).
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False
