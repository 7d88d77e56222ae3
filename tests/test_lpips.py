"""LPIPS (VGG16): metric properties, the head formula and the whole distance against NumPy
float64 references, and weight loading/validation. Random backbone weights; the real lpips
package is compared by scripts/check_inception_against_torch.py."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxgen import torch_weights
from jaxgen.errors import UserError
from jaxgen.models import lpips

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_states(seed=0):
  """(torchvision-vgg16-like state, lpips lin state) with torch key names and layouts."""
  rng = np.random.default_rng(seed)
  vgg, lin = {}, {}
  for key, shape in lpips.expected_state_dict_shapes().items():
    if key.startswith('lin'):
      lin[key] = rng.uniform(0, 0.5, shape).astype(np.float32)  # LPIPS heads are >= 0
    elif key.endswith('weight'):
      vgg[key] = rng.normal(0, np.sqrt(2 / np.prod(shape[1:])), shape).astype(np.float32)
    else:
      vgg[key] = rng.normal(0, 0.1, shape).astype(np.float32)
  vgg['classifier.6.bias'] = np.zeros(1000, np.float32)  # torchvision's extra keys are ignored
  return vgg, lin


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  d = tmp_path_factory.mktemp('lpips')
  vgg, lin = random_states()
  paths = str(d / 'vgg16.pth'), str(d / 'vgg.pth')
  torch_weights.save_state_dict_torch_format(vgg, paths[0])
  torch_weights.save_state_dict_torch_format(lin, paths[1])
  return paths, {**vgg, **lin}


@pytest.fixture(scope='module')
def variables(weights):
  return lpips.load_lpips(*weights[0])


@pytest.fixture(scope='module')
def distance():
  return jax.jit(lpips.lpips_distance)


def images(shape, seed):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


# ----------------------------------------------------------------------------
# NumPy float64 references
# ----------------------------------------------------------------------------
def np_head(feats_x, feats_y, lin):
  total = 0.
  for fx, fy, w in zip(feats_x, feats_y, lin):
    nx = fx / (np.sqrt((fx ** 2).sum(-1, keepdims=True)) + 1e-10)
    ny = fy / (np.sqrt((fy ** 2).sum(-1, keepdims=True)) + 1e-10)
    total = total + ((nx - ny) ** 2 * w).sum(-1).mean(axis=(1, 2))
  return total


def np_vgg_taps(x, state):
  x = (np.float64(x) - [-.030, -.088, -.188]) / [.458, .448, .450]
  taps = []
  for block, indices in enumerate(((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))):
    if block:  # 2x2 max pool, odd rows/columns dropped
      h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
      x = x[:, :h, :w].reshape(x.shape[0], h // 2, 2, w // 2, 2, -1).max(axis=(2, 4))
    for i in indices:
      wt, b = np.float64(state[f'features.{i}.weight']), np.float64(state[f'features.{i}.bias'])
      p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      h, w = x.shape[1:3]
      x = sum(np.einsum('bhwi,oi->bhwo', p[:, a:a + h, c:c + w], wt[:, :, a, c])
              for a in range(3) for c in range(3)) + b
      x = np.maximum(x, 0)
    taps.append(x)
  return taps


# ----------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------
def test_head_matches_numpy():
  rng = np.random.default_rng(0)
  shapes = [(2, 6, 5, 4), (2, 3, 2, 8), (2, 1, 1, 3)]
  fx = [rng.normal(size=s) for s in shapes]
  fy = [rng.normal(size=s) for s in shapes]
  fx[0][0, 0, 0] = 0.  # an all-zero feature vector: eps keeps it finite
  lin = [rng.uniform(0, 1, s[-1]) for s in shapes]
  got = lpips.lpips_head([np.float32(f) for f in fx], [np.float32(f) for f in fy],
                         [np.float32(w) for w in lin])
  assert got.shape == (2,)
  np.testing.assert_allclose(got, np_head(fx, fy, lin), rtol=1e-5)


def test_distance_matches_numpy(weights, variables, distance):
  _, state = weights
  # 28x36: odd sizes at the pools (36 -> 18 -> 9 -> 4, 28 -> 14 -> 7 -> 3)
  x, y = images((2, 28, 36, 3), 1), images((2, 28, 36, 3), 2)
  lin = [np.float64(state[f'lin{k}.model.1.weight']).reshape(-1) for k in range(5)]
  want = np_head(np_vgg_taps(x, state), np_vgg_taps(y, state), lin)
  np.testing.assert_allclose(distance(variables, x, y), want, rtol=1e-4)


def test_metric_properties(variables, distance):
  x, y = images((3, 28, 28, 3), 3), images((3, 28, 28, 3), 4)
  dxy, dyx, dxx = distance(variables, x, y), distance(variables, y, x), distance(variables, x, x)
  assert dxy.shape == (3,) and dxy.dtype == np.float32
  np.testing.assert_array_equal(dxx, 0.)
  np.testing.assert_allclose(dxy, dyx, rtol=1e-6)
  assert np.all(dxy > 1e-3)
  # a small perturbation is closer than an unrelated image
  near = distance(variables, x, np.clip(x + 0.05 * images(x.shape, 5), -1, 1))
  assert np.all(near < dxy)


def test_grayscale_is_replicated():
  gray = images((2, 16, 16, 1), 6)
  a = lpips.preprocess(gray)
  assert a.shape == (2, 16, 16, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, lpips.preprocess(np.repeat(gray, 3, axis=-1)))


def test_bad_inputs(variables):
  with pytest.raises(UserError, match='at least 16x16'):
    lpips.lpips_distance(variables, np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))
  with pytest.raises(UserError, match='one shape'):
    lpips.lpips_distance(variables, np.zeros((1, 16, 16, 3)), np.zeros((2, 16, 16, 3)))


def test_loader_validates(weights, tmp_path):
  (vgg_path, lin_path), state = weights
  with pytest.raises(UserError) as e:
    lpips.load_lpips(vgg_path)  # the lin heads are in the other file
  assert str(e.value).startswith(f'LPIPS weights {vgg_path}: 5 keys missing (lin0.model.1.weight, '
                                 'lin1.model.1.weight, lin2.model.1.weight, ...); pass the')
  bad = {k: v for k, v in state.items() if k.startswith('lin')}
  bad['lin3.model.1.weight'] = np.zeros((1, 256, 1, 1), np.float32)
  torch_weights.save_state_dict_torch_format(bad, str(tmp_path / 'bad_lin.pth'))
  with pytest.raises(UserError, match=r'1 mis-shaped \(lin3.model.1.weight: \(1, 256, 1, 1\) '
                                      r'!= \(1, 512, 1, 1\)\)'):
    lpips.load_lpips(vgg_path, str(tmp_path / 'bad_lin.pth'))


def test_converted_npz_holds_both(weights, variables, tmp_path):
  (vgg_path, lin_path), _ = weights
  out = str(tmp_path / 'lpips.npz')
  subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'convert_torch_weights.py'),
                  'lpips', vgg_path, '--lin', lin_path, '--out', out], check=True,
                 capture_output=True)
  with np.load(out) as f:
    assert sorted(f.files) == sorted(lpips.expected_state_dict_shapes())  # no classifier
  jax.tree_util.tree_map(np.testing.assert_array_equal, lpips.load_lpips(out), variables)
