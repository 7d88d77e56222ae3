"""Sample-based evaluation: FID, Inception Score and precision/recall with a named feature net.

`config.eval.metrics` names what `--mode=eval` (and the periodic eval) computes:
  loss       the family's own eval metrics, averaged over `eval_batches` test batches
  fid        Frechet distance between generated samples and the real `eval.real_split`
             (for a tokenizer, which reconstructs, rFID: its reconstructions of real_split)
  is         Inception Score of the generated samples (the feature net's logits)
  pr         improved precision / recall (k-NN manifolds, k = eval.pr_k)
  acc        class agreement: the share of class-conditional samples that the feature net's
             classifier (fmnist_classifier only: its classes are the dataset's) assigns to
             the class they were drawn for, and the worst class's share

Every score is labelled with the network that produced it, e.g. `eval/fid[fmnist_classifier_v1]`:
`inception` (the standard pt_inception-2015-12-05 FID network, from a local weights file)
or `fmnist_classifier` (jaxgen's offline Fashion-MNIST network, trained once by
`python -m jaxgen.metrics.fmnist_net`). Sampling and feature extraction run sharded over
the mesh's batch axes; features are gathered to every host. Real-data statistics (a .npz of
mu and sigma; and the features, for precision/recall) are computed once per dataset split and
feature network and cached, or read from `eval.reference_stats` (a .npz with 'mu' and
'sigma', e.g. converted standard ImageNet statistics).
"""
import dataclasses
import functools
import hashlib
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxgen import sharding
from jaxgen.errors import UserError
from jaxgen.metrics import frechet, scores

METRICS = ('loss', 'fid', 'is', 'pr', 'acc')
FEATURE_NETS = ('fmnist_classifier', 'inception')
SAMPLE_METRICS = ('fid', 'is', 'pr', 'acc')


def metric_names(eval_cfg):
  """'loss,fid' -> ('loss', 'fid'); unknown names are a UserError."""
  names = tuple(n.strip() for n in str(eval_cfg.metrics).split(',') if n.strip())
  unknown = [n for n in names if n not in METRICS]
  if unknown:
    raise UserError(f'unknown eval metric {unknown[0]!r} in --config.eval.metrics: '
                    f'use a comma-separated subset of {",".join(METRICS)}')
  return names


def check_config(eval_cfg):
  """Fails fast (before any checkpoint is read) on metrics or feature nets that cannot run."""
  names = metric_names(eval_cfg)
  if not any(n in SAMPLE_METRICS for n in names):
    return
  if eval_cfg.feature_net not in FEATURE_NETS:
    raise UserError(f'unknown --config.eval.feature_net={eval_cfg.feature_net!r}: use one of '
                    f'{", ".join(FEATURE_NETS)}')
  if eval_cfg.feature_net == 'inception' and not eval_cfg.inception_path:
    raise UserError('--config.eval.feature_net=inception needs the FID Inception weights: '
                    'pass --config.eval.inception_path=/path/to/pt_inception-2015-12-05.pth '
                    '(or an .npz from scripts/convert_torch_weights.py)')
  if 'acc' in names and eval_cfg.feature_net != 'fmnist_classifier':
    raise UserError('eval metric acc needs a classifier over the dataset\'s classes: use '
                    '--config.eval.feature_net=fmnist_classifier (Inception\'s are ImageNet\'s)')


# ----------------------------------------------------------------------------
# Feature networks
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FeatureNet:
  """`apply(variables, images in [-1, 1] NHWC) -> {'pool': [B, F], 'logits': [B, C]}`."""
  name: str
  variables: Any
  apply: Callable

  @functools.cached_property
  def fingerprint(self):
    """Short hash of the weights: cached real features never outlive the net that made them."""
    h = hashlib.sha1()
    for leaf in jax.tree_util.tree_leaves(self.variables):
      h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()[:10]


def load_feature_net(eval_cfg, data_cfg):
  check_config(eval_cfg)
  name = eval_cfg.feature_net
  if name == 'inception':
    from jaxgen.models import inception
    return FeatureNet('inception_pt_2015_12_05', inception.load_inception(
        eval_cfg.inception_path), inception.inception_features)
  from jaxgen.metrics import fmnist_net
  return FeatureNet(fmnist_net.FEATURE_NET_NAME, fmnist_net.load_classifier(data_cfg),
                    fmnist_net.fmnist_features)


class Extractor:
  """Jitted features of global (batch-sharded) image arrays, gathered to the host."""

  def __init__(self, net, mesh):
    self.net, self.mesh = net, mesh
    self._fn = jax.jit(net.apply, out_shardings=NamedSharding(mesh, P()))

  def __call__(self, images):
    with jax.set_mesh(self.mesh):
      out = self._fn(self.net.variables, images)
    return {k: np.asarray(jax.device_get(v), np.float64) for k, v in out.items()}


# ----------------------------------------------------------------------------
# Real and generated features
# ----------------------------------------------------------------------------
def _cache_path(exp, net, split, num, kind):
  """<data_dir>/fid_stats/<dataset>_<split>_<num>_<size>_<net>_<weights hash>_<kind>.npz"""
  d = exp.config.data
  size = f'{d.image_size}x{d.image_size}x{d.channels}'
  return os.path.join(os.path.expanduser(str(d.data_dir)), 'fid_stats',
                      f'{d.name}_{split}_{num}_{size}_{net.name}_{net.fingerprint}_{kind}.npz')


def _real_batches(exp, extractor, split, num, batch_size):
  """Features of the first `num` examples of `split` (in stored order), batch by batch."""
  it = exp.family.make_iterator(split, global_batch_size=batch_size, seed=0, train=False)
  for i in range(-(-num // batch_size)):
    feats = extractor(sharding.global_batch({'image': next(it)['image']}, exp.mesh)['image'])
    yield {k: v[:num - i * batch_size] for k, v in feats.items()}


def real_features(exp, extractor, split, num, batch_size):
  """Feature dict ('pool', 'logits', float32) of the first `num` examples of `split`, cached
  (precision/recall needs the features themselves, not only their statistics)."""
  path = _cache_path(exp, extractor.net, split, num, 'features')
  if os.path.exists(path):
    try:
      with np.load(path) as f:
        return {'pool': f['pool'], 'logits': f['logits']}
    except Exception as e:  # noqa: BLE001 — any unreadable cache is the same problem
      raise UserError(f'cached real features {path} are unreadable ({type(e).__name__}); '
                      'delete the file and run again') from e
  chunks = list(_real_batches(exp, extractor, split, num, batch_size))
  feats = {k: np.concatenate([c[k] for c in chunks]).astype(np.float32) for k in chunks[0]}
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + f'.tmp{os.getpid()}.npz'
    np.savez(tmp, **feats)
    os.replace(tmp, path)
  return feats


def real_stats(exp, extractor, split, num, batch_size, features=None):
  """(mu, sigma) of the real pool features: a reference-statistics file computed once per
  dataset split and feature network (streamed, so no features are kept), or `features`'."""
  net, d = extractor.net, exp.config.data
  meta = dict(feature_net=net.name, weights=net.fingerprint, dataset=d.name, split=split,
              num_examples=num, image_size=d.image_size, channels=d.channels)

  def compute():
    if features is not None:
      return frechet.gaussian_stats(features['pool'])
    stats = frechet.FeatureStats()
    for feats in _real_batches(exp, extractor, split, num, batch_size):
      stats.update(feats['pool'])
    return stats.mean, stats.cov
  return frechet.cached_stats(_cache_path(exp, net, split, num, 'stats'), compute, **meta)


def reconstructed_features(exp, extractor, params, split, num, batch_size):
  """Features of the reconstructions of the first `num` images of `split` (tokenizers: the
  FID of these against the real images is rFID)."""
  if not hasattr(exp, '_eval_reconstruct_fn'):
    exp._eval_reconstruct_fn = jax.jit(exp.family.reconstruct,
                                       out_shardings=sharding.batch_sharding(exp.mesh))
  it = exp.family.make_iterator(split, global_batch_size=batch_size, seed=0, train=False)
  chunks = []
  with exp.context():
    for _ in range(-(-num // batch_size)):
      images = sharding.global_batch(next(it)['image'], exp.mesh)
      chunks.append(extractor(exp._eval_reconstruct_fn(params, images)))
  return {k: np.concatenate([c[k] for c in chunks])[:num] for k in chunks[0]}


def generated_features(exp, extractor, params, num, batch_size, seed):
  """Features of `num` class-balanced samples (labels i % num_classes), made batch by batch;
  for a family that reconstructs (a tokenizer), of its reconstructions of real images."""
  if exp.family.reconstructs:
    return reconstructed_features(exp, extractor, params, exp.config.eval.real_split, num,
                                  batch_size)
  classes = exp.config.data.num_classes
  local = batch_size // jax.process_count()
  first = jax.process_index() * local  # processes hold consecutive rows of the global batch
  if not hasattr(exp, '_eval_sample_fn'):  # one compilation for every periodic eval
    exp._eval_sample_fn = jax.jit(exp.family.sample,
                                  out_shardings=sharding.batch_sharding(exp.mesh))
  sample = exp._eval_sample_fn
  chunks = []
  with exp.context():
    for i in range(-(-num // batch_size)):
      rows = np.arange(i * batch_size + first, i * batch_size + first + local)
      labels = sharding.global_batch((rows % classes).astype(np.int32), exp.mesh)
      rng = jax.random.fold_in(jax.random.PRNGKey(seed), i)
      chunks.append(extractor(sample(params, rng, labels)))
  return {k: np.concatenate([c[k] for c in chunks])[:num] for k in chunks[0]}


def sample_metrics(exp, params, net=None):
  """The config's sample-based metrics for `params`; keys name the feature network."""
  c = exp.config
  e = c.eval
  wanted = [m for m in metric_names(e) if m in SAMPLE_METRICS]
  if not wanted:
    return {}
  net = net or getattr(exp, '_eval_net', None) or load_feature_net(e, c.data)
  exp._eval_net = net
  batch = e.batch_size or c.batch_size
  sharding.check_batch(batch, exp.mesh, what='eval.batch_size')
  if getattr(exp, '_eval_extractor', None) is None or exp._eval_extractor.net is not net:
    exp._eval_extractor = Extractor(net, exp.mesh)  # compiled once across periodic evals
  extractor = exp._eval_extractor
  gen = generated_features(exp, extractor, params, e.num_samples, batch, e.seed)
  real = real_features(exp, extractor, e.real_split, e.num_real, batch) if 'pr' in wanted else None
  out, tag = {}, f'[{net.name}]'
  fid_name = 'rfid' if exp.family.reconstructs else 'fid'
  if 'fid' in wanted:
    if e.reference_stats:  # e.g. the standard ImageNet statistics of the same feature network
      mu, sigma, _ = frechet.load_stats(e.reference_stats)
    else:
      mu, sigma = real_stats(exp, extractor, e.real_split, e.num_real, batch, real)
    fid = frechet.frechet_distance(*frechet.gaussian_stats(gen['pool']), mu, sigma)
    out[f'eval/{fid_name}{tag}'] = float(fid)
  if 'is' in wanted:
    mean, std = scores.inception_score(gen['logits'], splits=e.is_splits)
    out[f'eval/is{tag}'], out[f'eval/is_std{tag}'] = float(mean), float(std)
  if 'pr' in wanted:
    precision, recall = scores.precision_recall(real['pool'], gen['pool'], k=e.pr_k)
    out[f'eval/precision{tag}'], out[f'eval/recall{tag}'] = float(precision), float(recall)
  if 'acc' in wanted:
    if exp.family.reconstructs:
      raise UserError(f'eval metric acc scores class-conditional samples; {c.family} '
                      'reconstructs images: drop acc from --config.eval.metrics')
    mean, worst = class_agreement(gen['logits'], c.data.num_classes)
    out[f'eval/class_acc{tag}'], out[f'eval/class_acc_min{tag}'] = mean, worst
  return out


def class_agreement(logits, num_classes):
  """(share of samples classified as the class they were drawn for, the worst class's
  share) for logits [N, num_classes] of samples whose labels are i % num_classes (as
  `generated_features` draws them)."""
  labels = np.arange(len(logits)) % num_classes
  hit = np.argmax(logits, axis=-1) == labels
  per_class = [hit[labels == k].mean() for k in range(min(num_classes, len(logits)))]
  return float(hit.mean()), float(min(per_class))
