r"""Wan2.1-T2V-1.3B post-training at Flow-GRPO's video size: 240x416, 33 frames, 20 SDE training
steps on Wan's UniPC flow-sigma grid (flow_shift 3) with the integer-truncated timesteps the
UniPC scheduler feeds the transformer, 50 evaluation steps, CFG 4.5, LoRA (rank 32, alpha 64,
attention projections), FSDP over every device, bf16. Prompts: `data.prompts` (a .txt / .jsonl
file or a folder with train.txt / test.txt, as Flow-GRPO's datasets).

  # Flow-GRPO's recipe (no reward model in the sampler):
  python -m euphonium_jax.main --config configs/wan2_1_t2v_1_3b.py --workdir DIR \
      --config.wan.path=/path/to/Wan2.1-T2V-1.3B-Diffusers --config.data.prompts=prompts.txt
  # Euphonium: first a latent PRM on the base model's rollouts, then guided GRPO with it:
  python -m euphonium_jax.main --config configs/wan2_1_t2v_1_3b.py:prm --workdir DIR ...
  python -m euphonium_jax.main --config configs/wan2_1_t2v_1_3b.py:euphonium --workdir DIR \
      --config.init.prm=DIR/prm/final ...
  # The result on the prompt set's test split (or --config.evaluate.model=base):
  python -m euphonium_jax.main --config configs/wan2_1_t2v_1_3b.py:evaluate --workdir DIR ...

Where this differs from Flow-GRPO's Wan recipe (flow_grpo scripts/train_wan2_1.py and its
config), and why:
- Matched: Flow-GRPO trains the first 19 of 20 steps in order (its timestep_fraction 0.99 of
  20 steps; here grpo.step_selection='first' with timestep_fraction=1.0 of the N - 1 = 19
  trainable transitions), clips the ratio at 1e-3, uses groups of 4 with independent noise,
  normalises advantages per prompt with the population std + 1e-4 (grpo.adv_std='population',
  adv_eps=1e-4), KL 0.004 to the adapters-off model (the same kernel KL), lr 1e-4, CFG 4.5 in
  rollouts and updates, 4 prompts x 4 rollouts per GPU per iteration in optimiser steps of 8
  samples per GPU (here on 8 devices: 32 prompts, steps of 64 samples in 8 micro-batches of
  one sample per device: the same gradient, in less memory).
- Not copied: Flow-GRPO drops samples whose advantages are all zero (and pads the batch back
  at random) and skips its first two epochs' updates; here every sample trains.
- Flow-GRPO keeps an EMA of the LoRA weights (decay 0.9 every 8 optimiser steps) for its
  evaluations and checkpoints; here grpo.ema_decay = 0.987 = 0.9 ** (1 / 8) per step, used by
  the evaluations and the final model.
- The reward is `grpo.rewards`: JPEG compressibility by default (a pixel reward that needs no
  weights); `:pickscore_aesthetic` trains against PickScore and the LAION aesthetic score
  (on-device CLIP rewards, euphonium_jax/rewards/clip.py; folders by path).
- `:euphonium` guides the last 5 of the 20 steps (the reference guides 12-15 of 16) with the
  reference's raw PRM gradient scale, and uses both advantages.
Memory per device: experiments/wan_memory.py.
"""

from euphonium_jax import config as config_lib
from euphonium_jax.sampling import schedules

TRAIN_STEPS, EVAL_STEPS, FLOW_SHIFT = 20, 50, 3.0
METHODS = ("flow_grpo", "euphonium", "prm", "evaluate", "pickscore_aesthetic")


def get_config(method: str = "flow_grpo"):
  if method not in METHODS:
    raise ValueError(f"configs/wan2_1_t2v_1_3b.py:{method}: choose one of {METHODS}")
  config = config_lib.get_default_config()
  config.stages = {"flow_grpo": ("grpo",), "euphonium": ("grpo",), "prm": ("prm",),
                   "evaluate": ("evaluate",), "pickscore_aesthetic": ("grpo",)}[method]
  config.model_family = "wan"
  config.wan.update(path="", frames=33, height=240, width=416, max_text_length=512,
                    param_dtype="bfloat16", dtype="bfloat16", remat="full",
                    attention_impl="auto", lora_rank=32, lora_alpha=64.0,
                    lora_targets=("to_q", "to_k", "to_v", "to_out.0"))
  config.mesh.update(shape=(1, -1), axes=("data", "fsdp"))  # FSDP over every device
  grid = tuple(float(t) for t in schedules.unipc_flow_grid(TRAIN_STEPS, FLOW_SHIFT))
  config.sampling.preset = "euphonium" if method == "euphonium" else "flow_grpo_wan"
  config.sampling.update(num_steps=TRAIN_STEPS, group_size=4, shift=FLOW_SHIFT, grid=grid,
                         timesteps="truncated")
  if method == "euphonium":
    config.sampling.update(schedule="flow_grpo_wan")
    config.sampling.guidance.update(mode="raw", scale=0.01, start=TRAIN_STEPS - 5)
  config.eval.update(num_prompts=16, num_steps=EVAL_STEPS, shift=FLOW_SHIFT, cfg_scale=4.5,
                     num_videos=8, fps=16)
  # Two optimiser steps per iteration of 128 rollouts, each in micro-batches of 8 (on N
  # devices samples_per_update / accumulation must divide by N).
  config.grpo.update(iterations=300, prompts_per_iteration=32, samples_per_update=64,
                     accumulation=8, cfg_scale=4.5, lr=1e-4, kl_coef=0.004,
                     timestep_fraction=1.0, step_selection="first", clip_range=1e-3,
                     adv_std="population", adv_eps=1e-4, ema_decay=0.987,
                     rewards=(("jpeg_compressibility", 1.0),),
                     advantage_mode="both" if method == "euphonium" else "none",
                     eval_every=25, ckpt_every=10)
  if method == "pickscore_aesthetic":
    pickscore_aesthetic(config)
  # The PRM (`:prm`): the transformer's first 4 blocks with LoRA, on 512 prompts x 4 rollouts
  # of the base model, scored by the first reward.
  config.prm.update(depth=4, num_queries=8, head_width=256, lora_rank=16, lora_alpha=16.0,
                    reward="jpeg_compressibility", steps=2000, batch_size=16,
                    states="renoised")  # the training cache keeps x0 only (see stages/prm.py)
  config.prm.data.update(num_prompts=512, group_size=4, chunk_prompts=4, sampler="flow_grpo_wan",
                         num_steps=TRAIN_STEPS, shift=FLOW_SHIFT, cfg_scale=4.5)
  return config


def pickscore_aesthetic(config):
  """`:pickscore_aesthetic`: Flow-GRPO's recipe against learned rewards on decoded frames,
  the peers' multi-reward setting: PickScore (weight 1; its `pickscore.path` is a
  transformers folder of yuvalkirstain/PickScore_v1 with the tokenizer and processor of
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K) on every 4th of the 33 frames, plus the LAION
  aesthetic score (weight 0.5; `aesthetic.path` a folder of openai/clip-vit-large-patch14,
  `aesthetic.head` the head converted by tools/convert_aesthetic.py) on the first frame. Each
  is group-normalised on its own, so the weights set their shares of the advantage. Scored on
  the device, 8 images per forward pass.

    python -m euphonium_jax.main --config configs/wan2_1_t2v_1_3b.py:pickscore_aesthetic \
        --workdir DIR --config.wan.path=... --config.data.prompts=prompts.txt \
        --config.rewards.pickscore.path=/path/to/PickScore_v1 \
        --config.rewards.aesthetic.path=/path/to/clip-vit-large-patch14 \
        --config.rewards.aesthetic.head=/path/to/aesthetic.safetensors
  """
  config.grpo.rewards = (("pickscore", 1.0), ("aesthetic", 0.5))
  config.rewards.pickscore.update(path="", frames="every", every=4, batch_size=8)
  config.rewards.aesthetic.update(path="", head="", frames="first", batch_size=8)
  return config

