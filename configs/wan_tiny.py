r"""A tiny random Wan2.1 model through the grpo stage on CPU: the real-model path end to end
(diffusers folder -> NNX transformer with LoRA, Wan VAE, UMT5; Flow-GRPO's Wan sampler; pixel
reward on decoded frames: DDPO's JPEG compressibility, since random weights draw no shapes).
A test of the machinery at toy size, not a study.

  python -m euphonium_jax.models.wan.tiny /tmp/euphonium_wan_tiny
  python -m euphonium_jax.main --config configs/wan_tiny.py --workdir /tmp/euph_wan_tiny
"""

from euphonium_jax import config as config_lib


def get_config():
  config = config_lib.get_default_config()
  config.stages = ("grpo",)
  config.model_family = "wan"
  config.wan.update(path="/tmp/euphonium_wan_tiny", frames=9, height=32, width=32,
                    max_text_length=16, lora_rank=4, lora_alpha=8.0)
  config.sampling.preset = "flow_grpo_wan"
  config.sampling.update(num_steps=6, group_size=4)
  config.eval.update(num_prompts=4, num_steps=4, num_videos=4)
  config.grpo.update(iterations=2, prompts_per_iteration=2, samples_per_update=8,
                     accumulation=1, lr=1e-3, kl_coef=0.1, eval_every=0, ckpt_every=1,
                     advantage_mode="none", rewards=(("jpeg_compressibility", 1.0),))
  return config
