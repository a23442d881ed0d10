"""One SDE sampler for every method: grids, schedules, the step, SDE windows, the guided rollout.

Pure and network-agnostic: the velocity field and the PRM are functions passed in.
"""
from euphonium_jax.sampling.config import (GUIDANCE_MODES, ODE_SOLVERS, PRESETS, SCHEDULES,
                                           TIMESTEPS, WINDOW_MODES, WINDOW_PER, GuidanceConfig,
                                           SamplerConfig, WindowConfig, default_sampling_config,
                                           preset, sampler_config_from)
from euphonium_jax.sampling.rollout import (Rollout, initial_noise, local_key, make_rollout,
                                            normalize_grad, standard_normal)
from euphonium_jax.sampling.schedules import (T1_GUARD, GridArrays, diffusion_coefficients,
                                              grid_arrays, guidance_coefficients, guidance_mask,
                                              model_times, shift_times, shifted_grid, time_grid,
                                              unipc_flow_grid)
from euphonium_jax.sampling.step import (StepOut, logprob, sde_step, step_logprob, step_mean,
                                         step_std, x0_hat)
from euphonium_jax.sampling.windows import (dpm2_coefficients, trainable_per_sample,
                                            window_mask, window_starts)
