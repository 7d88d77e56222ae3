"""Sample-based evaluation (jaxgen/evaluation.py): sharded == single device, caching, errors."""
import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import run_cli
from jaxgen import evaluation, trainer
from jaxgen.errors import UserError
from jaxgen.models.fmnist_classifier import FmnistClassifier


def random_feature_net():
  """The FID-FMNIST network's architecture with random weights: enough to compare code paths."""
  model = FmnistClassifier()
  variables = model.init(jax.random.PRNGKey(1), np.zeros((1, 32, 32, 1), np.float32))

  def apply(v, images):
    out = model.apply(v, images)
    return {'pool': out['pool'], 'logits': out['logits']}
  return evaluation.FeatureNet('random_fmnist_cnn', variables, apply)


def eval_config(tiny_config):
  cfg = tiny_config()
  cfg.eval.update(metrics='fid,is,pr', num_samples=40, num_real=48, batch_size=16, is_splits=2)
  return cfg


def test_sample_metrics_sharded_equal_single_device(tiny_config, data_dir):
  cfg, net = eval_config(tiny_config), random_feature_net()
  results = {}
  for n in (8, 1):
    shutil.rmtree(os.path.join(data_dir, 'fid_stats'), ignore_errors=True)
    exp = trainer.Experiment(cfg, workdir=None, devices=jax.devices()[:n])
    assert exp.mesh.size == n
    params = exp.init_state().ema_params
    results[n] = evaluation.sample_metrics(exp, params, net=net)
  tag = '[random_fmnist_cnn]'
  assert set(results[8]) == {f'eval/{m}{tag}' for m in ('fid', 'is', 'is_std', 'precision',
                                                       'recall')}
  assert results[8][f'eval/fid{tag}'] > 0
  for key, value in results[8].items():
    np.testing.assert_allclose(value, results[1][key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_real_features_are_cached_per_network(tiny_config, data_dir):
  cfg, net = eval_config(tiny_config), random_feature_net()
  shutil.rmtree(os.path.join(data_dir, 'fid_stats'), ignore_errors=True)
  exp = trainer.Experiment(cfg, workdir=None)
  extractor = evaluation.Extractor(net, exp.mesh)
  first = evaluation.real_features(exp, extractor, 'test', 24, 16)
  files = glob.glob(os.path.join(data_dir, 'fid_stats', '*.npz'))
  assert len(files) == 1 and 'random_fmnist_cnn' in files[0]
  assert first['pool'].shape == (24, 128) and first['logits'].shape == (24, 10)
  again = evaluation.real_features(exp, extractor, 'test', 24, 16)  # from the cache
  np.testing.assert_array_equal(first['pool'], again['pool'])
  # Other weights under the same name get their own file, not the stale features.
  other = evaluation.FeatureNet(net.name, jax.tree.map(lambda x: x * 1.5, net.variables),
                                net.apply)
  evaluation.real_features(exp, evaluation.Extractor(other, exp.mesh), 'test', 24, 16)
  assert len(glob.glob(os.path.join(data_dir, 'fid_stats', '*.npz'))) == 2
  with open(files[0], 'wb') as f:
    f.write(b'not an npz')
  with pytest.raises(UserError, match='delete the file'):
    evaluation.real_features(exp, extractor, 'test', 24, 16)


def test_bad_eval_configs_fail_fast(tiny_config):
  cfg = tiny_config()
  cfg.eval.metrics = 'loss,fdi'
  with pytest.raises(UserError, match="unknown eval metric 'fdi'"):
    trainer.Experiment(cfg, workdir=None)
  cfg.eval.update(metrics='fid', feature_net='inception')
  with pytest.raises(UserError, match='inception_path'):
    trainer.Experiment(cfg, workdir=None)


def test_cli_rejects_inception_without_weights(data_dir, tmp_path):
  r = run_cli('--config=configs/dit.py:tiny', f'--workdir={tmp_path}', '--mode=eval',
              '--config.eval.metrics=fid', '--config.eval.feature_net=inception')
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith('jaxgen: error: ')
  assert 'inception_path' in r.stderr


def test_cli_eval_writes_labelled_fid(fmnist_classifier, tmp_path):
  work = str(tmp_path / 'run')
  r = run_cli('--config=configs/dit.py:tiny', f'--workdir={work}', '--config.total_steps=2')
  assert r.returncode == 0, r.stderr[-2000:]
  r = run_cli('--config=configs/dit.py:tiny', f'--workdir={work}', '--mode=eval',
              '--config.eval.metrics=loss,fid,is,pr', '--config.eval.num_samples=32',
              '--config.eval.num_real=64', '--config.eval.batch_size=16')
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.load(open(os.path.join(work, 'eval_0000002.json')))
  tag = '[fmnist_classifier_v1]'
  for name in ('fid', 'is', 'precision', 'recall'):
    assert np.isfinite(out[f'eval/{name}{tag}']), name
  assert out[f'eval/fid{tag}'] > 1.0  # two steps of training: far from the data
  assert 'eval/loss' in out and out['eval_config']['num_samples'] == 32
  assert glob.glob(os.path.join(work, 'events.out.tfevents.*'))


def test_real_stats_are_streamed_and_a_reference_file_replaces_them(tiny_config, data_dir,
                                                                   tmp_path):
  from jaxgen.metrics import frechet
  cfg, net = eval_config(tiny_config), random_feature_net()
  shutil.rmtree(os.path.join(data_dir, 'fid_stats'), ignore_errors=True)
  exp = trainer.Experiment(cfg, workdir=None)
  extractor = evaluation.Extractor(net, exp.mesh)
  mu, sigma = evaluation.real_stats(exp, extractor, 'test', 40, 16)  # 40: a partial last batch
  feats = evaluation.real_features(exp, extractor, 'test', 40, 16)
  np.testing.assert_allclose(mu, feats['pool'].mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sigma, np.cov(feats['pool'], rowvar=False), rtol=1e-4, atol=1e-7)
  assert len(glob.glob(os.path.join(data_dir, 'fid_stats', '*_stats.npz'))) == 1

  cfg.eval.update(metrics='fid', num_real=40)
  params = exp.init_state().ema_params
  tag = '[random_fmnist_cnn]'
  computed = evaluation.sample_metrics(exp, params, net=net)[f'eval/fid{tag}']
  same, shifted = str(tmp_path / 'same.npz'), str(tmp_path / 'shifted.npz')
  frechet.save_stats(same, mu, sigma)
  frechet.save_stats(shifted, mu + 1.0, sigma)
  cfg.eval.reference_stats = same
  assert evaluation.sample_metrics(exp, params, net=net)[f'eval/fid{tag}'] == pytest.approx(
      computed, rel=1e-6)
  cfg.eval.reference_stats = shifted
  assert evaluation.sample_metrics(exp, params, net=net)[f'eval/fid{tag}'] != pytest.approx(
      computed, rel=1e-3)


def test_class_agreement_counts_samples_classified_as_their_label(tiny_config):
  """Samples are flat images whose grey level says their class, except that class 3 draws
  class 4's image; the 'classifier' reads the grey level. Over 8 devices and 3 batches the
  metric must find 36 of 40 right and class 3 always wrong."""
  cfg = tiny_config()
  cfg.eval.update(metrics='acc', num_samples=40, batch_size=16)
  exp = trainer.Experiment(cfg, workdir=None)
  assert exp.mesh.size == 8

  def sample(params, rng, labels):
    drawn = jax.numpy.where(labels == 3, 4, labels)
    return jax.numpy.broadcast_to((drawn / 10.0)[:, None, None, None], (len(labels), 32, 32, 1))
  exp.family.sample = sample

  def apply(variables, images):
    grey = images.mean(axis=(1, 2, 3))
    logits = -jax.numpy.abs(grey[:, None] - jax.numpy.arange(10) / 10.0)
    return {'pool': logits, 'logits': logits}
  net = evaluation.FeatureNet('grey_level', {}, apply)
  out = evaluation.sample_metrics(exp, None, net=net)
  assert out == {'eval/class_acc[grey_level]': 0.9, 'eval/class_acc_min[grey_level]': 0.0}
  cfg.eval.update(feature_net='inception', inception_path='/weights/inception.npz')
  with pytest.raises(UserError, match='fmnist_classifier'):
    evaluation.check_config(cfg.eval)
