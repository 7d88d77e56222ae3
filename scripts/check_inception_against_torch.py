"""Dev check (not CI): jaxgen's FID Inception, LPIPS and torch reader against real PyTorch.

Needs a scratch venv with torch, torchvision and pytorch-fid (never the project's venv):

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch torchvision pytorch-fid lpips
    /tmp/torchenv/bin/python scripts/check_inception_against_torch.py --torch-side /tmp/fidcheck
    .venv/bin/python scripts/check_inception_against_torch.py --jax-side /tmp/fidcheck
    /tmp/torchenv/bin/python scripts/check_inception_against_torch.py --torch-load /tmp/fidcheck

--torch-side builds pytorch-fid's FID Inception with RANDOM weights and BN statistics (no
download), saves its state dict (zip and legacy formats) and the pool features / logits of
random [-1, 1] images through pytorch-fid's own resize path. --jax-side loads those files with
jaxgen's reader, runs jaxgen's network, prints the max relative errors, and writes a file with
`save_state_dict_torch_format`; --torch-load checks that `torch.load` reads that file.
With the lpips package installed, LPIPS (random VGG16, the package's lin heads) is compared too.
"""
import argparse
import os
import sys

import numpy as np

SEED = 0


def torch_side(out):
  import torch
  from pytorch_fid import inception as fid

  torch.manual_seed(SEED)
  # fid_inception_v3() without its weight download: the same patched torchvision model.
  net = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  net.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = fid.FIDInceptionE_1(1280)
  net.Mixed_7c = fid.FIDInceptionE_2(2048)
  with torch.no_grad():  # random weights that keep activations O(1) through ~95 layers
    for m in net.modules():
      if isinstance(m, torch.nn.Conv2d):
        m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5)
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.2)
        m.running_mean.normal_(0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
      elif isinstance(m, torch.nn.Linear):
        m.weight.normal_(0, 2048 ** -0.5)
        m.bias.normal_(0, 0.1)
  net.eval()
  os.makedirs(out, exist_ok=True)
  torch.save(net.state_dict(), os.path.join(out, 'fid_inception_random.pth'))
  torch.save(net.state_dict(), os.path.join(out, 'fid_inception_random_legacy.pth'),
             _use_new_zipfile_serialization=False)

  fid.fid_inception_v3 = lambda: net  # pytorch-fid's wrapper, with our net inside
  wrapper = fid.InceptionV3([3], resize_input=True, normalize_input=True).eval()
  images = {'rgb64': torch.rand(2, 3, 64, 64) * 2 - 1, 'rgb299': torch.rand(1, 3, 299, 299) * 2 - 1}
  result = {}
  with torch.no_grad():
    for name, x in images.items():
      pool = wrapper((x + 1) / 2)[0].flatten(1)  # pytorch-fid takes [0, 1] and maps it to [-1, 1]
      result[f'{name}_images'] = x.numpy()
      result[f'{name}_pool'] = pool.numpy()
      result[f'{name}_logits'] = net.fc(pool).numpy()
  np.savez(os.path.join(out, 'torch_outputs.npz'), **result)
  print(f'torch {torch.__version__}: wrote {out}/fid_inception_random{{,_legacy}}.pth and '
        f'torch_outputs.npz')
  try:
    import lpips
  except ImportError:
    print('lpips not installed: skipping the LPIPS check')
    return
  # Random VGG16 backbone (no download) with the lpips package's own v0.1 lin heads.
  model = lpips.LPIPS(net='vgg', pretrained=True, pnet_rand=True, verbose=False).eval()
  sd = model.state_dict()
  # lpips keeps torchvision's `features` index in its slice keys: net.slice2.5.weight
  vgg = {'features.' + k.split('.', 2)[2]: v for k, v in sd.items() if k.startswith('net.')}
  torch.save(vgg, os.path.join(out, 'lpips_vgg16_random.pth'))
  torch.save({k: v for k, v in sd.items() if k.startswith('lin')},
             os.path.join(out, 'lpips_lin.pth'))
  x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
  with torch.no_grad():
    d = model(x, y).flatten()
  np.savez(os.path.join(out, 'torch_lpips.npz'), x=x.numpy(), y=y.numpy(), d=d.numpy())
  print('wrote lpips_vgg16_random.pth, lpips_lin.pth and torch_lpips.npz')


def _written_cases():
  import ml_dtypes
  rng = np.random.default_rng(SEED)
  return {
      'f32': rng.normal(size=(3, 4)).astype(np.float32),
      'f16': rng.normal(size=(2, 3, 2)).astype(np.float16),
      'bf16': rng.normal(size=(5,)).astype(ml_dtypes.bfloat16),
      'i64': rng.integers(-2**40, 2**40, size=(4,)),
      'scalar': np.array(7, np.int64),
      'empty': np.zeros((0, 3), np.float32),
  }


def jax_side(out):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  from jaxgen import torch_weights
  from jaxgen.models import inception

  ref = np.load(os.path.join(out, 'torch_outputs.npz'))
  fn = jax.jit(inception.inception_features)
  worst = 0.0
  for fmt in ('', '_legacy'):
    path = os.path.join(out, f'fid_inception_random{fmt}.pth')
    state = torch_weights.load_state_dict(path)
    expected = inception.expected_state_dict_shapes()
    unused = sorted(k for k in state if k not in expected and 'num_batches_tracked' not in k)
    assert set(expected) <= set(state) and not unused, (unused, set(expected) - set(state))
    variables = inception.load_inception(path)
    for name in ('rgb64', 'rgb299'):
      x = np.transpose(ref[f'{name}_images'], (0, 2, 3, 1))  # NCHW -> NHWC
      got = fn(variables, x)
      for key in ('pool', 'logits'):
        r, g = ref[f'{name}_{key}'], np.asarray(got[key])
        err = np.max(np.abs(g - r)) / np.max(np.abs(r))
        worst = max(worst, err)
        print(f'{os.path.basename(path):34s} {name:7s} {key:7s} max|jax-torch| = '
              f'{np.max(np.abs(g - r)):.2e}, relative to max|torch| {err:.2e}')
  print(f'all {len(expected)} weight tensors used; worst relative error {worst:.2e}')
  if os.path.exists(os.path.join(out, 'torch_lpips.npz')):
    from jaxgen.models import lpips
    ref = np.load(os.path.join(out, 'torch_lpips.npz'))
    variables = lpips.load_lpips(os.path.join(out, 'lpips_vgg16_random.pth'),
                                 os.path.join(out, 'lpips_lin.pth'))
    nhwc = lambda a: np.transpose(a, (0, 2, 3, 1))  # noqa: E731
    d = np.asarray(jax.jit(lpips.lpips_distance)(variables, nhwc(ref['x']), nhwc(ref['y'])))
    err = np.max(np.abs(d - ref['d']) / np.abs(ref['d']))
    worst = max(worst, err)
    print(f'lpips distances jax {d} torch {ref["d"]}: max relative error {err:.2e}')

  cases = _written_cases()
  torch_weights.save_state_dict_torch_format(cases, os.path.join(out, 'jaxgen_written.pth'))
  # Hand-made views: a transposed tensor and an offset slice sharing one storage.
  st = np.arange(24, dtype=np.float32)
  torch_weights.write_torch_zip(os.path.join(out, 'jaxgen_views.pth'), {'s': st}, {
      'transposed': ('s', 0, (4, 3), (1, 4)), 'offset': ('s', 5, (2, 3), (6, 1))})
  cases['transposed'] = st[:12].reshape(3, 4).T
  cases['offset'] = np.stack([st[5:8], st[11:14]])
  np.savez(os.path.join(out, 'jaxgen_written_expected.npz'),
           **{k: np.asarray(v, np.float64) for k, v in cases.items()})
  print('wrote jaxgen_written.pth and jaxgen_views.pth for --torch-load')
  return worst


def torch_load(out):
  import torch
  expected = np.load(os.path.join(out, 'jaxgen_written_expected.npz'))
  loaded = {}
  for name in ('jaxgen_written.pth', 'jaxgen_views.pth'):
    loaded.update(torch.load(os.path.join(out, name), weights_only=True))
    torch.load(os.path.join(out, name), weights_only=True, mmap=True)  # needs aligned records
  assert set(loaded) == set(expected.files), (sorted(loaded), expected.files)
  for k, t in loaded.items():
    np.testing.assert_array_equal(t.double().numpy(), expected[k], err_msg=k)
    print(f'{k:10s} {str(t.dtype):15s} {tuple(t.shape)} stride={t.stride()} '
          f'offset={t.storage_offset()} ok')
  print(f'torch {torch.__version__} read all {len(loaded)} tensors written by jaxgen')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument('--torch-side', metavar='OUTDIR')
  group.add_argument('--jax-side', metavar='OUTDIR')
  group.add_argument('--torch-load', metavar='OUTDIR')
  args = parser.parse_args()
  if args.torch_side:
    torch_side(args.torch_side)
  elif args.jax_side:
    sys.exit(0 if jax_side(args.jax_side) < 1e-4 else 1)
  else:
    torch_load(args.torch_load)


if __name__ == '__main__':
  main()
