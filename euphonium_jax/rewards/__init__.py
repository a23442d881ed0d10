"""Outcome rewards by name. Importing the package registers the built-in rewards."""
from euphonium_jax.rewards import compressibility
from euphonium_jax.rewards import registry
from euphonium_jax.rewards import shapes
from euphonium_jax.rewards.registry import get, names, register

__all__ = ["compressibility", "get", "names", "register", "registry", "shapes"]
