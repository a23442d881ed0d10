r"""DanceGRPO on the embedded world: constant-noise SDE, no guidance, outcome advantage only.

  python -m euphonium_jax.main --config configs/dance_grpo.py --workdir /tmp/dance_grpo

Everything else (prompts, budget, optimiser, evaluation) is configs/euphonium.py's, so the
two compare like for like. DanceGRPO's own sampler: eta 0.3, one initial noise per group.
"""

from euphonium_jax import config as config_lib


def get_config():
  config = config_lib.from_file("euphonium.py", relative_to=__file__)
  return config_lib.as_baseline(config, "dance_grpo")
