"""Sampler settings: a frozen dataclass, named presets, and the `config.sampling` section.

The ConfigDict section names a `preset`; every other key defaults to a typed placeholder
(None) meaning "the preset's value", so `--config.sampling.preset=flow_grpo` switches the
whole method and `--config.sampling.num_steps=30` changes one thing. Which guidance
parameterisation is active is `guidance.mode`:

  off     no guidance, no PRM calls (unless `score_unguided_steps`).
  raw     mean += scale * dt * grad R                (the reference: scale 0.01, steps 12-15).
  beta    mean += eta^2 / (2 beta) * dt * grad R     (the reference's derivation of 0.01 from
          eta = 0.25, beta = 3.125; only for the `constant` schedule, where g = eta).
  theory  mean += (1 / beta) * g^2 * dt * grad R     (exact tilt p(x0) exp(r(x0) / beta) when
          the schedule is `memoryless`; a partial tilt under any other schedule).

`timesteps` is the time the networks (velocity and PRM) see: `continuous` (t itself) or
`truncated` (Wan's convention, diffusers' UniPC scheduler: the integer timestep
floor(1000 t), as t = floor(1000 t) / 1000); the SDE step always uses t.

`window` confines the SDE to w consecutive steps `[s, s + w)` of each trajectory and runs the
ODE (g = 0: the Euler step, no log-prob) everywhere else; `s` is a traced input of the rollout
(`schedules.window_starts`: a pure function of the iteration's key and the iteration):

  off      every step is an SDE step (today's sampler, bit for bit).
  random   Flow-GRPO-Fast: s uniform in [range_start, range_end - w], one draw per iteration
           (`per = 'iteration'`: Flow-GRPO-Fast draws once per sampling call) or per group.
  sliding  MixGRPO: s = range_start + stride * (iteration // shift_every), back to range_start
           after the last position (`wrap`, MixGRPO's roll_back) or held there.

`range_end` None is N - 1, so a window never holds the last transition (never trained); N lets
it (e.g. size N, range [0, N): every step is an SDE step, today's sampler).
`branch` computes a group's shared ODE prefix once for the group (it needs
`share_noise_in_group`): Flow-GRPO-Fast's "sample one trajectory per prompt, branch the group at
the window". `ode_solver = 'dpm2'` replaces the Euler steps after the window with
DPM-Solver++(2M) (MixGRPO-Flash's `post` strategy, without its grid compression).
Guidance acts on the steps of its own window that are also SDE steps.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping, Optional, Tuple

import ml_collections
from ml_collections import config_dict

SCHEDULES = ("ode", "constant", "flow_grpo", "flow_grpo_wan", "memoryless")
GUIDANCE_MODES = ("off", "raw", "beta", "theory")
LOGPROB_MEANS = ("unguided", "guided")
TIMESTEPS = ("continuous", "truncated")  # the networks' time: t, or floor(1000 t) / 1000
PRESETS = ("euphonium", "dance_grpo", "flow_grpo", "flow_grpo_wan", "ode")
WINDOW_MODES = ("off", "random", "sliding")  # every step SDE | Flow-GRPO-Fast | MixGRPO
WINDOW_PER = ("iteration", "group")  # random windows: one per iteration | one per group
ODE_SOLVERS = ("euler", "dpm2")  # ODE steps after the window: Euler | DPM-Solver++(2M)


@dataclasses.dataclass(frozen=True)
class GuidanceConfig:
  """Guidance window `[start, end)` every `interval` steps (end None = N) and its strength."""
  mode: str = "off"
  scale: Optional[float] = None
  beta: Optional[float] = None
  start: int = 0
  end: Optional[int] = None
  interval: int = 1
  normalize: bool = False


@dataclasses.dataclass(frozen=True)
class WindowConfig:
  """SDE on `size` steps `[s, s + size)` inside `[range_start, range_end)` (None = N - 1), ODE
  elsewhere (see the module doc); `mode = 'off'` makes every step an SDE step."""
  mode: str = "off"
  size: int = 2
  range_start: int = 0
  range_end: Optional[int] = None
  per: str = "iteration"
  shift_every: int = 1
  stride: int = 1
  wrap: bool = True
  branch: bool = False
  ode_solver: str = "euler"

  def bounds(self, num_steps: int) -> Tuple[int, int]:
    """(first, last) window start: `range_start`, `range_end - size` (range_end None = N - 1)."""
    end = num_steps - 1 if self.range_end is None else self.range_end
    return self.range_start, end - self.size


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Static, hashable sampler settings (validated on construction)."""
  name: str = "custom"
  num_steps: int = 16
  shift: float = 5.0
  grid: Optional[Tuple[float, ...]] = None
  schedule: str = "constant"
  eta: float = 0.25
  guidance: GuidanceConfig = GuidanceConfig()
  logprob_mean: str = "unguided"
  score_unguided_steps: bool = False
  share_noise_in_group: bool = False
  group_size: int = 1
  timesteps: str = "continuous"
  window: WindowConfig = WindowConfig()

  @property
  def windowed(self) -> bool:
    return self.window.mode != "off"

  def __post_init__(self):
    validate(self)


def _err(key: str, value: Any, allowed: str) -> ValueError:
  return ValueError(f"sampling.{key} = {value!r} is not allowed: {allowed}")


def validate(cfg: SamplerConfig) -> None:
  """Raises ValueError naming the key, the value and what is allowed."""
  n = cfg.num_steps
  if not isinstance(n, numbers.Integral) or n < 1:
    raise _err("num_steps", n, "an integer >= 1")
  if not cfg.shift > 0:
    raise _err("shift", cfg.shift, "a number > 0")
  if cfg.grid is not None:
    grid = tuple(float(x) for x in cfg.grid)
    if len(grid) != n + 1:
      raise _err("grid", cfg.grid, f"N + 1 = {n + 1} times for num_steps = {n} "
                 f"(it has {len(grid)})")
    if not (grid[0] <= 1.0 and grid[-1] >= 0.0 and all(a > b for a, b in zip(grid, grid[1:]))):
      raise _err("grid", cfg.grid, "strictly decreasing times in [0, 1]")
  if cfg.schedule not in SCHEDULES:
    raise _err("schedule", cfg.schedule, "choose one of " + ", ".join(SCHEDULES))
  if not cfg.eta >= 0:
    raise _err("eta", cfg.eta, "a number >= 0")
  if cfg.logprob_mean not in LOGPROB_MEANS:
    raise _err("logprob_mean", cfg.logprob_mean, "choose one of " + ", ".join(LOGPROB_MEANS))
  if not isinstance(cfg.group_size, numbers.Integral) or cfg.group_size < 1:
    raise _err("group_size", cfg.group_size, "an integer >= 1")
  if cfg.timesteps not in TIMESTEPS:
    raise _err("timesteps", cfg.timesteps, "choose one of " + ", ".join(TIMESTEPS)
               + " (the networks see t, or Wan's integer timestep floor(1000 t) / 1000)")
  _validate_window(cfg)
  gd = cfg.guidance
  if gd.mode not in GUIDANCE_MODES:
    raise _err("guidance.mode", gd.mode, "choose one of " + ", ".join(GUIDANCE_MODES))
  if gd.mode == "off":
    return
  if not isinstance(gd.start, numbers.Integral) or not 0 <= gd.start < n:
    raise _err("guidance.start", gd.start, f"a step index in [0, {n}) (num_steps = {n})")
  end = n if gd.end is None else gd.end
  if not isinstance(end, numbers.Integral) or not gd.start < end <= n:
    raise _err("guidance.end", gd.end, f"None or a step index in ({gd.start}, {n}] "
               f"(exclusive; after guidance.start = {gd.start}, num_steps = {n})")
  if not isinstance(gd.interval, numbers.Integral) or gd.interval < 1:
    raise _err("guidance.interval", gd.interval, "an integer >= 1")
  if gd.mode == "raw" and (gd.scale is None or not gd.scale >= 0):
    raise _err("guidance.scale", gd.scale, "a number >= 0 when guidance.mode = 'raw'")
  if gd.mode in ("beta", "theory") and (gd.beta is None or not gd.beta > 0):
    raise _err("guidance.beta", gd.beta, f"a number > 0 when guidance.mode = {gd.mode!r}")
  if gd.mode == "beta" and cfg.schedule != "constant":
    raise _err("guidance.mode", gd.mode, "'beta' (scale eta^2 / (2 beta)) only with "
               f"sampling.schedule = 'constant' (got {cfg.schedule!r}); use 'theory' or 'raw'")
  g_zero = cfg.schedule == "ode" or (cfg.schedule in ("constant", "flow_grpo") and cfg.eta == 0)
  if gd.mode == "theory" and g_zero:
    raise _err("guidance.mode", gd.mode, f"'theory' scales with g^2, which is 0 for "
               f"sampling.schedule = {cfg.schedule!r}, eta = {cfg.eta}; use 'raw' for a "
               "guided ODE")


def _validate_window(cfg: SamplerConfig) -> None:
  w, n = cfg.window, cfg.num_steps
  if w.mode not in WINDOW_MODES:
    raise _err("window.mode", w.mode, "choose one of " + ", ".join(WINDOW_MODES))
  if w.mode == "off":
    return
  for key in ("size", "shift_every", "stride"):
    v = getattr(w, key)
    if not isinstance(v, numbers.Integral) or v < 1:
      raise _err(f"window.{key}", v, "an integer >= 1")
  end = n - 1 if w.range_end is None else w.range_end
  if not isinstance(w.range_start, numbers.Integral) or w.range_start < 0:
    raise _err("window.range_start", w.range_start, "a step index >= 0")
  if not isinstance(end, numbers.Integral) or not w.range_start + w.size <= end <= n:
    raise _err("window.range_end", w.range_end, f"None (= N - 1 = {n - 1}) or a step index in "
               f"[range_start + size, N] = [{w.range_start + w.size}, {n}] (exclusive end; "
               f"window.size = {w.size}, num_steps = {n})")
  if end == n and w.size < 2:
    raise _err("window.size", w.size, "at least 2 when window.range_end = N: a window on the "
               "last transition alone trains nothing (it is never trained)")
  if w.per not in WINDOW_PER:
    raise _err("window.per", w.per, "choose one of " + ", ".join(WINDOW_PER))
  if w.ode_solver not in ODE_SOLVERS:
    raise _err("window.ode_solver", w.ode_solver, "choose one of " + ", ".join(ODE_SOLVERS))
  if w.branch and not (cfg.share_noise_in_group and cfg.group_size > 1):
    raise _err("window.branch", w.branch, "a shared ODE prefix needs one initial noise per "
               "group: sampling.share_noise_in_group = True and group_size > 1")


def _preset_values(name: str) -> dict:
  """Nested dict of a preset's values (same keys as `default_sampling_config`)."""
  base = dict(num_steps=16, shift=5.0, grid=None, schedule="constant", eta=0.25,
              guidance=dict(mode="off", scale=None, beta=None, start=0, end=None, interval=1,
                            normalize=False),
              logprob_mean="unguided", score_unguided_steps=False,
              share_noise_in_group=False, group_size=8, timesteps="continuous",
              window=dict(mode="off", size=2, range_start=0, range_end=None, per="iteration",
                          shift_every=1, stride=1, wrap=True, branch=False, ode_solver="euler"))
  if name == "euphonium":    # the authors' reference: eta 0.25, 0.01 * dt * grad from step 12
    base.update(share_noise_in_group=True)
    base["guidance"].update(mode="beta", beta=3.125, start=12)
  elif name == "dance_grpo":   # DanceGRPO: constant noise (its scripts use eta 0.3), shared noise
    base.update(eta=0.3, share_noise_in_group=True)
  elif name == "flow_grpo":    # Flow-GRPO: a * sqrt(t / (1 - t)), a = 0.7, independent noise
    base.update(schedule="flow_grpo", eta=0.7)
  elif name == "flow_grpo_wan":  # Flow-GRPO's Wan2.1 recipe: g = t_1 * t
    base.update(schedule="flow_grpo_wan", eta=0.0)
  elif name == "ode":          # evaluation in the reference: ODE, 30 steps, shift 7
    base.update(schedule="ode", eta=0.0, num_steps=30, shift=7.0)
  else:
    raise _err("preset", name, "choose one of " + ", ".join(PRESETS))
  return base


def _build(name: str, values: Mapping[str, Any], overridden: set) -> SamplerConfig:
  values = dict(values)
  gd = dict(values.pop("guidance"))
  window = WindowConfig(**values.pop("window"))
  if values.get("grid") is not None:
    values["grid"] = tuple(float(x) for x in values["grid"])
    if "num_steps" not in overridden:
      values["num_steps"] = len(values["grid"]) - 1
  for k in ("eta", "shift"):
    values[k] = float(values[k])
  for k in ("scale", "beta"):
    gd[k] = None if gd[k] is None else float(gd[k])
  return SamplerConfig(name=name, guidance=GuidanceConfig(**gd), window=window, **values)


def preset(name: str, **overrides) -> SamplerConfig:
  """A named preset with overrides, e.g. `preset('euphonium', num_steps=30,
  guidance=dict(start=20))`. Presets: euphonium, dance_grpo, flow_grpo, flow_grpo_wan, ode
  (every preset has `window.mode = 'off'`)."""
  values = _preset_values(name)
  for k, v in overrides.items():
    if k in ("guidance", "window"):
      unknown = set(v) - set(values[k])
      if unknown:
        raise _err(k, dict(v), f"unknown keys {sorted(unknown)}; allowed: " + ", ".join(values[k]))
      values[k].update(v)
    elif k in values:
      values[k] = v
    else:
      raise _err(k, v, "unknown key; allowed: " + ", ".join(values))
  return _build(name, values, set(overrides))


def default_sampling_config() -> ml_collections.ConfigDict:
  """The `config.sampling` section: a preset plus typed placeholders (None = preset's value)."""
  ph = config_dict.placeholder
  return ml_collections.ConfigDict(dict(
      preset="euphonium",
      num_steps=ph(int), shift=ph(float), grid=ph(tuple), schedule=ph(str), eta=ph(float),
      guidance=dict(mode=ph(str), scale=ph(float), beta=ph(float), start=ph(int), end=ph(int),
                    interval=ph(int), normalize=ph(bool)),
      logprob_mean=ph(str), score_unguided_steps=ph(bool),
      share_noise_in_group=ph(bool), group_size=ph(int), timesteps=ph(str),
      window=dict(mode=ph(str), size=ph(int), range_start=ph(int), range_end=ph(int),
                  per=ph(str), shift_every=ph(int), stride=ph(int), wrap=ph(bool),
                  branch=ph(bool), ode_solver=ph(str))))


def sampler_config_from(cfg: ml_collections.ConfigDict) -> SamplerConfig:
  """Validated `SamplerConfig` from a `config.sampling` section (keys not None override)."""
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  name = d.pop("preset", None) or "euphonium"
  overrides = {k: v for k, v in d.items() if k not in ("guidance", "window") and v is not None}
  for section in ("guidance", "window"):
    sub = {k: v for k, v in dict(d.get(section) or {}).items() if v is not None}
    if sub:
      overrides[section] = sub
  return preset(name, **overrides)
