r"""A tiny random Wan2.1 pipeline folder, written by the reference libraries themselves.

  python -m euphonium_jax.models.wan.tiny /tmp/euphonium_wan_tiny

diffusers builds a 2-layer ``WanTransformer3DModel`` (2 heads of 16, 16 latent channels) and a
small ``AutoencoderKLWan`` (base_dim 4, the Wan2.1 layout); transformers a 2-layer
``UMT5EncoderModel`` (d_model 32); the tokenizer is the embedded world's word-level tokenizer.
Each is saved with ``save_pretrained`` in the published layout (transformer/, vae/,
text_encoder/, tokenizer/), so `configs/wan_tiny.py` exercises the real-model path (loading,
sharding, LoRA, the grpo stage) on CPU in seconds. Needs torch, diffusers and transformers
(the test extra); nothing is downloaded.
"""
from __future__ import annotations

import os
import sys


def write_tiny_pipeline(folder: str, seed: int = 0) -> str:
  import diffusers
  import torch
  import transformers

  from euphonium_jax.data import world
  from euphonium_jax.models import text as text_lib

  torch.manual_seed(seed)
  tok = text_lib.build_tokenizer(world.vocabulary(), max_length=16)
  tok.save_pretrained(os.path.join(folder, "tokenizer"))
  umt5 = transformers.UMT5EncoderModel(transformers.UMT5Config(
      vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
      relative_attention_num_buckets=8, relative_attention_max_distance=16,
      feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0))
  umt5.save_pretrained(os.path.join(folder, "text_encoder"))
  diffusers.WanTransformer3DModel(
      patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
      out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
      rope_max_seq_len=32).save_pretrained(os.path.join(folder, "transformer"))
  diffusers.AutoencoderKLWan(
      base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
      temperal_downsample=[False, True, True]).save_pretrained(os.path.join(folder, "vae"))
  return folder


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit(__doc__)
  print(write_tiny_pipeline(sys.argv[1]))
