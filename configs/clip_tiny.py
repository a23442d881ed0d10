r"""DanceGRPO on the embedded world against `clip_score` from a tiny random CLIP: the CLIP
reward path end to end (a transformers CLIP folder -> NNX towers, on-device preprocessing and
scoring of the decoded frames, inside the grpo stage). Random weights judge nothing: a smoke
run of the machinery, not a study.

  python -m euphonium_jax.models.clip.tiny /tmp/euphonium_clip_tiny
  python -m euphonium_jax.main --config configs/clip_tiny.py --workdir /tmp/euph_clip_tiny

The folder is a setting (`--config.rewards.clip_score.path=...`): a real CLIP folder (e.g.
openai/clip-vit-large-patch14, torchmetrics' CLIPScore backbone) runs the same way.
`:aesthetic` adds the LAION aesthetic head (the tiny folder's aesthetic/ subfolder), weight 0.5.
"""

from euphonium_jax import config as config_lib


def get_config(arg: str = "clip_score"):
  if arg not in ("clip_score", "aesthetic"):
    raise ValueError(f"configs/clip_tiny.py:{arg}: choose clip_score or aesthetic")
  config = config_lib.get_default_config()
  config.stages = ("grpo",)
  config.init.pretrain = "assets/embedded"
  config = config_lib.as_baseline(config, "dance_grpo")
  config.sampling.update(num_steps=6, group_size=4)
  config.eval.update(num_prompts=4, num_steps=4, num_videos=4)
  rewards = (("clip_score", 1.0),) + ((("aesthetic", 0.5),) if arg == "aesthetic" else ())
  config.grpo.update(iterations=2, prompts_per_iteration=2, samples_per_update=8,
                     accumulation=1, lr=1e-4, eval_every=0, ckpt_every=1, rewards=rewards)
  # Every second of the 8 frames, all 8 videos of an iteration in one forward pass.
  config.rewards.clip_score.update(path="/tmp/euphonium_clip_tiny", frames="every", every=2)
  config.rewards.aesthetic.update(path="/tmp/euphonium_clip_tiny", frames="first")
  return config
