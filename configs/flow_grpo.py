r"""Flow-GRPO on the embedded world: noise a sqrt(t / (1 - t)) with a = 0.7, no guidance,
independent initial noise, outcome advantage only.

  python -m euphonium_jax.main --config configs/flow_grpo.py --workdir /tmp/flow_grpo

Everything else (prompts, budget, optimiser, evaluation) is configs/euphonium.py's.
"""

from euphonium_jax import config as config_lib


def get_config():
  config = config_lib.from_file("euphonium.py", relative_to=__file__)
  return config_lib.as_baseline(config, "flow_grpo")
