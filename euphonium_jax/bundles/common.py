"""What both bundles do the same way: arrange restored arrays as a model's parameter tree."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def match_tree(template, restored, path: str = ""):
  """`restored` arranged as `template` (orbax returns list indices as string keys), cast to
  the template's dtypes; ValueError naming the first mismatched key or shape."""
  if isinstance(template, dict):
    if not isinstance(restored, dict):
      raise ValueError(f"{path or 'root'}: expected a group, found an array")
    missing = [k for k in template if k not in restored and str(k) not in restored]
    if missing or len(restored) != len(template):
      raise ValueError(f"{path or 'root'}: checkpoint keys {sorted(map(str, restored))} "
                       f"!= model keys {sorted(map(str, template))}")
    return {k: match_tree(v, restored[k] if k in restored else restored[str(k)], f"{path}/{k}")
            for k, v in template.items()}
  if tuple(template.shape) != tuple(np.shape(restored)):
    raise ValueError(f"{path}: checkpoint shape {np.shape(restored)} != model shape "
                     f"{tuple(template.shape)}")
  return jnp.asarray(restored, template.dtype)
