"""CLIP in NNX (transformers' CLIPModel; open_clip state dicts), its on-device preprocessing
and the LAION aesthetic head: the backbones of the clip_score, pickscore and aesthetic rewards."""
from euphonium_jax.models.clip import aesthetic, loading, model, preprocess

__all__ = ["aesthetic", "loading", "model", "preprocess"]
