"""NNX networks of the embedded world: video VAE, video DiT, text encoder (see api.py)."""
from euphonium_jax.models.api import (
    default_model_configs, make_decode_fn, make_dit, make_encode_fn, make_text_encoder,
    make_text_fn, make_vae, make_velocity_fn, validate_model_configs)
from euphonium_jax.models.dit import VideoDiT
from euphonium_jax.models.layers import build
from euphonium_jax.models.text import TextEncoder, build_tokenizer, tokenize
from euphonium_jax.models.vae import VideoVAE, vae_loss
