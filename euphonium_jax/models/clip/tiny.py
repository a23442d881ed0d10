r"""A tiny random CLIP folder, written by transformers itself (tests, `configs/clip_tiny.py`).

  python -m euphonium_jax.models.clip.tiny /tmp/euphonium_clip_tiny

transformers builds a random ``CLIPModel`` (2 layers of width 32 per tower, patch 8 at 32 px,
quick_gelu, projection 16) and saves it with ``save_pretrained`` (config.json +
model.safetensors), a ``CLIPTokenizer`` whose BPE vocabulary holds the letters and one merged
token per word of the embedded world's captions, and a ``CLIPImageProcessor`` config (shortest
edge and crop 32, OpenAI's mean and std, bicubic). With ``aesthetic=True`` it also writes
``aesthetic/aesthetic.safetensors``: a random LAION improved-aesthetic MLP over the
projection. Needs torch and transformers (the test extra); nothing is downloaded.
"""
from __future__ import annotations

import os
import sys


def tiny_vocabulary(words) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """A CLIP BPE vocabulary: specials, every letter with and without '</w>', and merges that
  build each of `words` left to right into one token."""
  letters = 'abcdefghijklmnopqrstuvwxyz'
  tokens = ['<|startoftext|>', '<|endoftext|>'] + list(letters) + [c + '</w>' for c in letters]
  merges = []
  for word in sorted(set(words)):
    parts = list(word[:-1]) + [word[-1] + '</w>']
    acc = parts[0]
    for p in parts[1:]:
      if (acc, p) not in merges:
        merges.append((acc, p))
      acc = acc + p
      if acc not in tokens:
        tokens.append(acc)
  # CLIP's convention: the end-of-text token has the largest id.
  tokens.remove('<|endoftext|>')
  tokens.append('<|endoftext|>')
  return {t: i for i, t in enumerate(tokens)}, merges


def write_tiny_clip(folder: str, seed: int = 0, *, hidden_act: str = 'quick_gelu',
                    image_size: int = 32, aesthetic: bool = False) -> str:
  import json

  import torch
  import transformers

  from euphonium_jax.data import world

  torch.manual_seed(seed)
  words = [w for w in world.vocabulary() if w.isalpha()]
  vocab, merges = tiny_vocabulary(words)
  tok = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
  tok.save_pretrained(folder)
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                       hidden_act=hidden_act, eos_token_id=vocab['<|endoftext|>'],
                       bos_token_id=vocab['<|startoftext|>'], pad_token_id=vocab['<|endoftext|>']),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, image_size=image_size, patch_size=8,
                         hidden_act=hidden_act),
      projection_dim=16)
  model = transformers.CLIPModel(cfg).eval()
  model.save_pretrained(folder)
  proc = {'do_resize': True, 'size': {'shortest_edge': image_size}, 'resample': 3,
          'do_center_crop': True, 'crop_size': {'height': image_size, 'width': image_size},
          'do_rescale': True, 'rescale_factor': 1 / 255, 'do_normalize': True,
          'image_mean': [0.48145466, 0.4578275, 0.40821073],
          'image_std': [0.26862954, 0.26130258, 0.27577711], 'do_convert_rgb': True,
          'image_processor_type': 'CLIPImageProcessor'}
  with open(os.path.join(folder, 'preprocessor_config.json'), 'w') as f:
    json.dump(proc, f, indent=2)
  if aesthetic:
    from safetensors.torch import save_file

    from euphonium_jax.models.clip import aesthetic as aesthetic_lib
    os.makedirs(os.path.join(folder, 'aesthetic'), exist_ok=True)
    save_file(aesthetic_lib.random_torch_state_dict(cfg.projection_dim, seed),
              os.path.join(folder, 'aesthetic', aesthetic_lib.FILENAME))
  return folder


if __name__ == '__main__':
  if len(sys.argv) != 2:
    sys.exit(__doc__)
  print(write_tiny_clip(sys.argv[1], aesthetic=True))
