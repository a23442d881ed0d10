"""The project's Wan rollout against an independent plain PyTorch loop (Flow-GRPO's recipe).

Reference: diffusers' `WanTransformer3DModel` loaded from the same tiny random folder,
diffusers' `UniPCMultistepScheduler` (flow sigmas, shift 3) for the integer timesteps and the
sigmas, CFG 4.5 with a negative prompt, and Flow-GRPO's Wan SDE step written out in torch
(`flow_grpo/diffusers_patch/wan_pipeline_with_logprob.py: sde_step_with_logprob`):

  std_dev_t = sigma_min + (sigma_max - sigma_min) * sigma      (sigma_max = sigmas[1], min 0)
  mean      = x (1 + std_dev_t^2 / (2 sigma) dt) + v (1 + std_dev_t^2 (1 - sigma) / (2 sigma)) dt
  x_next    = mean + std_dev_t sqrt(-dt) xi,       dt = sigma_next - sigma < 0
  log pi    = mean over dims of log N(x_next; mean, (std_dev_t sqrt(-dt))^2)

Both sides start from the same latents and draw the same per-step noise (channels-first for
torch). Ours: `sampling.make_rollout` with `preset('flow_grpo_wan', grid=unipc_flow_grid(N, 3),
timesteps='truncated')` and `sampling.cfg.cfg_velocity`.
"""
import math
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from euphonium_jax import sampling
from euphonium_jax.models.wan import tiny
from euphonium_jax.models.wan import transformer as wt
from euphonium_jax.sampling import cfg as cfg_lib

N = 6
SHIFT = 3.0
CFG = 4.5
SHAPE = (2, 2, 4, 6, 16)   # [B, T, H, W, C]: latent frames, height, width, channels
TEXT_LEN = 8

# Max abs errors per step, float32 on both sides (|v| ~ 2). Measured on CPU: velocity
# <= 3.8e-6, mean and latents <= 2.2e-6 (growing by ~3e-7 a step), std <= 3e-8 (1-2 ulp),
# log-prob <= 2e-7; the tolerances leave 5x. The velocity at continuous t differs from the
# truncated reference by 3e-2 .. 1.3e-1: truncation is 10^4 x the parity error.
TOL = dict(velocity=2e-5, mean=1e-5, std=1e-7, logprob=2e-6, latents=1e-5)


def _scheduler(n, shift):
  s = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift,
                                        prediction_type="flow_prediction",
                                        num_train_timesteps=1000)
  s.set_timesteps(n)
  return s


@pytest.mark.parametrize("n,shift", [(20, 3.0), (6, 3.0), (16, 5.0), (3, 1.0), (6, 1.0)])
def test_grid_and_truncated_timesteps_match_diffusers(n, shift):
  """`unipc_flow_grid` is the scheduler's sigmas (float32) and `t_model` its int64 timesteps
  / 1000; a float32 floor of 1000 t is one off on the unshifted grids."""
  s = _scheduler(n, shift)
  grid = sampling.unipc_flow_grid(n, shift)
  arrs = sampling.grid_arrays(sampling.preset("flow_grpo_wan", grid=tuple(grid),
                                              timesteps="truncated"))
  np.testing.assert_array_equal(arrs.t, s.sigmas.numpy())
  ts = s.timesteps.numpy()
  assert ts.dtype == np.int64
  np.testing.assert_array_equal(arrs.t_model, (ts / 1000).astype(np.float32))
  np.testing.assert_array_equal(np.round(arrs.t_model.astype(np.float64) * 1000), ts)
  f32 = np.floor(np.float32(1000) * grid[:-1].astype(np.float32)).astype(np.int64)
  assert np.array_equal(f32, ts) == (shift != 1.0), (f32, ts)


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
  folder = tiny.write_tiny_pipeline(str(tmp_path_factory.mktemp("wan_tiny_pipeline")))
  path = os.path.join(folder, "transformer")
  ref = diffusers.WanTransformer3DModel.from_pretrained(path).eval()
  graphdef, state, _ = wt.load_wan_transformer(path)
  return ref, graphdef, state


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  b = SHAPE[0]
  text = rng.standard_normal((b, TEXT_LEN, 32)).astype(np.float32)
  text[1, 5:] = 0.0  # padded positions are zeros, as Wan's pipeline makes them
  negative = rng.standard_normal((1, TEXT_LEN, 32)).astype(np.float32)
  negative[:, 3:] = 0.0
  x_init = rng.standard_normal(SHAPE).astype(np.float32)
  noise = rng.standard_normal((b, N) + SHAPE[1:]).astype(np.float32)
  return text, negative, x_init, noise


def _cf(a):   # channels-last numpy [B, T, H, W, C] -> channels-first torch [B, C, T, H, W]
  return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 4, 1, 2, 3)


def _cl(a):   # channels-first torch -> channels-last numpy
  return a.permute(0, 2, 3, 4, 1).numpy()


def torch_rollout(ref, text, negative, x_init, noise, continuous=False):
  """Flow-GRPO's Wan sampling loop in plain torch: per step the CFG velocity, the mean, the
  std, the sample and its log-prob (channels-last numpy), plus the velocity at the float
  timestep 1000 t (what an untruncated pipeline would feed) when `continuous`."""
  s = _scheduler(N, SHIFT)
  sigmas = s.sigmas
  sigma_max, sigma_min = sigmas[1].item(), sigmas[-1].item()
  b = SHAPE[0]
  emb = torch.from_numpy(text)
  neg = torch.from_numpy(negative).expand(b, -1, -1)
  lat = _cf(x_init)

  def velocity(x, timestep):
    with torch.no_grad():
      v_text = ref(x, timestep=timestep, encoder_hidden_states=emb, return_dict=False)[0]
      v_neg = ref(x, timestep=timestep, encoder_hidden_states=neg, return_dict=False)[0]
    return v_neg + CFG * (v_text - v_neg)

  out = {k: [] for k in ("x", "v", "v_cont", "mean", "std", "logprob", "latents")}
  for i, t in enumerate(s.timesteps):
    out["x"].append(_cl(lat))
    v = velocity(lat, t.expand(b))
    if continuous:
      t_float = torch.full((b,), 1000.0) * sigmas[i]
      out["v_cont"].append(_cl(velocity(lat, t_float)))
    sigma, sigma_prev = sigmas[i], sigmas[i + 1]
    dt = sigma_prev - sigma
    std_dev_t = sigma_min + (sigma_max - sigma_min) * sigma
    mean = (lat * (1 + std_dev_t**2 / (2 * sigma) * dt)
            + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt)
    std = std_dev_t * torch.sqrt(-1 * dt)
    lat = mean + std * _cf(noise[:, i])
    lp = (-((lat - mean) ** 2) / (2 * std**2) - torch.log(std)
          - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    out["v"].append(_cl(v))
    out["mean"].append(_cl(mean))
    out["std"].append(float(std))
    out["logprob"].append(lp.mean(dim=(1, 2, 3, 4)).numpy())
    out["latents"].append(_cl(lat))
  return out


def test_rollout_matches_plain_torch_flow_grpo_loop(tiny_wan):
  ref, graphdef, state = tiny_wan
  text, negative, x_init, noise = _inputs()
  sampler = sampling.preset("flow_grpo_wan", grid=tuple(sampling.unipc_flow_grid(N, SHIFT)),
                            timesteps="truncated", num_steps=N)
  arrs = sampling.grid_arrays(sampler)

  def network(params, x, t, txt):
    return nnx.merge(graphdef, params)(x, t, txt)

  policy = cfg_lib.cfg_velocity(network, CFG)
  cond = cfg_lib.broadcast_negative({"tokens": jnp.asarray(text)},
                                    {"tokens": jnp.asarray(negative)})
  rollout = jax.jit(sampling.make_rollout(policy, None, sampler, keep_means=True),
                    static_argnames="latent_shape")
  ro = rollout(state, None, jax.random.key(0), cond, SHAPE, jnp.asarray(x_init),
               jnp.asarray(noise))
  want = torch_rollout(ref, text, negative, x_init, noise, continuous=True)

  # Our velocity at the torch loop's latents: truncated (the rollout's) and continuous t.
  v_at = jax.jit(lambda x, t: policy(state, x, jnp.full((SHAPE[0],), t), cond))
  rows = []
  for i in range(N):
    x_i = jnp.asarray(want["x"][i])
    v_trunc = np.asarray(v_at(x_i, arrs.t_model[i]))
    v_cont = np.asarray(v_at(x_i, arrs.t[i]))
    std = float(sampling.step_std(x_i, arrs.t[i], arrs.t[i + 1], arrs.g[i]))
    rows.append(dict(
        velocity=np.abs(v_trunc - want["v"][i]).max(),
        mean=np.abs(np.asarray(ro.means_guided[:, i]) - want["mean"][i]).max(),
        std=abs(std - want["std"][i]),
        logprob=np.abs(np.asarray(ro.logprobs[:, i]) - want["logprob"][i]).max(),
        latents=np.abs(np.asarray(ro.latents[:, i + 1]) - want["latents"][i]).max(),
        v_scale=np.abs(want["v"][i]).max(),
        cont_vs_trunc=np.abs(v_cont - want["v"][i]).max(),
        torch_cont_vs_trunc=np.abs(want["v_cont"][i] - want["v"][i]).max(),
        cont_vs_torch_cont=np.abs(v_cont - want["v_cont"][i]).max(),
        frac=1000 * float(sampling.time_grid(sampler)[i]) % 1.0))
  print("\nstep  timestep  |v|   err: velocity    mean      std       logprob   latents"
        "   | continuous t: ours-trunc torch-trunc ours-torch")
  for i, r in enumerate(rows):
    print(f"{i:4d} {1000 * arrs.t_model[i]:8.0f} {r['v_scale']:6.2f}      "
          + "  ".join(f"{r[k]:.2e}" for k in ("velocity", "mean", "std", "logprob", "latents"))
          + f"  | {r['cont_vs_trunc']:.2e}   {r['torch_cont_vs_trunc']:.2e}   "
          f"{r['cont_vs_torch_cont']:.2e}")
  for i, r in enumerate(rows):
    for key, tol in TOL.items():
      assert r[key] <= tol, (i, key, r[key], tol)
    # Continuous t is what torch's float timestep 1000 t gives (parity holds there too), and
    # differs from the truncated reference by that amount: 10-1000x the parity error.
    assert r["cont_vs_torch_cont"] <= TOL["velocity"], (i, r)
    np.testing.assert_allclose(r["cont_vs_trunc"], r["torch_cont_vs_trunc"], rtol=0.05,
                               atol=TOL["velocity"])
    if r["frac"] > 0.1:
      assert r["torch_cont_vs_trunc"] > 10 * TOL["velocity"], (i, r)
  np.testing.assert_array_equal(ro.timesteps, arrs.t)
