"""Sample-quality scores on classifier outputs and features: Inception Score, improved
precision/recall (Kynkaanniemi et al. 2019) and density/coverage (Naeem et al. 2020).

The k-NN metrics never hold an N x M distance matrix: distances are computed block by block
on the accelerator (float32, HIGHEST matmul precision, on mean-centred features so
|a|^2 + |b|^2 - 2 a.b cancels little) and reduced on the fly, so memory is O(batch^2 + data).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import UserError


def inception_score(logits, splits=10):
  """(mean, std) over `splits` parts of exp(E_x KL(p(y|x) || p(y))), p = softmax(logits [N, C]).

  Splits are np.array_split parts (uneven when N is not divisible), p(y) is each part's mean
  prediction, std is the population std over parts, as in the original evaluation code.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise UserError(f'inception_score: logits must be [N, classes], got shape {logits.shape}')
  if not 1 <= splits <= logits.shape[0]:
    raise UserError(f'inception_score: splits={splits} needs 1 <= splits <= N={logits.shape[0]}; '
                    'lower splits or pass more samples')
  if not np.all(np.isfinite(logits)):
    raise UserError('inception_score: logits contain NaN or inf; check the classifier')
  logp = logits - np.max(logits, axis=1, keepdims=True)
  logp -= np.log(np.sum(np.exp(logp), axis=1, keepdims=True))
  scores = []
  for part in np.array_split(logp, splits):
    p = np.exp(part)
    log_py = np.log(p.mean(axis=0))
    # p log(p / p(y)) with 0 log 0 = 0: p(y) = 0 only where every p in the part underflowed.
    kl = np.where(p > 0, p * (part - log_py), 0.0).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _check_features(real, fake, k):
  real, fake = np.asarray(real, np.float32), np.asarray(fake, np.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise UserError(f'precision/recall: need real [N, F] and fake [M, F] features, got '
                    f'{real.shape} and {fake.shape}')
  if not 1 <= k < min(len(real), len(fake)):
    raise UserError(f'precision/recall: k={k} needs 1 <= k < number of samples in each set '
                    f'({len(real)} real, {len(fake)} fake); lower k or pass more samples')
  if not (np.all(np.isfinite(real)) and np.all(np.isfinite(fake))):
    raise UserError('precision/recall: features contain NaN or inf; check the feature network')
  # Distances are translation invariant; centring keeps float32 |a|^2 + |b|^2 - 2 a.b accurate.
  centre = real.mean(axis=0)
  return real - centre, fake - centre


def _sqdist(a, b):
  ab = jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)
  d = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2 * ab
  return jnp.maximum(d, 0.0)


def _blocks(x, batch, fill):
  """x [N, ...] -> [ceil(N / batch), batch, ...] padded with `fill`."""
  pad = -len(x) % batch
  x = np.concatenate([x, np.full((pad,) + x.shape[1:], fill, x.dtype)])
  return jnp.asarray(x.reshape((-1, batch) + x.shape[1:]))


@functools.partial(jax.jit, static_argnums=3)
def _kth_block(rows, cols, col_valid, kk):
  """kk-th smallest squared distance from each row to the valid columns (self included)."""
  def step(best, blk):
    c, valid = blk
    d = jnp.where(valid[None, :], _sqdist(rows, c), jnp.inf)
    neg, _ = jax.lax.top_k(-jnp.concatenate([best, d], axis=1), kk)
    return -neg, None
  best, _ = jax.lax.scan(step, jnp.full((rows.shape[0], kk), jnp.inf), (cols, col_valid))
  return best[:, -1]


@jax.jit
def _ball_block(queries, centres, radii2):
  """Per query: how many centres' balls contain it, and its squared distance to the nearest centre.

  Padded centres carry radius^2 = -1 (never contain anything) and are skipped for the minimum.
  """
  def step(carry, blk):
    count, nearest = carry
    c, r2 = blk
    d = _sqdist(queries, c)
    count = count + jnp.sum(d <= r2[None, :], axis=1)
    nearest = jnp.minimum(nearest, jnp.min(jnp.where(r2[None, :] >= 0, d, jnp.inf), axis=1))
    return (count, nearest), None
  init = (jnp.zeros(queries.shape[0], jnp.int32), jnp.full(queries.shape[0], jnp.inf))
  (count, nearest), _ = jax.lax.scan(step, init, (centres, radii2))
  return count, nearest


def knn_radii2(x, k=3, batch=1024):
  """Squared distance from each row of x [N, F] to its k-th nearest other row."""
  x = np.asarray(x, np.float32)
  batch = min(batch, len(x))
  cols = _blocks(x, batch, 0.0)
  valid = _blocks(np.ones(len(x), bool), batch, False)
  # The (k + 1)-th smallest distance including the zero to itself is the k-th excluding it
  # (also with duplicate points).
  out = [_kth_block(rows, cols, valid, k + 1) for rows in cols]
  return np.concatenate([np.asarray(o) for o in out])[:len(x)]


def _ball_stats(queries, centres, radii2, batch):
  batch_c = min(batch, len(centres))
  cb, rb = _blocks(centres, batch_c, 0.0), _blocks(radii2.astype(np.float32), batch_c, -1.0)
  counts, nearest = [], []
  for rows in _blocks(queries, min(batch, len(queries)), 0.0):
    c, n = _ball_block(rows, cb, rb)
    counts.append(np.asarray(c))
    nearest.append(np.asarray(n))
  return np.concatenate(counts)[:len(queries)], np.concatenate(nearest)[:len(queries)]


def precision_recall(real, fake, k=3, batch=1024):
  """Improved precision and recall of fake [M, F] against real [N, F] features.

  Each sample gets a ball reaching its k-th nearest neighbour within its own set. Precision is
  the share of fake samples inside at least one real ball (fidelity), recall the share of real
  samples inside at least one fake ball (diversity). Boundaries count as inside.
  """
  real, fake = _check_features(real, fake, k)
  real_r2, fake_r2 = knn_radii2(real, k, batch), knn_radii2(fake, k, batch)
  in_real, _ = _ball_stats(fake, real, real_r2, batch)
  in_fake, _ = _ball_stats(real, fake, fake_r2, batch)
  return float(np.mean(in_real > 0)), float(np.mean(in_fake > 0))


def density_coverage(real, fake, k=5, batch=1024):
  """Density and coverage (Naeem et al. 2020), both from k-NN balls around real samples only.

  Density: real balls containing each fake sample, averaged and divided by k (about 1 when fake
  matches real; above 1 for fakes crowding dense real regions). Coverage: share of real samples
  whose ball contains at least one fake sample (robust to outliers among the fakes).
  """
  real, fake = _check_features(real, fake, k)
  real_r2 = knn_radii2(real, k, batch)
  in_real, _ = _ball_stats(fake, real, real_r2, batch)
  _, nearest_fake = _ball_stats(real, fake, np.zeros(len(fake)), batch)
  return float(np.sum(in_real) / (k * len(fake))), float(np.mean(nearest_fake <= real_r2))
