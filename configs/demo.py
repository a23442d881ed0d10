r"""The README's main job: a short Euphonium run from the shipped base model and PRM.

  python -m euphonium_jax.main --config configs/demo.py --workdir /tmp/euph_demo

configs/euphonium.py (PRM-guided SDE rollouts, outcome + process advantages) with a budget
that finishes within about 15 minutes on 2 CPU cores: 25 iterations of 16 prompts x 8
rollouts, one optimiser step on all 128 each (lr 1e-4), and evaluations at iterations 0, 10,
20 and 25 of 256 held-out prompts by Euler ODE with no reward model (the same prompts and
noise each time). Writes WORKDIR/grpo/curves.png (training and evaluation reward),
WORKDIR/grpo/eval/ (video grids and scores) and WORKDIR/grpo/final (the trained model), then
samples videos from it (WORKDIR/sample/). Measured numbers: experiments/results/demo_cpu.txt.
"""

from euphonium_jax import config as config_lib


def get_config():
  config = config_lib.from_file("euphonium.py", relative_to=__file__)
  config.stages = ("grpo", "sample")
  config.grpo.update(iterations=25, eval_every=10, ckpt_every=5)
  config.eval.num_prompts = 256
  return config
