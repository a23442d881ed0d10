r"""The README's main job: a short Euphonium run from the shipped base model and PRM.

  python -m euphonium_jax.main --config configs/demo.py --workdir /tmp/euph_demo

configs/euphonium.py (PRM-guided SDE rollouts, outcome + process advantages) with a budget
that finishes within about 15 minutes on 2 CPU cores: 100 iterations of 4 prompts x 8
rollouts, one optimiser step each (lr 1e-4), and three evaluations (start, middle, end) of 256
held-out prompts by Euler ODE with no reward model (same prompts and noise each time).
Writes WORKDIR/grpo/curves.png (training and evaluation reward), WORKDIR/grpo/eval/ (video
grids and scores) and WORKDIR/grpo/final (the trained model), then samples videos from it
(WORKDIR/sample/).

Measured (2026-11-25, 2-core CPU shared with other jobs): NOT yet the 3-standard-error gain
the demo aims for. At lr 1e-4, 40 iterations gave +0.025 +- 0.020 (paired, 128 prompts) for
both this sampler and DanceGRPO's; at lr 1.5e-4 the run collapsed after ~70 iterations
(evaluation 0.397 -> 0.339 at iteration 65, training reward 0 at 80); at 5e-4 within 10.
See the closing note of the GRPO issue.
"""

from euphonium_jax import config as config_lib


def get_config():
  config = config_lib.from_file("euphonium.py", relative_to=__file__)
  config.stages = ("grpo", "sample")
  config.grpo.update(iterations=100, eval_every=50, ckpt_every=20, lr=1e-4)
  config.eval.num_prompts = 256
  return config
