r"""The latent process reward model (PRM) of the embedded world, from the shipped base model.

Rolls out the base model (unguided DanceGRPO SDE, 16 steps, shift 5) on training prompts,
labels every rollout with the `shapes_fidelity` reward of its decoded final clean estimate,
trains the PRM (first 2 blocks of the base transformer + attention pool + MLP) on
(x_t, t, text) -> reward, and measures it on held-out prompts:

  python -m euphonium_jax.main --config configs/prm.py --workdir /tmp/euph_prm

From a base model trained in a workdir of your own instead of the shipped one:

  python -m euphonium_jax.main --config configs/prm.py --workdir /tmp/euph_prm \
      --config.init.pretrain=/tmp/euph_pretrain/pretrain/final

Writes `WORKDIR/prm/final` (the PRM; its quality numbers in `info.json`),
`WORKDIR/prm/report.json` and `report.png` (Spearman correlation per time bucket, the
guidance check) and caches the rollouts in `WORKDIR/prm/cache/` (`.npz`; a cache made by
another base model, reward or config is regenerated). Sized to finish within ~15 minutes
on 2 CPU cores; resumable like every stage.
"""

from euphonium_jax import config as config_lib


def get_config():
  config = config_lib.get_default_config()
  config.stages = ("prm",)
  config.init.pretrain = "assets/embedded"
  return config
