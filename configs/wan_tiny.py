r"""A tiny random Wan2.1 model through the real-model stages on CPU: the real-model path end to
end (diffusers folder -> NNX transformer with LoRA, Wan VAE, UMT5; a prompt file; Flow-GRPO's
Wan sampler; pixel reward on decoded frames: DDPO's JPEG compressibility, since random weights
draw no shapes). A test of the machinery at toy size, not a study.

  python -m euphonium_jax.models.wan.tiny /tmp/euphonium_wan_tiny
  python -m euphonium_jax.main --config configs/wan_tiny.py --workdir /tmp/euph_wan_tiny

`:euphonium` trains a latent PRM on the tiny Wan's own rollouts (`prm` stage: its first block,
initialised from the base, LoRA on the trunk), then runs guided Euphonium GRPO with it (CFG 3
and PRM guidance together, an EMA of the policy for evaluation), then evaluates the result on
the prompt file's test split:

  python -m euphonium_jax.main --config configs/wan_tiny.py:euphonium --workdir /tmp/euph_wan_e
"""

from euphonium_jax import config as config_lib


def get_config(method: str = "flow_grpo"):
  config = config_lib.get_default_config()
  config.stages = ("grpo",)
  config.model_family = "wan"
  config.wan.update(path="/tmp/euphonium_wan_tiny", frames=9, height=32, width=32,
                    max_text_length=16, lora_rank=4, lora_alpha=8.0)
  config.data.update(prompts="assets/prompts/wan_tiny.txt", test_fraction=0.25)
  config.sampling.preset = "flow_grpo_wan"
  config.sampling.update(num_steps=6, group_size=4)
  config.eval.update(num_prompts=4, num_steps=4, num_videos=4)
  config.grpo.update(iterations=2, prompts_per_iteration=2, samples_per_update=8,
                     accumulation=1, lr=1e-3, kl_coef=0.1, eval_every=0, ckpt_every=1,
                     advantage_mode="none", rewards=(("jpeg_compressibility", 1.0),))
  if method == "flow_grpo":
    return config
  if method != "euphonium":
    raise ValueError(f"configs/wan_tiny.py:{method}: choose flow_grpo or euphonium")
  config.stages = ("prm", "grpo", "evaluate")
  config.prm.update(depth=1, num_queries=2, head_width=16, lora_rank=2, lora_alpha=4.0,
                    reward="jpeg_compressibility", steps=20, batch_size=8, log_every=10,
                    ckpt_every=20, lr=1e-3, warmup_steps=0, states="renoised")
  config.prm.data.update(num_prompts=4, group_size=4, chunk_prompts=2, num_steps=4, shift=3.0)
  config.prm.report.update(num_prompts=2, ode_steps=2)
  # Euphonium's sampler on the tiny grid: constant noise, PRM-gradient guidance on the last
  # two of six steps (the reference guides steps 12-15 of 16), process advantages.
  config.sampling.preset = "euphonium"
  config.sampling.update(num_steps=6, group_size=4, shift=3.0)
  config.sampling.guidance.update(start=4, mode="raw", scale=0.5)
  # Classifier-free guidance and PRM guidance together: the policy's velocity is the CFG
  # combination (negative prompt: the null prompt); the PRM gradient is taken in the latent.
  config.grpo.update(advantage_mode="both", process_source="delta", ema_decay=0.5,
                     cfg_scale=3.0)
  config.eval.cfg_scale = 3.0
  return config
