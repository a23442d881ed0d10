r"""The embedded world from scratch: train the VAE, then pretrain the video flow model.

This is the recipe of the shipped assets in `assets/embedded/` (see its README.md):

  python -m euphonium_jax.main --config configs/pretrain.py --workdir /tmp/euph_pretrain

Resumable: run the same command again after an interruption and it continues from the last
checkpoint (a finished stage is skipped).
"""

from euphonium_jax import config as config_lib


def get_config():
  config = config_lib.get_default_config()
  config.stages = ("vae", "pretrain")
  return config
