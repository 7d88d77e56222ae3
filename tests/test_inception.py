"""FID Inception: weight mapping from a torch-format file, the input resize against torch's
bilinear formula, the FID pooling quirks, and output shapes. Random weights throughout (the
real network is compared with PyTorch by scripts/check_inception_against_torch.py)."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxgen import torch_weights
from jaxgen.errors import UserError
from jaxgen.models import inception

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTURED = ('Mixed_5b', 'Mixed_5c', 'Mixed_6a', 'Mixed_6b', 'Mixed_7a', 'Mixed_7b', 'Mixed_7c')


def random_state(seed=0):
  """A pt_inception-shaped state dict whose activations stay O(1) through the network."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in inception.expected_state_dict_shapes().items():
    leaf = key.rsplit('.', 1)[1]
    if key.endswith('conv.weight'):
      v = rng.normal(0, np.sqrt(2 / np.prod(shape[1:])), shape)
    elif key == 'fc.weight':
      v = rng.normal(0, shape[1] ** -0.5, shape)
    elif leaf in ('weight', 'running_var'):
      v = rng.uniform(0.5, 1.5, shape)
    else:
      v = rng.normal(0, 0.2, shape)
    state[key] = v.astype(np.float32)
    if key.endswith('bn.running_var'):  # torch saves these counters too; they are unused
      state[key.replace('running_var', 'num_batches_tracked')] = np.array(100, np.int64)
  return state


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  state = random_state()
  path = str(tmp_path_factory.mktemp('inception') / 'pt_inception-random.pth')
  torch_weights.save_state_dict_torch_format(state, path)
  return path, state


@pytest.fixture(scope='module')
def variables(weights):
  return inception.load_inception(weights[0])


@pytest.fixture(scope='module')
def features():
  return jax.jit(inception.inception_features)


@pytest.fixture(scope='module')
def network():
  """The network on already-preprocessed 299x299 input, also returning the Mixed outputs."""
  def run(v, x):
    out, state = inception.InceptionV3().apply(
        v, x, capture_intermediates=lambda m, _: m.name in CAPTURED, mutable=['intermediates'])
    return out, {k: v['__call__'][0] for k, v in state['intermediates'].items()}
  return jax.jit(run)


def images(shape, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


# ----------------------------------------------------------------------------
# NumPy float64 references
# ----------------------------------------------------------------------------
def np_torch_bilinear(x, out_h, out_w):
  """torch F.interpolate(mode='bilinear', align_corners=False) of NHWC x, in float64."""
  def matrix(n_in, n_out):
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
      src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)  # torch clamps negative sources to 0
      i0 = int(src)
      i1 = i0 + 1 if i0 < n_in - 1 else i0
      m[i, i0] += 1 - (src - i0)
      m[i, i1] += src - i0
    return m
  rows = np.einsum('oh,bhwc->bowc', matrix(x.shape[1], out_h), np.float64(x))
  return np.einsum('pw,bowc->bopc', matrix(x.shape[2], out_w), rows)


def np_pool3(x, op):
  """3x3 stride-1 pad-1 pooling of NHWC x: 'max', 'avg_exclude_pad' or 'avg_include_pad'."""
  x = np.float64(x)
  h, w = x.shape[1:3]
  fill = -np.inf if op == 'max' else 0.
  p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=fill)
  windows = np.stack([p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)])
  if op == 'max':
    return windows.max(0)
  count = np.pad(np.ones((h, w)), 1)
  count = sum(count[i:i + h, j:j + w] for i in range(3) for j in range(3))
  return windows.sum(0) / (count[None, :, :, None] if op == 'avg_exclude_pad' else 9)


def np_basic_conv(x, state, prefix, stride=1, pad=(0, 0)):
  """BasicConv2d from torch-layout weights: conv (OIHW) -> BN(eps 1e-3) -> ReLU, float64."""
  w = np.float64(state[prefix + '.conv.weight'])
  x = np.pad(np.float64(x), ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
  kh, kw = w.shape[2:]
  oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  y = sum(np.einsum('bhwi,oi->bhwo', x[:, i:i + stride * oh:stride, j:j + stride * ow:stride],
                    w[:, :, i, j]) for i in range(kh) for j in range(kw))
  bn = {k: np.float64(state[f'{prefix}.bn.{k}']) for k in ('weight', 'bias', 'running_mean',
                                                             'running_var')}
  y = (y - bn['running_mean']) / np.sqrt(bn['running_var'] + 1e-3) * bn['weight'] + bn['bias']
  return np.maximum(y, 0)


# ----------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------
def test_expected_keys_match_the_torch_network():
  shapes = inception.expected_state_dict_shapes()
  # Numbers from pytorch-fid's FID Inception state dict (num_batches_tracked left out).
  assert len(shapes) == 472
  assert sum(int(np.prod(s)) for s in shapes.values()) == 23_885_392
  assert shapes['fc.weight'] == (1008, 2048) and shapes['fc.bias'] == (1008,)
  assert shapes['Conv2d_1a_3x3.conv.weight'] == (32, 3, 3, 3)
  assert shapes['Mixed_5b.branch_pool.conv.weight'] == (32, 192, 1, 1)
  assert shapes['Mixed_6e.branch7x7_2.conv.weight'] == (192, 192, 1, 7)
  assert shapes['Mixed_7b.branch3x3dbl_3b.conv.weight'] == (384, 384, 3, 1)
  assert shapes['Mixed_7c.branch_pool.conv.weight'] == (192, 2048, 1, 1)
  assert shapes['Mixed_7c.branch3x3dbl_1.bn.running_var'] == (448,)


def _flax_leaf(variables, key):
  *modules, leaf = key.split('.')
  if modules[-1] == 'conv':
    collection, name = 'params', 'kernel'
  elif modules[-1] == 'fc':
    collection, name = 'params', {'weight': 'kernel', 'bias': 'bias'}[leaf]
  else:
    collection, name = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
                        'running_mean': ('batch_stats', 'mean'),
                        'running_var': ('batch_stats', 'var')}[leaf]
  node = variables[collection]
  for m in modules:
    node = node[m]
  return np.asarray(node[name])


def test_loader_maps_every_tensor(weights, variables):
  _, state = weights
  used = [k for k in state if not k.endswith('num_batches_tracked')]
  assert len(jax.tree_util.tree_leaves(variables)) == len(used) == 472  # one leaf per key
  for key in used:
    got = _flax_leaf(variables, key)
    want = state[key]
    if key.endswith('conv.weight'):
      want = want.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif key == 'fc.weight':
      want = want.T
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want, err_msg=key)


@pytest.mark.parametrize('prefix,features,kernel,stride,pad,in_shape', [
    ('Conv2d_1a_3x3', 32, 3, 2, (0, 0), (1, 9, 11, 3)),
    ('Mixed_6b.branch7x7_2', 128, (1, 7), 1, (0, 3), (1, 5, 9, 128)),
    ('Mixed_7c.branch3x3_2b', 384, (3, 1), 1, (1, 0), (1, 4, 3, 384)),
])
def test_loaded_conv_matches_numpy(weights, variables, prefix, features, kernel, stride, pad,
                                   in_shape):
  _, state = weights
  node = {c: variables[c] for c in ('params', 'batch_stats')}
  for m in prefix.split('.'):
    node = {c: node[c][m] for c in node}
  x = images(in_shape)
  got = inception.BasicConv2d(features, kernel, stride, pad).apply(node, x)
  np.testing.assert_allclose(got, np_basic_conv(x, state, prefix, stride, pad), rtol=1e-4,
                             atol=1e-4)


def test_loader_refuses_missing_and_misshaped_keys(weights, tmp_path):
  _, state = weights
  bad = dict(state)
  for k in ('Mixed_7c.branch3x3_1.conv.weight', 'Mixed_5b.branch1x1.bn.bias',
            'Conv2d_1a_3x3.bn.running_mean'):
    del bad[k]
  bad['fc.weight'] = np.zeros((1000, 2048), np.float32)
  path = str(tmp_path / 'bad.pth')
  torch_weights.save_state_dict_torch_format(bad, path)
  with pytest.raises(UserError) as e:
    inception.load_inception(path)
  assert str(e.value) == (
      f'Inception weights {path}: 3 keys missing (Conv2d_1a_3x3.bn.running_mean, '
      'Mixed_5b.branch1x1.bn.bias, Mixed_7c.branch3x3_1.conv.weight), 1 mis-shaped '
      '(fc.weight: (1000, 2048) != (1008, 2048)); pass the pt_inception-2015-12-05 state dict '
      'or an .npz made by scripts/convert_torch_weights.py')


def test_converted_npz_loads_the_same(weights, variables, tmp_path):
  out = str(tmp_path / 'inception.npz')
  subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'convert_torch_weights.py'),
                  'inception', weights[0], '--out', out], check=True, capture_output=True)
  again = inception.load_inception(out)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, variables)


# ----------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('in_hw,size', [((28, 28), 299), ((64, 48), 299), ((7, 9), 3),
                                        ((5, 4), 11)])
def test_resize_matches_torch_bilinear(in_hw, size):
  x = images((2, *in_hw, 3))
  got = np.asarray(inception.resize_bilinear(x, size))
  # float32 sample positions (in torch too) leave ~1e-5 of the exact float64 result; the
  # wrong variants (align_corners=True, antialiasing, half-pixel off) miss by >1e-2.
  np.testing.assert_allclose(got, np_torch_bilinear(x, size, size), atol=2e-5)


def test_grayscale_is_replicated():
  gray = images((2, 28, 28, 1))
  a = inception.preprocess(gray)
  assert a.shape == (2, 299, 299, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, inception.preprocess(np.repeat(gray, 3, axis=-1)))
  with pytest.raises(UserError, match='1 or 3 channels'):
    inception.preprocess(np.zeros((1, 28, 28, 2), np.float32))


def test_pooling_functions_match_numpy():
  x = images((2, 5, 6, 3))
  np.testing.assert_allclose(inception.avg_pool_3x3_exclude_pad(x),
                             np_pool3(x, 'avg_exclude_pad'), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(inception.max_pool_3x3(x, 1, 1), np_pool3(x, 'max'), rtol=1e-6)
  # The reference tells the variants apart at the borders (so the test can fail).
  assert not np.allclose(np_pool3(x, 'avg_exclude_pad'), np_pool3(x, 'avg_include_pad'))


# ----------------------------------------------------------------------------
# The full network
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('shape', [(2, 28, 28, 1), (1, 64, 64, 3)])
def test_output_shapes(variables, features, shape):
  out = features(variables, images(shape))
  assert out['pool'].shape == (shape[0], 2048) and out['logits'].shape == (shape[0], 1008)
  assert out['pool'].dtype == out['logits'].dtype == np.float32
  assert np.all(np.isfinite(out['pool'])) and np.all(np.isfinite(out['logits']))
  assert np.std(out['pool']) > 1e-3  # random weights still give live features


@pytest.fixture(scope='module')
def run_299(variables, network):
  """A 299x299 image through the network, with the captured Mixed block outputs."""
  x = images((1, 299, 299, 3), seed=1)
  out, mixed = network(variables, x)
  return x, out, {k: np.float64(v) for k, v in mixed.items()}


def test_resize_happens_in_features(variables, features, network, run_299):
  x64 = images((1, 64, 64, 3), seed=2)
  got = features(variables, x64)['pool']
  # == the network on the NumPy (torch-formula) resize of the same image
  want = network(variables, np_torch_bilinear(x64, 299, 299).astype(np.float32))[0]['pool']
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # the same picture at another pre-resize resolution gives other features
  x128 = np.repeat(np.repeat(x64, 2, axis=1), 2, axis=2)
  other = network(variables, np.asarray(inception.preprocess(x128)))[0]['pool']
  assert not np.allclose(other, got, rtol=1e-3, atol=1e-4)
  # an input already at 299 is fed as is
  x299, out, _ = run_299
  np.testing.assert_array_equal(features(variables, x299)['pool'], out['pool'])


def test_fid_pooling_quirks_in_the_network(weights, run_299):
  """Each block's pool branch (its last channels) against NumPy pooling of its input."""
  _, state = weights
  _, _, mixed = run_299
  cases = [('Mixed_5c', 'Mixed_5b', 64, 'avg_exclude_pad'),   # FID-InceptionA
           ('Mixed_6b', 'Mixed_6a', 192, 'avg_exclude_pad'),  # FID-InceptionC
           ('Mixed_7b', 'Mixed_7a', 192, 'avg_exclude_pad'),  # FID-InceptionE_1
           ('Mixed_7c', 'Mixed_7b', 192, 'max')]              # FID-InceptionE_2
  for block, source, channels, op in cases:
    got = mixed[block][..., -channels:]
    want = np_basic_conv(np_pool3(mixed[source], op), state, f'{block}.branch_pool')
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=block)
    other = 'avg_include_pad' if op != 'max' else 'avg_exclude_pad'
    wrong = np_basic_conv(np_pool3(mixed[source], other), state, f'{block}.branch_pool')
    assert not np.allclose(got, wrong, rtol=1e-4, atol=1e-4), block


def test_pool_and_logits_heads(weights, run_299):
  _, state = weights
  _, out, mixed = run_299
  pool = mixed['Mixed_7c'].mean(axis=(1, 2))
  np.testing.assert_allclose(out['pool'], pool, rtol=1e-5, atol=1e-6)
  logits = pool @ np.float64(state['fc.weight']).T + state['fc.bias']
  np.testing.assert_allclose(out['logits'], logits, rtol=1e-4, atol=1e-4)
