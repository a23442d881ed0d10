r"""MixGRPO on the embedded world: an SDE window of 4 steps that slides over the trajectory as
training goes, the ODE outside it, training only the window's transitions.

  python -m euphonium_jax.main --config configs/mix_grpo.py --workdir /tmp/mix_grpo

configs/flow_grpo.py's sampler (MixGRPO runs with `--flow_grpo_sampling`, eta 0.7) with
MixGRPO's `progressive` strategy (its finetune_flux_grpo_MixGRPO.sh): window size 4
(`group_size`), shifted by 1 step (`prog_overlap_step`) every 5 iterations (its
`iters_per_group` is 25 over 300 steps; this run is 60), back to step 0 after the last
position (`roll_back`); one initial noise per group (`init_same_noise`); every window step
trained (its `training_strategy = 'part'`). `--config.sampling.window.ode_solver=dpm2` runs
DPM-Solver++(2M) after the window (MixGRPO-Flash, without its grid compression).
"""

from euphonium_jax import config as config_lib


def get_config():
  config = config_lib.from_file("flow_grpo.py", relative_to=__file__)
  config.sampling.share_noise_in_group = True
  config.sampling.window.update(mode="sliding", size=4, shift_every=5, stride=1, wrap=True)
  config.grpo.timestep_fraction = 1.0
  return config
