"""Tests for jaxgen.data: Fashion-MNIST built with TFDS (no TensorFlow) and read with grain."""
import collections
import gzip
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxgen.data import DatasetNotFoundError, make_iterator, num_examples, prepare_dataset
from jaxgen.data.fashion_mnist import JaxgenFashionMnist
from jaxgen.data.pipeline import default_data_config

RAW = '/usr/share/datasets/fashion-mnist'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_raw = pytest.mark.skipif(
    not os.path.isfile(os.path.join(RAW, 't10k-labels-idx1-ubyte.gz')),
    reason='apt-get install -y dataset-fashion-mnist')

# Run in a child process: marks each real build, so the test can count builds.
_PREPARE_SCRIPT = """
import sys
from jaxgen.data import fashion_mnist, pipeline
orig = fashion_mnist.JaxgenFashionMnist._download_and_prepare
def marked(self, *a, **k):
  print('JAXGEN_BUILT', flush=True)
  return orig(self, *a, **k)
fashion_mnist.JaxgenFashionMnist._download_and_prepare = marked
cfg = pipeline.default_data_config()
cfg.data_dir = sys.argv[1]
pipeline.prepare_dataset(cfg)
"""


def _cfg(data_dir, **overrides):
  cfg = default_data_config()
  cfg.data_dir = str(data_dir)
  cfg.update(overrides)
  return cfg


def _read_idx(name):
  """Independent reference parser: big-endian header (magic, dims), then raw uint8 data."""
  with gzip.open(os.path.join(RAW, name), 'rb') as f:
    raw = f.read()
  ndim = raw[3]
  dims = np.frombuffer(raw, '>u4', count=ndim, offset=4)
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _multiset(batch):
  return collections.Counter(
      (int(label), hashlib.sha1(image.tobytes()).hexdigest())
      for label, image in zip(batch['label'], batch['image']))


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """Prepares into a fresh dir from two concurrent processes, as multi-process training does."""
  data_dir = tmp_path_factory.mktemp('tfds')
  pythonpath = os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')]))
  env = dict(os.environ, PYTHONPATH=pythonpath)
  cmd = [sys.executable, '-c', _PREPARE_SCRIPT, str(data_dir)]
  procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for _ in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  return _cfg(data_dir), [(p.returncode, out) for p, out in zip(procs, outputs)]


@pytest.fixture(scope='module')
def cfg(prepared):
  return prepared[0]


@needs_raw
def test_concurrent_prepare_builds_once(prepared):
  cfg, results = prepared
  for rc, out in results:
    assert rc == 0, out[-2000:]
  assert sum(out.count('JAXGEN_BUILT') for _, out in results) == 1
  assert os.path.isdir(os.path.join(cfg.data_dir, 'jaxgen_fashion_mnist',
                                      str(JaxgenFashionMnist.VERSION)))
  prepare_dataset(cfg)  # Already prepared: a no-op, must not raise.


@needs_raw
def test_split_sizes(cfg):
  assert num_examples(cfg, 'train') == 60000
  assert num_examples(cfg, 'test') == 10000


@needs_raw
def test_batch_shapes_dtypes_range_and_padding(cfg):
  batch = next(make_iterator(cfg, 'train', global_batch_size=16, seed=0))
  image, label = batch['image'], batch['label']
  assert image.shape == (16, 32, 32, 1) and image.dtype == np.float32
  assert label.shape == (16,) and label.dtype == np.int32
  assert image.min() >= -1.0 and image.max() <= 1.0
  assert image.max() > 0.5  # Real content, not all background.
  border = np.ones((32, 32), bool)
  border[2:30, 2:30] = False
  assert np.all(image[:, border, :] == -1.0)
  assert np.all((label >= 0) & (label <= 9))


@needs_raw
def test_test_split_matches_idx_files(cfg):
  labels = _read_idx('t10k-labels-idx1-ubyte.gz')
  images = _read_idx('t10k-images-idx3-ubyte.gz')
  it = make_iterator(cfg, 'test', global_batch_size=64, seed=0, train=False)
  for step in range(2):
    batch = next(it)
    ref = slice(64 * step, 64 * (step + 1))
    np.testing.assert_array_equal(batch['label'], labels[ref])
    interior = batch['image'][:, 2:30, 2:30, 0]
    np.testing.assert_allclose(interior, images[ref] / 127.5 - 1.0, atol=1e-6)


@needs_raw
def test_process_shards_concatenate_to_global_batch(cfg):
  cfg = _cfg(cfg.data_dir, flip=True)  # Flips too must not depend on the process layout.
  kw = dict(global_batch_size=8, seed=3)
  single = make_iterator(cfg, 'train', **kw)
  shards = [make_iterator(cfg, 'train', process_index=p, process_count=2, **kw) for p in range(2)]
  seen = []
  for _ in range(2):
    expected = next(single)
    local = [next(it) for it in shards]
    assert all(b['image'].shape[0] == 4 for b in local)
    # Row for row, in process order: multi-process training sees the same global array.
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), expected[key])
    seen.append(_multiset(expected))
  assert seen[0] != seen[1]


@needs_raw
def test_get_state_set_state_resumes_identically(cfg):
  cfg = _cfg(cfg.data_dir, flip=True)
  it = make_iterator(cfg, 'train', global_batch_size=8, seed=7)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  resumed = make_iterator(cfg, 'train', global_batch_size=8, seed=7)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got['image'], want['image'])
    np.testing.assert_array_equal(got['label'], want['label'])
  # A different seed gives a different stream, so the equality above is not trivial.
  first = next(make_iterator(cfg, 'train', global_batch_size=8, seed=7))
  other = next(make_iterator(cfg, 'train', global_batch_size=8, seed=8))
  assert not np.array_equal(first['image'], other['image'])


def test_missing_manual_dir_raises_with_install_hint(tmp_path):
  cfg = _cfg(tmp_path / 'tfds', manual_dir=str(tmp_path / 'no-such-dir'))
  with pytest.raises(DatasetNotFoundError, match='apt-get install') as err:
    make_iterator(cfg, 'train', global_batch_size=8, seed=0)
  assert '\n' not in str(err.value)
  assert str(tmp_path / 'no-such-dir') in str(err.value)


def test_non_divisible_global_batch_raises(tmp_path):
  with pytest.raises(ValueError, match='divisible'):
    make_iterator(_cfg(tmp_path), 'train', global_batch_size=10, seed=0, process_count=3)


def test_load_split_equals_the_iterator(cfg):
  from jaxgen.data import load_split
  arrays = load_split(cfg, 'test', limit=100)
  assert arrays['image'].shape == (100, 32, 32, 1) and arrays['label'].dtype == np.int32
  it = make_iterator(cfg, 'test', global_batch_size=50, seed=0, train=False)
  for step in range(2):
    batch = next(it)
    np.testing.assert_array_equal(arrays['image'][50 * step:50 * (step + 1)], batch['image'])
    np.testing.assert_array_equal(arrays['label'][50 * step:50 * (step + 1)], batch['label'])
