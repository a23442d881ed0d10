"""Outcome rewards by name. Importing the package registers the built-in rewards (the CLIP
family's networks load only when one of them is built)."""
from euphonium_jax.rewards import clip
from euphonium_jax.rewards import compressibility
from euphonium_jax.rewards import registry
from euphonium_jax.rewards import remote
from euphonium_jax.rewards import shapes
from euphonium_jax.rewards.registry import get, names, register, register_factory

__all__ = ["clip", "compressibility", "get", "names", "register", "register_factory",
           "registry", "remote", "shapes"]
