"""CLIP-family outcome rewards on the device: `clip_score`, `pickscore`, `aesthetic`.

Each scores a configurable set of frames of every video and averages over them:
  clip_score  max(100 * cos(image, text), 0)   (torchmetrics' CLIPScore per image; its
              reference backbone is openai/clip-vit-large-patch14)
  pickscore   exp(logit_scale) * cos(image, text)   (PickScore's formula; its backbone is
              yuvalkirstain/PickScore_v1, a ViT-H/14 CLIPModel)
  aesthetic   the LAION improved-aesthetic MLP on the L2-normalised image embedding
              (backbone openai/clip-vit-large-patch14; head: tools/convert_aesthetic.py)
Settings (`config.rewards.<name>`): `path` (a transformers CLIP folder: config.json,
safetensors with transformers' or open_clip's names, tokenizer, preprocessor_config.json),
`frames` ('first' | 'every' (every `every`-th frame from the first) | 'all'), `batch_size`
(images per forward pass, 0 = all at once), and for `aesthetic` `head` (the converted head;
'' = PATH/aesthetic/aesthetic.safetensors).

The frames stay on the device: selection, preprocessing (``models/clip/preprocess.py``), the
vision tower, the text tower and the score are one jitted program over the whole batch (a
`lax.scan` over chunks of `batch_size` images when it is set); only the prompts are tokenised on the host.
The weights are placed replicated over the mesh of the frames' sharding. The model code is
imported when a reward is built, so importing the rewards package does not load it.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from euphonium_jax.rewards import registry

FRAME_MODES = ('first', 'every', 'all')
DEFAULTS = {'path': '', 'frames': 'first', 'every': 4, 'batch_size': 0}


def frame_indices(num_frames: int, mode: str, every: int) -> tuple[int, ...]:
  """The frames a reward scores: (0,), (0, k, 2k, ...) or all of them."""
  if mode == 'first':
    return (0,)
  if mode == 'every':
    return tuple(range(0, num_frames, every))
  if mode == 'all':
    return tuple(range(num_frames))
  raise ValueError(f'frames={mode!r}: choose one of {FRAME_MODES}')


def check_common(name: str, s: ml_collections.ConfigDict) -> list[str]:
  """Problems of the settings every CLIP reward shares, each naming key, value, what is allowed."""
  key = f'config.rewards.{name}'
  problems = []
  if not s.path:
    problems.append(f"{key}.path = '' is invalid: set it to a transformers CLIP folder "
                    '(config.json, *.safetensors, tokenizer files, preprocessor_config.json)')
  elif not os.path.isdir(s.path):
    problems.append(f'{key}.path = {s.path!r} is invalid: no such folder')
  else:
    missing = [f for f in ('config.json', 'preprocessor_config.json')
               if not os.path.exists(os.path.join(s.path, f))]
    if missing:
      problems.append(f'{key}.path = {s.path!r} is invalid: the folder lacks {missing} (a '
                      'transformers CLIP folder has config.json and preprocessor_config.json)')
  if s.frames not in FRAME_MODES:
    problems.append(f'{key}.frames = {s.frames!r} is invalid: choose one of '
                    f'{", ".join(FRAME_MODES)}')
  if isinstance(s.every, bool) or not isinstance(s.every, int) or s.every < 1:
    problems.append(f'{key}.every = {s.every!r} is invalid: an integer >= 1 (frames = '
                    "'every' scores frames 0, every, 2 * every, ...)")
  if isinstance(s.batch_size, bool) or not isinstance(s.batch_size, int) or s.batch_size < 0:
    problems.append(f'{key}.batch_size = {s.batch_size!r} is invalid: an integer >= 0 (images '
                    'per forward pass; 0 = the whole batch at once)')
  return problems


def aesthetic_head_path(s: ml_collections.ConfigDict) -> str:
  return s.head or os.path.join(s.path, 'aesthetic', 'aesthetic.safetensors')


def check_aesthetic(s: ml_collections.ConfigDict) -> list[str]:
  problems = check_common('aesthetic', s)
  head = aesthetic_head_path(s)
  if s.path and not os.path.isfile(head):
    problems.append(f'config.rewards.aesthetic.head = {s.head!r} is invalid: no file {head!r} '
                    '(convert the published head with tools/convert_aesthetic.py)')
  return problems


class ClipReward:
  """A built CLIP reward: frames jax [B, T, H, W, 3] in [0, 1], prompts -> jax float32 [B]."""

  def __init__(self, kind: str, model, proc, tokenizer=None, head=None, *,
               frames: str = 'first', every: int = 4, batch_size: int = 0):
    """`model`: a CLIP (models/clip/model.py); `proc`: its ImageProcessing; `tokenizer`: the
    folder's (not used by `aesthetic`); `head`: the AestheticMLP (only `aesthetic`)."""
    from flax import nnx
    self.kind, self.mode, self.every, self.batch_size = kind, frames, every, batch_size
    self.max_length = model.cfg.text.max_positions
    self.tokenizer, self.proc = tokenizer, proc
    self._graphdef, self._state = nnx.split((model, head))
    self._placed: dict = {}
    self._program = jax.jit(self._score, static_argnames=('indices',))

  @classmethod
  def from_settings(cls, kind: str, settings: ml_collections.ConfigDict) -> 'ClipReward':
    """Loads the folder `settings.path` (and the aesthetic head) once."""
    from euphonium_jax.models.clip import aesthetic as aesthetic_lib
    from euphonium_jax.models.clip import loading
    from euphonium_jax.models.clip import preprocess
    model = loading.load_clip(settings.path)
    proc = preprocess.ImageProcessing.from_hf(loading.preprocessor_config(settings.path))
    tokenizer = loading.load_tokenizer(settings.path) if kind != 'aesthetic' else None
    head = None
    if kind == 'aesthetic':
      head = aesthetic_lib.load_aesthetic(aesthetic_head_path(settings), model.cfg.projection_dim)
    return cls(kind, model, proc, tokenizer, head, frames=settings.frames, every=settings.every,
               batch_size=settings.batch_size)

  def _score(self, state, frames, ids, mask, indices):
    """The one jitted program: [B, T, H, W, 3] -> [B] float32."""
    from flax import nnx

    from euphonium_jax.models.clip import model as clip_model
    from euphonium_jax.models.clip import preprocess
    model, head = nnx.merge(self._graphdef, state)
    b = frames.shape[0]
    sel = frames[:, jnp.asarray(indices)]  # [B, K, H, W, 3]
    k = sel.shape[1]
    flat = sel.reshape((b * k,) + sel.shape[2:])

    def embed(weights, chunk):  # merged from the weights of this trace level (lax.scan)
      pixels = preprocess.preprocess(chunk, self.proc)
      vision = nnx.merge(self._graphdef, weights)[0]
      return clip_model.normalize(vision.image_features(pixels))

    if self.batch_size and self.batch_size < b * k:
      n, bs = b * k, self.batch_size
      chunks = -(-n // bs)
      padded = jnp.concatenate([flat, jnp.zeros((chunks * bs - n,) + flat.shape[1:],
                                                flat.dtype)])
      _, img = jax.lax.scan(lambda w, c: (w, embed(w, c)), state,
                            padded.reshape((chunks, bs) + flat.shape[1:]))
      img = img.reshape(chunks * bs, -1)[:n]
    else:
      img = embed(state, flat)
    img = img.reshape(b, k, -1)
    if self.kind == 'aesthetic':
      return head(img.reshape(b * k, -1)).reshape(b, k).mean(axis=1)
    txt = clip_model.normalize(model.text_features(ids, mask))  # [B, P]
    cos = jnp.einsum('bkp,bp->bk', img, txt)
    if self.kind == 'clip_score':
      return jnp.maximum(100.0 * cos, 0.0).mean(axis=1)
    return (jnp.exp(model.logit_scale[...]) * cos).mean(axis=1)  # pickscore

  def _state_for(self, frames):
    """The weights replicated over the mesh of the frames' sharding (placed once per mesh)."""
    sharding = getattr(frames, 'sharding', None)
    mesh = sharding.mesh if isinstance(sharding, NamedSharding) else None
    key = mesh  # meshes are hashable; None: the weights where they were loaded
    if key not in self._placed:
      if mesh is None:
        self._placed[key] = (None, self._state)
      else:
        rep = NamedSharding(mesh, PartitionSpec())
        self._placed[key] = (rep, jax.tree.map(
            lambda x: jax.make_array_from_callback(x.shape, rep, lambda i, x=np.asarray(x): x[i]),
            self._state))
    return self._placed[key]

  def __call__(self, frames, prompts: Sequence[str]) -> jax.Array:
    frames = frames if isinstance(frames, jax.Array) else jnp.asarray(frames, jnp.float32)
    if frames.ndim != 5 or frames.shape[-1] != 3:
      raise ValueError(f'{self.kind}: frames must be [B, T, H, W, 3], got {frames.shape}')
    if len(prompts) != frames.shape[0]:
      raise ValueError(f'{self.kind}: {len(prompts)} prompts for {frames.shape[0]} videos')
    from euphonium_jax.models.clip import loading
    if self.tokenizer is not None:
      ids, mask = loading.tokenize(self.tokenizer, prompts, self.max_length)
    else:
      ids = mask = np.zeros((len(prompts), 1), np.int32)
    rep, state = self._state_for(frames)
    if rep is not None:
      ids, mask = (jax.make_array_from_callback(a.shape, rep, lambda i, a=a: a[i])
                   for a in (ids, mask))
    indices = frame_indices(frames.shape[1], self.mode, self.every)
    return self._program(state, frames, ids, mask, indices=indices)


@registry.register_factory('clip_score', defaults=DEFAULTS, on_device=True,
                           check=lambda s: check_common('clip_score', s))
def clip_score(settings: ml_collections.ConfigDict) -> ClipReward:
  """max(100 cos, 0) averaged over the scored frames (torchmetrics' CLIPScore per image)."""
  return ClipReward.from_settings('clip_score', settings)


@registry.register_factory('pickscore', defaults=DEFAULTS, on_device=True,
                           check=lambda s: check_common('pickscore', s))
def pickscore(settings: ml_collections.ConfigDict) -> ClipReward:
  """exp(logit_scale) cos averaged over the scored frames (PickScore's formula)."""
  return ClipReward.from_settings('pickscore', settings)


@registry.register_factory('aesthetic', defaults=dict(DEFAULTS, head=''), on_device=True,
                           check=check_aesthetic)
def aesthetic(settings: ml_collections.ConfigDict) -> ClipReward:
  """The LAION aesthetic head on normalised image embeddings, averaged over the frames."""
  return ClipReward.from_settings('aesthetic', settings)
