"""The offline Fashion-MNIST feature network: training, the cached weights, and its features.

FID needs a feature network; the standard one (Inception) is not available offline, so jaxgen
trains a small classifier on Fashion-MNIST once (~91% test accuracy; about two minutes on 2 CPU
cores, half of it reading the data through the pipeline) and caches it at
`<data_dir>/feature_nets/fmnist_classifier_v1.msgpack`. Its penultimate features give
"FID-FMNIST (fmnist_classifier_v1)" through the same code path as Inception's.

  python -m jaxgen.metrics.fmnist_net [--data_dir DIR] [--steps N]
"""
import argparse
import os
import sys
import tempfile
import time

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxgen.errors import UserError
from jaxgen.models.fmnist_classifier import FmnistClassifier

FEATURE_NET_NAME = 'fmnist_classifier_v1'
FORMAT_VERSION = 1
MIN_ACCURACY = 0.90
DEFAULT_STEPS = 2400  # ~2.6 epochs of batch 64
DEFAULT_BATCH_SIZE = 64


def _model():
  return FmnistClassifier()


def _train_command(data_dir):
  return f'python -m jaxgen.metrics.fmnist_net --data_dir={data_dir}'


def _fmnist_config(data_config) -> ml_collections.ConfigDict:
  """Fashion-MNIST at 32x32x1 in the caller's data directory, whatever the caller trains on."""
  from jaxgen.data import default_data_config
  cfg = default_data_config()
  cfg.data_dir = os.path.expanduser(os.fspath(data_config.data_dir))
  for key in ('num_threads', 'prefetch'):
    if key in data_config:
      cfg[key] = data_config[key]
  if data_config.get('name') == 'fashion_mnist' and data_config.get('manual_dir'):
    cfg.manual_dir = data_config.manual_dir
  return cfg


def classifier_path(data_config) -> str:
  data_dir = os.path.expanduser(os.fspath(data_config.data_dir))
  return os.path.join(data_dir, 'feature_nets', FEATURE_NET_NAME + '.msgpack')


def fmnist_features(variables, images):
  """[B, S, S, 1|3] images in [-1, 1] -> {'pool': [B, 128], 'logits': [B, 10]} f32 (jittable)."""
  out = _model().apply(variables, images)
  return {'pool': out['pool'], 'logits': out['logits']}


def fmnist_taps(variables, images):
  """The per-stage activations [B, H, W, C] (16, 8 and 4 pixels), for perceptual distances."""
  return _model().apply(variables, images)['taps']


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------
def _train_step(tx):
  model = _model()

  def loss_fn(params, images, labels):
    logits = model.apply({'params': params}, images)['logits']
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), 0.1)
    return optax.softmax_cross_entropy(logits, targets).mean()

  @jax.jit
  def step(params, opt_state, images, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def _batches(data_config, steps, batch_size, seed):
  """`steps` training batches from the train split held in memory, a fresh permutation per epoch."""
  from jaxgen.data import load_split
  train = load_split(data_config, 'train')
  n = len(train['label'])
  rng = np.random.default_rng(seed)
  order = rng.permutation(n)
  for i in range(steps):
    start = (i * batch_size) % n
    if start + batch_size > n:
      order, start = rng.permutation(n), 0
    idx = order[start:start + batch_size]
    yield train['image'][idx], train['label'][idx]


def train_classifier(data_config, *, steps=DEFAULT_STEPS, batch_size=DEFAULT_BATCH_SIZE, seed=0,
                     learning_rate=3e-3, log_every=0):
  """Trains the classifier on Fashion-MNIST's train split; returns (variables, test accuracy).

  Only `data_config.data_dir` (and the reader settings) are used: the network always trains on
  Fashion-MNIST at 32x32x1.
  """
  if steps <= 0 or batch_size <= 0:
    raise UserError(f'train_classifier: steps={steps} and batch_size={batch_size} must be '
                    f'positive; use e.g. --steps={DEFAULT_STEPS}')
  cfg = _fmnist_config(data_config)
  # Jitted: initialised op by op, the truncated normals alone compiled for ~6 s.
  params = jax.jit(_model().init)(jax.random.key(seed), jnp.zeros((1, 32, 32, 1)))['params']
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, min(100, steps // 10), steps, learning_rate * 0.01)
  tx = optax.adamw(schedule, weight_decay=1e-4)
  opt_state = tx.init(params)
  step = _train_step(tx)
  start = time.time()
  for i, (images, labels) in enumerate(_batches(cfg, steps, batch_size, seed)):
    params, opt_state, loss = step(params, opt_state, images, labels)
    if log_every and (i + 1) % log_every == 0:
      print(f'step {i + 1}/{steps}: loss {float(loss):.4f} ({time.time() - start:.0f}s)',
            flush=True)
  variables = {'params': params}
  return variables, evaluate_accuracy(variables, cfg)


def evaluate_accuracy(variables, data_config, *, batch_size=1000) -> float:
  """Top-1 accuracy on the whole Fashion-MNIST test split."""
  from jaxgen.data import load_split
  test = load_split(_fmnist_config(data_config), 'test')
  predict = jax.jit(lambda v, x: jnp.argmax(fmnist_features(v, x)['logits'], -1))
  pred = np.concatenate([np.asarray(predict(variables, test['image'][i:i + batch_size]))
                         for i in range(0, len(test['label']), batch_size)])
  return float(np.mean(pred == test['label']))


# ----------------------------------------------------------------------------
# The cache file
# ----------------------------------------------------------------------------
def save_classifier(data_config, variables, test_accuracy) -> str:
  """Writes the weights, their test accuracy and the format version atomically; returns the path."""
  path = classifier_path(data_config)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  blob = flax.serialization.msgpack_serialize({
      'format_version': FORMAT_VERSION, 'name': FEATURE_NET_NAME,
      'test_accuracy': float(test_accuracy),
      'variables': jax.tree.map(np.asarray, jax.device_get(variables))})
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.tmp_')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(blob)
    os.replace(tmp, path)  # Readers see the old file or the new one, never half of one.
  except BaseException:
    os.unlink(tmp)
    raise
  return path


def _corrupt(path, why):
  return UserError(f'Fashion-MNIST feature network at {path} is unreadable ({why}); delete it and '
                   f'retrain with `{_train_command(os.path.dirname(os.path.dirname(path)))}`')


def _shapes(tree):
  return [f'{tuple(a.shape)} {np.dtype(a.dtype)}' for a in jax.tree.leaves(tree)]


def read_classifier_file(path):
  """(variables, test_accuracy) stored at `path`; UserError when missing or corrupt."""
  if not os.path.isfile(path):
    command = _train_command(os.path.dirname(os.path.dirname(path)))
    raise UserError(f'Fashion-MNIST feature network not found at {path}; train it once with '
                    f'`{command}` (about two minutes)')
  try:
    with open(path, 'rb') as f:
      state = flax.serialization.msgpack_restore(f.read())
  except Exception as e:  # noqa: BLE001 — any undecodable file is the same problem.
    raise _corrupt(path, f'{type(e).__name__}') from e
  if not isinstance(state, dict) or state.get('format_version') != FORMAT_VERSION:
    version = state.get('format_version') if isinstance(state, dict) else None
    raise _corrupt(path, f'format version {version!r}, expected {FORMAT_VERSION}')
  template = jax.eval_shape(_model().init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  variables = state.get('variables')
  try:
    ok = jax.tree.structure(variables) == jax.tree.structure(template) and \
        _shapes(variables) == _shapes(template)
  except Exception:  # noqa: BLE001 — leaves that are not arrays.
    ok = False
  if not ok:
    raise _corrupt(path, 'its parameters do not match the network')
  return jax.tree.map(jnp.asarray, variables), float(state.get('test_accuracy', float('nan')))


def load_classifier(data_config):
  """The cached classifier's variables; UserError (naming the training command) when missing."""
  return read_classifier_file(classifier_path(data_config))[0]


def ensure_classifier(data_config, train_if_missing=False, **train_kwargs):
  """Loads the cached classifier, or (train_if_missing) trains, checks and caches it first."""
  path = classifier_path(data_config)
  if not os.path.exists(path) and train_if_missing:
    variables, accuracy = train_classifier(data_config, **train_kwargs)
    _check_accuracy(accuracy)
    save_classifier(data_config, variables, accuracy)
  return load_classifier(data_config)


def _check_accuracy(accuracy):
  if accuracy < MIN_ACCURACY:
    raise UserError(f'the Fashion-MNIST feature network reached only {accuracy:.2%} test '
                    f'accuracy (< {MIN_ACCURACY:.0%}); train longer, e.g. --steps=3000')


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m jaxgen.metrics.fmnist_net',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', default=None,
                      help='dataset directory (default: $JAXGEN_DATA_DIR or ~/.cache/jaxgen/tfds)')
  parser.add_argument('--steps', type=int, default=DEFAULT_STEPS)
  parser.add_argument('--batch_size', type=int, default=DEFAULT_BATCH_SIZE)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--if_missing', action='store_true',
                      help='do nothing when a trained network is already cached')
  args = parser.parse_args(argv)
  from jaxgen.data import DatasetNotFoundError, default_data_config, prepare_dataset
  cfg = default_data_config()
  if args.data_dir:
    cfg.data_dir = os.path.expanduser(args.data_dir)
  if args.if_missing and os.path.exists(classifier_path(cfg)):
    print(f'using the cached {classifier_path(cfg)}')
    return
  try:
    prepare_dataset(cfg)
    start = time.time()
    variables, accuracy = train_classifier(cfg, steps=args.steps, batch_size=args.batch_size,
                                           seed=args.seed, log_every=max(args.steps // 6, 1))
    print(f'test accuracy {accuracy:.4f} after {args.steps} steps ({time.time() - start:.0f}s)',
          flush=True)
    _check_accuracy(accuracy)
    print(f'saved {save_classifier(cfg, variables, accuracy)}')
  except (UserError, DatasetNotFoundError) as e:
    print(f'jaxgen: error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()
