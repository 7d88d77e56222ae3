"""The perceptual-distance interface and its offline default, 'fmnist_classifier'."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from jaxgen.data import make_iterator
from jaxgen.errors import UserError
from jaxgen.metrics.perceptual import Perceptual, make_perceptual, perceptual_names


@pytest.fixture(scope='module')
def perceptual(fmnist_classifier, data_dir):
  return make_perceptual('fmnist_classifier', data_dir=data_dir)  # Reads the CLI's cache file.


@pytest.fixture(scope='module')
def images(fmnist_classifier):
  it = make_iterator(fmnist_classifier.data_config, 'test', global_batch_size=64, seed=0,
                     train=False)
  return next(it)['image']


def test_identity_symmetry_and_jit(perceptual, images):
  x, y = images[:32], images[32:]
  assert isinstance(perceptual, Perceptual) and perceptual.name == 'fmnist_classifier'
  d = perceptual.distance(x, y)
  assert d.shape == (32,) and d.dtype == jnp.float32 and np.all(np.asarray(d) > 0)
  np.testing.assert_array_equal(perceptual.distance(x, x), np.zeros(32))
  np.testing.assert_array_equal(perceptual.distance(y, x), d)
  # A pytree whose leaves are the weights: it goes into a jitted loss as an argument.
  jitted = jax.jit(lambda p, a, b: p.distance(a, b))(perceptual, x, y)
  np.testing.assert_allclose(jitted, d, rtol=1e-5, atol=1e-7)
  grad = jax.grad(lambda a: perceptual.distance(a, y).mean())(x)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  maps = perceptual.features(x)
  assert [m.shape for m in maps] == [(32, 16, 16, 16), (32, 8, 8, 32), (32, 4, 4, 64)]


def test_grows_with_blur_and_noise(perceptual, images):
  x = np.asarray(images)
  blur = [float(perceptual.distance(x, scipy.ndimage.gaussian_filter(
      x, sigma=(0, s, s, 0), mode='nearest')).mean()) for s in (0.5, 1.0, 1.5, 2.5)]
  noise = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
  noisy = [float(perceptual.distance(x, np.clip(x + s * noise, -1, 1)).mean())
           for s in (0.05, 0.1, 0.2, 0.4)]
  assert 0 < blur[0] < blur[1] < blur[2] < blur[3], blur
  assert 0 < noisy[0] < noisy[1] < noisy[2] < noisy[3], noisy


def test_weights_from_variables_or_path(fmnist_classifier, perceptual, images, tmp_path):
  x, y = images[:8], images[8:16]
  direct = make_perceptual('fmnist_classifier', variables=fmnist_classifier.variables)
  np.testing.assert_array_equal(direct.distance(x, y), perceptual.distance(x, y))
  with pytest.raises(UserError, match='python -m jaxgen.metrics.fmnist_net'):
    make_perceptual('fmnist_classifier', data_dir=str(tmp_path))
  with pytest.raises(UserError, match='one shape'):
    perceptual.distance(x, y[:4])


def test_registry_errors():
  assert {'fmnist_classifier', 'lpips_vgg16'} <= set(perceptual_names())
  with pytest.raises(UserError, match="unknown perceptual distance 'vgg'.*fmnist_classifier, "
                     'lpips_vgg16'):
    make_perceptual('vgg')
  with pytest.raises(UserError, match='vgg_path='):
    make_perceptual('lpips_vgg16')
  with pytest.raises(UserError, match='takes the arguments vgg_path, lin_path; got weights'):
    make_perceptual('lpips_vgg16', weights='x.pth')
