"""Where a path in a config points: absolute, relative to the working directory, or to the
repository (so `assets/embedded` works from anywhere after `pip install -e .`)."""
from __future__ import annotations

import os

from euphonium_jax import checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_path(path: str) -> str:
  """An absolute path, a path relative to the working directory, or to the repository."""
  path = os.path.expanduser(path)
  if os.path.isabs(path) or os.path.exists(path):
    return os.path.abspath(path)
  return os.path.join(REPO_ROOT, path)


def stage_source(init_path: str, workdir: str, stage: str) -> str:
  """A finished stage's directory: from the config's path (the folder itself, or its
  `<stage>/` when that holds a finished stage, as in `assets/embedded`), else this workdir's
  `<stage>/final`."""
  if init_path:
    path = resolve_path(init_path)
    sub = os.path.join(path, stage)
    return sub if checkpoint.is_done(sub) else path
  return os.path.join(workdir, stage, "final")
