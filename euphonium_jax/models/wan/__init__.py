"""The real Wan2.1 family in NNX: transformer (+ LoRA), VAE, UMT5 text encoder; loading.py
reads their published weight folders."""
from euphonium_jax.models.wan.transformer import (
    WAN_RULES, LoRAParam, WanConfig, WanTransformer, load_wan_transformer)
from euphonium_jax.models.wan.umt5 import (
    UMT5_RULES, UMT5Config, UMT5Encoder, abstract_umt5, load_umt5, relative_position_bucket)
from euphonium_jax.models.wan.umt5_prompts import (
    cache_prompt_embeds, clean_prompt, encode_tokens, load_tokenizer, prompt_embeds,
    tokenize_prompts)
from euphonium_jax.models.wan.vae import (
    VAE_RULES, WanVAE, WanVAEConfig, load_wan_vae, make_decode_fn, make_encode_mean_fn)
