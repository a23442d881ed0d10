r"""Every stage end to end on a tiny world, in seconds: for tests and smoke runs.

  python -m euphonium_jax.main --config configs/tiny.py --workdir /tmp/euph_tiny
"""

from euphonium_jax import config as config_lib


def get_config():
  config = config_lib.get_default_config()
  config.stages = ("vae", "pretrain", "prm", "grpo", "sample")
  config.world.frames = 4
  config.world.size = 16
  config.vae.channels = (8, 8, 16)
  config.vae.num_res_blocks = (0, 0, 1)
  config.model.width = 32
  config.model.depth = 1
  config.model.heads = 2
  config.text.width = 16
  config.text.pooled_dim = 16
  config.text.depth = 1
  config.text.heads = 2
  config.vae_train.update(steps=6, batch_size=8, log_every=3, ckpt_every=3, eval_clips=8)
  config.pretrain.update(steps=6, batch_size=8, dataset_size=64, log_every=3, ckpt_every=3, eval_every=3)
  config.eval.update(num_prompts=8, num_steps=4, num_videos=4)
  config.prm.update(depth=1, head_width=32, steps=10, batch_size=16, log_every=5, ckpt_every=5)
  config.prm.data.update(num_prompts=8, group_size=4, chunk_prompts=4, num_steps=6)
  config.prm.report.update(num_prompts=4, ode_steps=3)
  config.sampling.update(num_steps=6, group_size=4)
  config.sampling.guidance.start = 3
  config.grpo.update(iterations=2, prompts_per_iteration=2, samples_per_update=8,
                     accumulation=1, lr=1e-4, eval_every=0, ckpt_every=1)
  return config
