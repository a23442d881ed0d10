r"""Wan2.1-T2V-1.3B post-training with Flow-GRPO's video recipe: 240x416, 33 frames, 20 SDE
training steps on Wan's UniPC flow-sigma grid (flow_shift 3), 50 evaluation steps, CFG 4.5,
LoRA (rank 32, alpha 64, attention projections), FSDP over every device, bf16.

  python -m euphonium_jax.main --config configs/wan2_1_t2v_1_3b.py --workdir DIR \
      --config.wan.path=/path/to/Wan2.1-T2V-1.3B-Diffusers

`:euphonium` (configs/wan2_1_t2v_1_3b.py:euphonium) selects the Euphonium sampler beside it;
it needs a process reward model for Wan latents, which this project does not train yet, so
validation refuses it with that reason. The weights folder is checked before anything
compiles. Prompts are the embedded world's captions and the reward is the `grpo.rewards`
list (a pixel reward of your own goes there: see the README). Memory per device:
experiments/wan_memory.py.
"""

from euphonium_jax import config as config_lib
from euphonium_jax.sampling import schedules

TRAIN_STEPS, EVAL_STEPS, FLOW_SHIFT = 20, 50, 3.0


def get_config(method: str = "flow_grpo"):
  config = config_lib.get_default_config()
  config.stages = ("grpo",)
  config.model_family = "wan"
  config.wan.update(path="", frames=33, height=240, width=416, max_text_length=512,
                    param_dtype="bfloat16", dtype="bfloat16", remat="full",
                    attention_impl="xla", lora_rank=32, lora_alpha=64.0,
                    lora_targets=("to_q", "to_k", "to_v", "to_out.0"))
  config.mesh.update(shape=(1, -1), axes=("data", "fsdp"))  # FSDP over every device
  if method == "flow_grpo":
    config.sampling.preset = "flow_grpo_wan"
  elif method == "euphonium":
    config.sampling.preset = "euphonium"
  else:
    raise ValueError(f"configs/wan2_1_t2v_1_3b.py:{method}: choose flow_grpo or euphonium")
  config.sampling.update(num_steps=TRAIN_STEPS, group_size=8, shift=FLOW_SHIFT,
                         grid=tuple(float(t) for t in schedules.unipc_flow_grid(
                             TRAIN_STEPS, FLOW_SHIFT)))
  if method == "euphonium":
    config.sampling.guidance.start = 0
  config.eval.update(num_prompts=16, num_steps=EVAL_STEPS, shift=FLOW_SHIFT, cfg_scale=4.5,
                     num_videos=8, fps=16)
  # One optimiser step per iteration of 64 rollouts, in micro-batches of 8 (one per device on
  # 8 devices; on N devices samples_per_update / accumulation must divide by N).
  config.grpo.update(iterations=300, prompts_per_iteration=8, samples_per_update=64,
                     accumulation=8, cfg_scale=4.5, lr=1e-4, kl_coef=0.004,
                     advantage_mode="none" if method == "flow_grpo" else "both",
                     eval_every=25, ckpt_every=10)
  return config
