r"""The LAION improved-aesthetic predictor's published PyTorch state dict -> safetensors.

  python tools/convert_aesthetic.py sac+logos+ava1-l14-linearMSE.pth \
      /path/to/clip-vit-large-patch14/aesthetic/aesthetic.safetensors

The input is the ``.pth`` of christophschuhmann/improved-aesthetic-predictor (a state dict of
its ``MLP``: ``layers.{0,2,4,6,7}.{weight,bias}``, float32; a checkpoint dict holding it under
'state_dict' works too). Every tensor is checked against the published layout (five linear
layers 768 -> 1024 -> 128 -> 64 -> 16 -> 1 for ViT-L/14; the input width is read from the
file) before anything is written; the output is what the `aesthetic` reward reads
(`config.rewards.aesthetic.head`, default PATH/aesthetic/aesthetic.safetensors). Needs torch.
"""
from __future__ import annotations

import argparse
import os
import sys

HIDDEN = (1024, 128, 64, 16, 1)
INDICES = (0, 2, 4, 6, 7)


def expected_shapes(input_dim: int) -> dict[str, tuple[int, ...]]:
  dims = (input_dim,) + HIDDEN
  out = {}
  for idx, a, b in zip(INDICES, dims[:-1], dims[1:]):
    out[f'layers.{idx}.weight'] = (b, a)
    out[f'layers.{idx}.bias'] = (b,)
  return out


def convert(src: str, dst: str) -> dict[str, tuple[int, ...]]:
  """Reads `src` (.pth), checks the layout, writes `dst` (.safetensors); returns the shapes.
  A file of another layout raises ValueError naming every missing, unexpected or mis-shaped
  tensor."""
  import torch
  from safetensors.torch import save_file
  state = torch.load(src, map_location='cpu', weights_only=True)
  if isinstance(state, dict) and 'state_dict' in state and isinstance(state['state_dict'], dict):
    state = state['state_dict']
  if not isinstance(state, dict) or 'layers.0.weight' not in state:
    raise ValueError(f'{src}: not a state dict of the aesthetic MLP (no layers.0.weight)')
  want = expected_shapes(int(state['layers.0.weight'].shape[1]))
  problems = [f'missing {k}' for k in want if k not in state]
  problems += [f'unexpected {k}' for k in state if k not in want]
  problems += [f'{k}: shape {tuple(state[k].shape)}, the published layout has {s}'
               for k, s in want.items() if k in state and tuple(state[k].shape) != s]
  if problems:
    raise ValueError(f'{src} is not the improved-aesthetic MLP layout: ' + '; '.join(problems))
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  save_file({k: state[k].detach().to(torch.float32).contiguous() for k in want}, dst)
  return want


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('src', help='the published .pth state dict')
  parser.add_argument('dst', help='the .safetensors file to write')
  args = parser.parse_args(argv)
  shapes = convert(args.src, args.dst)
  print(f'wrote {args.dst}: ' + ', '.join(f'{k} {list(s)}' for k, s in shapes.items()))
  return 0


if __name__ == '__main__':
  sys.exit(main())
