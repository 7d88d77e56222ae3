"""Converts PyTorch weights into the .npz that jaxgen's loaders read (no torch needed).

    # FID Inception (pytorch-fid's pt_inception-2015-12-05-6726825d.pth):
    python scripts/convert_torch_weights.py inception pt_inception-2015-12-05-6726825d.pth \\
        --out inception.npz
    # LPIPS: torchvision's vgg16 state dict + the lpips package's v0.1 vgg.pth heads:
    python scripts/convert_torch_weights.py lpips vgg16-397923af.pth --lin vgg.pth --out lpips.npz

The shapes are validated on the way; the .npz keeps the torch key names and layouts (only the
keys the network uses, as float32), so it is accepted wherever the .pth is.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxgen.errors import UserError  # noqa: E402


def convert(kind, path, lin=None):
  """{torch key: float32 array} of the keys `kind`'s network needs, checked."""
  if kind == 'inception':
    from jaxgen.models import inception
    if lin:
      raise UserError('--lin is for lpips only: drop it for inception')
    state, expected = inception.load_state(path), inception.expected_state_dict_shapes()
  else:
    from jaxgen.models import lpips
    state, expected = lpips.load_state(path, lin), lpips.expected_state_dict_shapes()
  return {k: np.asarray(state[k], np.float32) for k in expected}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('kind', choices=('inception', 'lpips'))
  parser.add_argument('path', help='the .pth/.pt state dict (for lpips: torchvision vgg16)')
  parser.add_argument('--lin', help='lpips only: the lpips vgg.pth lin-head weights, if '
                      'they are not in PATH')
  parser.add_argument('--out', required=True, help='the .npz to write')
  args = parser.parse_args()
  try:
    if not args.out.endswith('.npz'):
      raise UserError(f'--out {args.out} must end in .npz')
    arrays = convert(args.kind, args.path, args.lin)
  except UserError as e:
    print(f'jaxgen: error: {e}', file=sys.stderr)
    sys.exit(2)
  tmp = args.out[:-4] + '.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, args.out)
  total = sum(a.size for a in arrays.values())
  print(f'wrote {args.out}: {len(arrays)} tensors, {total:,} values')


if __name__ == '__main__':
  main()
