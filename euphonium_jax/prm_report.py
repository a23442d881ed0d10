"""How good is a process reward model? Rank correlations per time bucket, the guidance check.

Pure numpy (and a matplotlib plot), so the numbers can be checked against scipy by tests:

- `correlation_table(values [R, S], rewards [R], t [S], edges, groups [R])`: Spearman's rank
  correlation between the PRM's value `R_phi(x_t, t)` of each rollout state and the final
  outcome reward of its rollout, per grid step and per time bucket (states of every step in
  the bucket pooled), over all rollouts ("spearman") and within groups (the mean over groups
  of the correlation among a group's rollouts: "within_group", what a group-normalised
  process advantage sees).
- `paired_stats(a, b)`: mean and standard error of `a - b` over paired samples.
- `plot_report(path, report)`: the correlation curves and the guidance check in one PNG.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import stats


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman's rho of two 1-D arrays (average ranks for ties); NaN if either is constant."""
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
    return float("nan")
  ra, rb = stats.rankdata(a), stats.rankdata(b)
  return float(np.corrcoef(ra, rb)[0, 1])


def within_group_spearman(values: np.ndarray, rewards: np.ndarray,
                          groups: np.ndarray) -> float:
  """Mean over groups of the Spearman rho within the group (groups with ties skipped)."""
  rhos = [spearman(values[groups == g], rewards[groups == g]) for g in np.unique(groups)]
  rhos = [r for r in rhos if np.isfinite(r)]
  return float(np.mean(rhos)) if rhos else float("nan")


def correlation_table(values: np.ndarray, rewards: np.ndarray, t: np.ndarray,
                      edges: Sequence[float], groups: np.ndarray | None = None
                      ) -> dict[str, list[dict[str, Any]]]:
  """Rank correlations of PRM values and final rewards, per step and per time bucket.

  values: [R, S] PRM value of rollout r's state at grid step s; rewards: [R] final outcome
  reward of each rollout; t: [S] the grid times; edges: increasing bucket edges (a bucket is
  [lo, hi), the last one [lo, hi]); groups: [R] group ids (None: no within-group numbers).
  """
  values, rewards, t = np.asarray(values), np.asarray(rewards), np.asarray(t)
  r_, s_ = values.shape
  g = np.zeros(r_, np.int64) if groups is None else np.asarray(groups)
  per_step = []
  for s in range(s_):
    row = {"step": s, "t": float(t[s]), "spearman": spearman(values[:, s], rewards)}
    if groups is not None:
      row["within_group"] = within_group_spearman(values[:, s], rewards, g)
    per_step.append(row)
  buckets = []
  for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
    last = k == len(edges) - 2
    steps = np.nonzero((t >= lo) & ((t <= hi) if last else (t < hi)))[0]
    row = {"t_lo": float(lo), "t_hi": float(hi), "steps": steps.tolist(),
           "num_states": int(len(steps) * r_)}
    v = values[:, steps].T.ravel()  # step-major: state (s, r)
    rw = np.tile(rewards, len(steps))
    row["spearman"] = spearman(v, rw) if len(steps) else float("nan")
    if groups is not None:
      # A group here is (rollout group, step): the rollouts of one prompt at one time.
      gid = (np.arange(len(steps))[:, None] * (g.max() + 1) + g[None, :]).ravel()
      row["within_group"] = within_group_spearman(v, rw, gid) if len(steps) else float("nan")
    buckets.append(row)
  return {"per_step": per_step, "per_bucket": buckets}


def paired_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
  """Mean, standard error (ddof 1) and z = mean / stderr of the paired differences a - b."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  mean = float(d.mean())
  se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
  return {"mean": mean, "stderr": se,
          "z": mean / se if se and np.isfinite(se) and se > 0 else float("nan"),
          "n": int(d.size)}


def nan_to_none(tree: Any) -> Any:
  """NaN / inf floats -> None, recursively (JSON has no NaN)."""
  if isinstance(tree, dict):
    return {k: nan_to_none(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [nan_to_none(v) for v in tree]
  if isinstance(tree, (float, np.floating)):
    return float(tree) if np.isfinite(tree) else None
  return tree


def plot_report(path: str, report: dict[str, Any]) -> str:
  """PNG: Spearman vs t (per step, pooled and within group; buckets as steps) | the
  guidance check (mean reward change of each perturbation, +- standard error)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  table = report["correlation"]
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
  t = [r["t"] for r in table["per_step"]]
  nan = lambda v: float("nan") if v is None else v
  ax.plot(t, [nan(r["spearman"]) for r in table["per_step"]], "o-", ms=3, label="per step")
  if "within_group" in table["per_step"][0]:
    ax.plot(t, [nan(r["within_group"]) for r in table["per_step"]], "s--", ms=3,
            label="per step, within group")
  for r in table["per_bucket"]:
    ax.hlines(nan(r["spearman"]), r["t_lo"], r["t_hi"], colors="k", lw=2)
  ax.plot([], [], "k-", lw=2, label="per bucket (pooled)")
  ax.axhline(0.5, color="grey", ls=":", lw=1)
  ax.set_xlabel("t (1 = noise, 0 = data)")
  ax.set_ylabel("Spearman(R_phi(x_t, t), final reward)")
  ax.set_xlim(1.02, -0.02)
  ax.set_ylim(-0.2, 1.0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(f"fresh rollouts of {report.get('num_rollouts', '?')} '{report.get('split', '')}'"
               " prompts", fontsize=10)
  g = report["guidance_check"]
  names = ["gradient", "random", "-gradient"]
  keys = ["grad_minus_base", "random_minus_base", "neg_minus_base"]
  means = [nan(g[k]["mean"]) for k in keys]
  errs = [nan(g[k]["stderr"]) for k in keys]
  bx.bar(names, means, yerr=errs, color=["tab:green", "tab:grey", "tab:red"], capsize=4)
  bx.axhline(0.0, color="k", lw=1)
  d = g["grad_minus_random"]
  bx.set_title(f"step at t={g['t']:.2f} (rms {g['step_rms']}), ODE finish\n"
               f"gradient - random: {nan(d['mean']):+.4f} +- {nan(d['stderr']):.4f}",
               fontsize=9)
  bx.set_ylabel("change in mean outcome reward")
  bx.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
