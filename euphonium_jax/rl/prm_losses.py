"""Training losses of the latent process reward model (PRM), pure jnp, float32.

Each loss maps the PRM's outputs `s [B]` (logits) on states `x_t` of base-model rollouts
and the outcome reward `r [B]` of each state's finished rollout to a scalar:

  regression     mean (s - r)^2                    s estimates E[r | x_t] (the value)
  bce            mean BCE(sigmoid(s), 1[r > tau])  sigmoid(s) estimates P(r > tau | x_t)
  bradley_terry  mean over pairs (i, j) of one group with r_i > r_j + margin of
                 -log sigmoid(s_i - s_j)           s ranks the states of a group

A group is the set of states with the same group id (e.g. the rollouts of one prompt at one
step); pairs never cross groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSSES = ("regression", "bce", "bradley_terry")


def regression_loss(s: jax.Array, r: jax.Array) -> jax.Array:
  """Mean squared error between predictions `s [B]` and rewards `r [B]`."""
  s, r = s.astype(jnp.float32), r.astype(jnp.float32)
  return jnp.mean((s - r) ** 2)


def bce_loss(s: jax.Array, r: jax.Array, threshold: float) -> jax.Array:
  """Binary cross-entropy of logits `s [B]` against labels `r > threshold`."""
  s = s.astype(jnp.float32)
  y = (r > threshold).astype(jnp.float32)
  return jnp.mean(jax.nn.softplus(s) - y * s)  # = -y log sig(s) - (1 - y) log(1 - sig(s))


def bradley_terry_loss(s: jax.Array, r: jax.Array, group: jax.Array,
                       margin: float = 0.0) -> jax.Array:
  """-log sigmoid(s_i - s_j) averaged over the pairs of a group with r_i > r_j + margin.

  s, r: [B]; group: int [B]. Zero when no pair qualifies (e.g. every reward tied).
  """
  s, r = s.astype(jnp.float32), r.astype(jnp.float32)
  same = group[:, None] == group[None, :]
  better = r[:, None] > r[None, :] + margin
  pair = (same & better).astype(jnp.float32)
  nll = jax.nn.softplus(-(s[:, None] - s[None, :]))
  return jnp.sum(pair * nll) / jnp.maximum(jnp.sum(pair), 1.0)


def prm_loss(name: str, s: jax.Array, r: jax.Array, group: jax.Array | None = None, *,
             threshold: float = 0.5, margin: float = 0.0) -> jax.Array:
  """The loss `name` (one of `LOSSES`) of logits `s [B]` for rewards `r [B]`."""
  if name == "regression":
    return regression_loss(s, r)
  if name == "bce":
    return bce_loss(s, r, threshold)
  if name == "bradley_terry":
    if group is None:
      raise ValueError("the bradley_terry loss needs group ids")
    return bradley_terry_loss(s, r, group, margin)
  raise ValueError(f"config.prm.loss = {name!r} is invalid: allowed values are "
                   + ", ".join(map(repr, LOSSES)))
