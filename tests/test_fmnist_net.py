"""The Fashion-MNIST feature network: accuracy, FID-FMNIST sanity, input shapes, cache, CLI."""
import os

import jax
import numpy as np
import pytest
import scipy.ndimage

from jaxgen.data import default_data_config, make_iterator
from jaxgen.errors import UserError
from jaxgen.metrics import fmnist_net, frechet

features = jax.jit(fmnist_net.fmnist_features)


def _images(cfg, split, n, batch=500):
  it = make_iterator(cfg, split, global_batch_size=batch, seed=0, train=False)
  batches = [next(it) for _ in range(n // batch)]
  return (np.concatenate([b['image'] for b in batches]),
          np.concatenate([b['label'] for b in batches]))


def _pool(variables, images, batch=500):
  return np.concatenate([np.asarray(features(variables, images[i:i + batch])['pool'])
                         for i in range(0, len(images), batch)])


def _fid(variables, reference, images):
  return frechet.frechet_distance(*frechet.gaussian_stats(reference),
                                  *frechet.gaussian_stats(_pool(variables, images)))


def _blur(images, sigma):
  return scipy.ndimage.gaussian_filter(images, sigma=(0, sigma, sigma, 0), mode='nearest')


@pytest.fixture(scope='module')
def real(fmnist_classifier):
  cfg = fmnist_classifier.data_config
  # 3000 each: FID's finite-sample bias (all of train vs test's FID) shrinks as 1/N.
  train_x, _ = _images(cfg, 'train', 3000)
  test_x, test_y = _images(cfg, 'test', 3000)
  return train_x, test_x, test_y


def test_accuracy_at_least_90_percent(fmnist_classifier, real):
  # Measured by the CLI on the whole test split (10k) and stored with the weights.
  assert fmnist_classifier.accuracy >= fmnist_net.MIN_ACCURACY
  assert f'test accuracy {fmnist_classifier.accuracy:.4f}' in fmnist_classifier.stdout
  # The stored weights are the ones that scored it.
  _, test_x, test_y = real
  pred = np.asarray(features(fmnist_classifier.variables, test_x[:1000])['logits']).argmax(-1)
  assert np.mean(pred == test_y[:1000]) >= 0.88


def test_fid_fmnist_orders_real_noise_and_blur(fmnist_classifier, real):
  v = fmnist_classifier.variables
  train_x, test_x, _ = real
  reference = _pool(v, train_x)
  rng = np.random.default_rng(0)
  noise = np.clip(rng.normal(size=test_x.shape), -1, 1).astype(np.float32)
  fid_real = _fid(v, reference, test_x)
  fid_noise = _fid(v, reference, noise)
  fid_blur = [_fid(v, reference, _blur(test_x, s)) for s in (0.5, 1.0, 1.5, 2.5)]
  print(f'FID-FMNIST ({fmnist_net.FEATURE_NET_NAME}): train vs test {fid_real:.3f}, '
        f'noise {fid_noise:.1f}, blur 0.5/1/1.5/2.5 ' + ' '.join(f'{f:.2f}' for f in fid_blur))
  assert fid_noise > 50 * fid_real  # ~130x measured; a broken network gives ~1-10x
  assert fid_real < fid_blur[0] < fid_blur[1] < fid_blur[2] < fid_blur[3] < fid_noise


def test_features_of_other_shapes(fmnist_classifier, real):
  v = fmnist_classifier.variables
  _, test_x, test_y = real
  x = test_x[:500]
  out = features(v, x)
  assert out['pool'].shape == (500, 128) and out['pool'].dtype == np.float32
  assert out['logits'].shape == (500, 10)
  # 28x28 is padded exactly as the data pipeline pads; RGB is averaged to grayscale.
  np.testing.assert_array_equal(features(v, x[:, 2:30, 2:30])['pool'], out['pool'])
  np.testing.assert_allclose(features(v, np.repeat(x, 3, -1))['pool'], out['pool'], atol=1e-5)
  # Larger RGB images are resized to 32 and still classified.
  big = np.repeat(np.repeat(np.repeat(x, 2, 1), 2, 2), 3, -1)
  assert np.mean(np.asarray(features(v, big)['logits']).argmax(-1) == test_y[:500]) >= 0.85
  for shape in [(2, 16, 16, 1), (2, 32, 30, 1), (2, 32, 32, 2), (32, 32, 1)]:
    with pytest.raises(UserError, match='square'):
      fmnist_net.fmnist_features(v, np.zeros(shape, np.float32))


def test_cache_round_trip(fmnist_classifier, real, tmp_path):
  cfg = default_data_config()
  cfg.data_dir = str(tmp_path)
  path = fmnist_net.save_classifier(cfg, fmnist_classifier.variables, 0.9123)
  assert path == os.path.join(str(tmp_path), 'feature_nets', 'fmnist_classifier_v1.msgpack')
  assert os.listdir(os.path.dirname(path)) == ['fmnist_classifier_v1.msgpack']  # no temp left
  loaded = fmnist_net.load_classifier(cfg)
  x = real[1][:500]
  for key, value in features(loaded, x).items():
    np.testing.assert_array_equal(value, features(fmnist_classifier.variables, x)[key])
  assert fmnist_net.read_classifier_file(path)[1] == pytest.approx(0.9123)
  assert jax.tree.structure(fmnist_net.ensure_classifier(cfg)) == jax.tree.structure(loaded)


def test_missing_file_names_the_command(tmp_path):
  cfg = default_data_config()
  cfg.data_dir = str(tmp_path)
  for load in (fmnist_net.load_classifier, fmnist_net.ensure_classifier):
    with pytest.raises(UserError) as e:
      load(cfg)
    msg = str(e.value)
    assert '\n' not in msg and fmnist_net.classifier_path(cfg) in msg
    assert f'python -m jaxgen.metrics.fmnist_net --data_dir={tmp_path}' in msg


@pytest.mark.parametrize('content', [b'not msgpack at all', 'truncated', 'version'])
def test_corrupt_file_is_a_user_error(fmnist_classifier, tmp_path, content):
  cfg = default_data_config()
  cfg.data_dir = str(tmp_path)
  path = fmnist_net.save_classifier(cfg, fmnist_classifier.variables, 0.91)
  blob = open(path, 'rb').read()
  if content == 'truncated':
    content = blob[:len(blob) // 2]
  elif content == 'version':
    content = blob.replace(b'format_version\x01', b'format_version\x07')
    assert content != blob
  with open(path, 'wb') as f:
    f.write(content)
  with pytest.raises(UserError, match='unreadable') as e:
    fmnist_net.load_classifier(cfg)
  assert '\n' not in str(e.value)


def test_cli_fails_below_90_percent_and_saves_nothing(fmnist_classifier, tmp_path, monkeypatch,
                                                      capsys):
  monkeypatch.setattr(fmnist_net, 'train_classifier',
                      lambda cfg, **kw: (fmnist_classifier.variables, 0.5))
  monkeypatch.setattr('jaxgen.data.pipeline.prepare_dataset', lambda cfg: None)
  with pytest.raises(SystemExit) as e:
    fmnist_net.main([f'--data_dir={tmp_path}', '--steps=10'])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('jaxgen: error: ') and '50.00%' in err and '\n' not in err
  assert not os.path.exists(os.path.join(str(tmp_path), 'feature_nets'))


@pytest.mark.parametrize('size,channels,features,k', [(32, 1, 16, 5), (8, 32, 64, 3), (7, 3, 4, 3)])
def test_strided_conv_is_a_stride_2_same_conv(size, channels, features, k):
  """The classifier's patch-matmul convolution: nn.Conv's parameters, values and function."""
  import flax.linen as nn
  from jaxgen.models.fmnist_classifier import StridedConv
  x = np.random.default_rng(0).normal(size=(2, size, size, channels)).astype(np.float32)
  ours, conv = StridedConv(features, k), nn.Conv(features, (k, k), strides=(2, 2))
  params = ours.init(jax.random.key(0), x)
  reference = conv.init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, params, reference)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too
  np.testing.assert_allclose(ours.apply(params, x), conv.apply(params, x), rtol=1e-5, atol=1e-5)
