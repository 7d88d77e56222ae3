"""Frechet distance between Gaussians, streaming feature statistics, reference-stats files.

FD(N(mu1, S1), N(mu2, S2)) = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2)  (as in FID).

All of it runs in float64 NumPy: the last term cancels the traces almost exactly for good
models, so float32 (or an unsymmetric `sqrtm` of S1 S2) loses the digits that matter.
"""
import os
import tempfile
import zipfile

import numpy as np

from jaxgen.errors import UserError

_META_PREFIX = 'meta__'


def _psd_sqrt(sigma):
  """Symmetric PSD square root by eigh; tiny negative eigenvalues (round-off) clipped to 0."""
  w, v = np.linalg.eigh(sigma)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _check_gaussian(mu, sigma, name):
  mu = np.asarray(mu, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise UserError(f'frechet: {name} needs mu [F] and sigma [F, F], got {mu.shape} and '
                    f'{sigma.shape}; pass gaussian_stats(features) of [N, F] features')
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise UserError(f'frechet: {name} statistics contain NaN or inf; check the features '
                    '(or delete a corrupt reference-stats file)')
  return mu, (sigma + sigma.T) / 2  # symmetrise: np.cov round-off can break symmetry


def trace_sqrt_product(sigma1, sigma2):
  """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2, accurate also when they are rank-deficient.

  With R_i = S_i^(1/2) symmetric, S1 S2 is similar to (R1 R2)(R1 R2)^T, so its square-root
  eigenvalues are the singular values of R1 R2: the trace is the nuclear norm of R1 R2. Unlike
  sqrtm(S1 @ S2) (non-symmetric, ill-conditioned when singular) or eig(R1 S2 R1) (squares the
  round-off of the null space before the sqrt), this keeps errors at ~eps * |S| per eigenvalue.
  """
  r1, r2 = _psd_sqrt(sigma1), _psd_sqrt(sigma2)
  return float(np.sum(np.linalg.svd(r1 @ r2, compute_uv=False)))


def frechet_distance(mu1, sigma1, mu2, sigma2):
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as a float64 Python float."""
  mu1, sigma1 = _check_gaussian(mu1, sigma1, 'first')
  mu2, sigma2 = _check_gaussian(mu2, sigma2, 'second')
  if mu1.shape != mu2.shape:
    raise UserError(f'frechet: feature sizes differ ({mu1.shape[0]} vs {mu2.shape[0]}); compute '
                    'both statistics with the same feature network')
  diff = mu1 - mu2
  fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
  return max(float(fd), 0.0)  # can dip below 0 by round-off when the Gaussians coincide


class FeatureStats:
  """Streaming mean and covariance of [N, F] features in float64.

  Keeps count, mean and the centred sum of outer products M2 and merges batches with Chan et al.'s
  parallel update, so uneven batches, merges across hosts and large feature means stay exact to
  round-off (a raw sum of outer products would cancel catastrophically in `cov`).
  """

  def __init__(self, num_features=None):
    self.count = 0
    self._mean = None if num_features is None else np.zeros(num_features)
    self._m2 = None if num_features is None else np.zeros((num_features, num_features))

  def _combine(self, n, mean, m2):
    if self._mean is None:
      self._mean, self._m2 = np.zeros_like(mean), np.zeros_like(m2)
    if mean.shape != self._mean.shape:
      raise UserError(f'FeatureStats: got {mean.shape[0]} features, expected '
                      f'{self._mean.shape[0]}; use one feature network for all batches')
    if n == 0:
      return self
    total = self.count + n
    delta = mean - self._mean
    self._mean = self._mean + delta * (n / total)
    self._m2 = self._m2 + m2 + np.outer(delta, delta) * (self.count * n / total)
    self.count = total
    return self

  def update(self, features):
    """Adds a batch of features [N, F] (NumPy or JAX); returns self."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
      raise UserError(f'FeatureStats.update: features must be [N, F], got shape {x.shape}; '
                      'flatten the feature network output')
    if not np.all(np.isfinite(x)):
      raise UserError('FeatureStats.update: features contain NaN or inf; check the feature network')
    if x.shape[0] == 0:
      return self._combine(0, np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1])))
    mean = x.mean(axis=0)
    xc = x - mean
    return self._combine(x.shape[0], mean, xc.T @ xc)

  def merge(self, other):
    """Adds another FeatureStats' data (e.g. from another host); returns self."""
    if other._mean is None:
      return self
    return self._combine(other.count, other._mean, other._m2)

  @property
  def mean(self):
    if self.count == 0:
      raise UserError('FeatureStats: no features seen; update() with some batches first')
    return self._mean.copy()

  @property
  def cov(self):
    """Unbiased covariance (divides by N - 1), like np.cov(x, rowvar=False)."""
    if self.count < 2:
      raise UserError(f'FeatureStats: covariance needs at least 2 features, got {self.count}')
    return self._m2 / (self.count - 1)


def gaussian_stats(features):
  """(mean [F], unbiased covariance [F, F]) of [N, F] features, float64."""
  stats = FeatureStats().update(features)
  return stats.mean, stats.cov


def _meta_value(name, value):
  arr = np.asarray(value)
  if arr.dtype.kind not in 'biufUS':
    raise UserError(f'save_stats: meta {name}={value!r} must be a string, number or a tuple of '
                    'them')
  return arr


def _normalise_meta(meta):
  """Meta as plain Python values (tuples become lists), the form `load_stats` returns."""
  return {k: _meta_value(k, v).tolist() for k, v in meta.items()}


def save_stats(path, mu, sigma, **meta):
  """Writes reference statistics (and meta: feature network, dataset, split, ...) to a .npz.

  Written to a temporary file in the same directory and renamed over `path`, so an interrupted
  run never leaves a half-written file behind.
  """
  mu, sigma = _check_gaussian(mu, sigma, str(path))
  arrays = {'mu': mu, 'sigma': sigma}
  arrays.update({_META_PREFIX + k: _meta_value(k, v) for k, v in meta.items()})
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp_stats_', suffix='.npz')
  try:
    with os.fdopen(fd, 'wb') as f:  # a file object, so np.savez adds no second '.npz'
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_stats(path):
  """(mu, sigma, meta) from a file written by `save_stats`; UserError if missing or corrupt."""
  if not os.path.exists(path):
    raise UserError(f'{path}: no such reference-statistics file; compute it with cached_stats')
  try:
    with np.load(path, allow_pickle=False) as data:
      mu, sigma = data['mu'], data['sigma']
      meta = {k[len(_META_PREFIX):]: data[k].tolist() for k in data.files
              if k.startswith(_META_PREFIX)}
    mu, sigma = _check_gaussian(mu, sigma, str(path))
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, UserError) as e:
    raise UserError(f'{path}: corrupt reference-statistics file ({type(e).__name__}: '
                    f'{str(e).splitlines()[0] if str(e) else ""}); delete it to recompute') from e
  return mu, sigma, meta


def cached_stats(path, compute_fn, **meta):
  """(mu, sigma) from `path` if it exists with exactly this meta, else compute_fn() and save it.

  Meta (feature network, dataset, split, num_examples, image size, ...) is what makes a stored
  reference valid for a run: any difference means the file describes other data, so recompute.
  """
  if os.path.exists(path):
    mu, sigma, stored = load_stats(path)
    if stored == _normalise_meta(meta):
      return mu, sigma
  mu, sigma = compute_fn()
  save_stats(path, mu, sigma, **meta)
  return np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
