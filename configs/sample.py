r"""Sample videos from the shipped base model (held-out prompts), no training.

  python -m euphonium_jax.main --config configs/sample.py --workdir /tmp/euph_sample
  python -m euphonium_jax.main --config configs/sample.py --workdir /tmp/euph_sample \
      --config.sample.prompts='("a red circle moving left", "a blue square moving up")'

Writes `WORKDIR/sample/videos.gif`, `videos.mp4`, `videos_frames.png` and `scores.json`.
"""

from euphonium_jax import config as config_lib


def get_config():
  config = config_lib.get_default_config()
  config.stages = ("sample",)
  config.init.pretrain = "assets/embedded"
  return config
