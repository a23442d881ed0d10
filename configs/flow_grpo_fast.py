r"""Flow-GRPO-Fast on the embedded world: Flow-GRPO's SDE on a window of 2 steps per
trajectory, the ODE elsewhere, training only the window's transitions.

  python -m euphonium_jax.main --config configs/flow_grpo_fast.py --workdir /tmp/flow_grpo_fast

configs/flow_grpo.py (a sqrt(t / (1 - t)), a = 0.7, outcome advantage only) with Flow-GRPO-Fast's
window (its `train_sd3_fast.py` / `sd3_pipeline_with_logprob_fast.py`): the window start is
drawn uniformly in [0, N / 2 - 2] once per iteration (`sde_window_range = (0, N // 2)`, as its
configs), and both window steps are trained (timestep_fraction 1). As its README describes, the
group shares one initial noise, so it shares the ODE prefix, which is computed once per group
(`window.branch`) before the group branches into G SDE continuations.
"""

from euphonium_jax import config as config_lib


def get_config():
  config = config_lib.from_file("flow_grpo.py", relative_to=__file__)
  config.sampling.share_noise_in_group = True
  config.sampling.window.update(mode="random", size=2, range_start=0, range_end=8,
                                per="iteration", branch=True)
  config.grpo.timestep_fraction = 1.0
  return config
