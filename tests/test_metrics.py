"""Evaluation metrics against closed forms, hand-computed values and NumPy/SciPy references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.signal

from jaxgen.errors import UserError
from jaxgen.metrics import codebook, frechet, image, lm, scores


def _rotation(rng, n):
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  return q


# ---------------------------------------------------------------- Frechet distance

def test_frechet_diagonal_and_commuting_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, 1e-12)
  # Commuting covariances share eigenvectors: the same closed form on the eigenvalues.
  q = _rotation(rng, 6)
  got = frechet.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
  assert got == pytest.approx(want, 1e-10)


def test_frechet_matches_scipy_sqrtm():
  rng = np.random.default_rng(1)
  f = 20
  s1, s2 = [np.cov(rng.normal(size=(200, f)) @ rng.normal(size=(f, f)), rowvar=False)
            for _ in range(2)]
  mu1, mu2 = rng.normal(size=f), rng.normal(size=f)
  ref = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
         - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
  assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)


def test_frechet_near_singular():
  # Few samples in high dimension: covariances of rank <= 19 in 128 dimensions, with 3 orders
  # of magnitude between feature scales. Reference: S_i = A_i A_i^T, so tr((S1 S2)^1/2) is the
  # nuclear norm of the small A1^T A2 (20 x 20), computed without any F x F square root.
  rng = np.random.default_rng(2)
  f, n = 128, 20
  scale = np.where(np.arange(f) < f // 2, 1e-3, 1.0)
  x = rng.normal(size=(n, f)) * scale + 5
  y = rng.normal(size=(n, f)) * scale * 1.3 - 2
  (mx, sx), (my, sy) = frechet.gaussian_stats(x), frechet.gaussian_stats(y)
  ax, ay = [(v - v.mean(0)).T / math.sqrt(n - 1) for v in (x, y)]
  ref = (np.sum((mx - my) ** 2) + np.trace(sx) + np.trace(sy)
         - 2 * np.sum(np.linalg.svd(ax.T @ ay, compute_uv=False)))
  assert frechet.frechet_distance(mx, sx, my, sy) == pytest.approx(ref, rel=1e-10)

  # FD(x, x) = 0 to 1e-6 of the traces (in fact to ~1e-14). The naive non-symmetric
  # sqrtm(S S) is ~1e-7 off here; ours must beat it clearly.
  tr = 2 * np.trace(sx)
  ours = 2 * np.trace(sx) - 2 * frechet.trace_sqrt_product(sx, sx)
  naive = 2 * np.trace(sx) - 2 * np.trace(scipy.linalg.sqrtm(sx @ sx)).real
  assert abs(ours) / tr < 1e-10
  assert abs(ours) < abs(naive) / 100
  assert frechet.frechet_distance(mx, sx, mx, sx) / tr < 1e-6


def test_frechet_validates_input():
  with pytest.raises(UserError, match='feature sizes differ'):
    frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(UserError, match='mu'):
    frechet.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
  with pytest.raises(UserError, match='NaN'):
    frechet.frechet_distance(np.full(3, np.nan), np.eye(3), np.zeros(3), np.eye(3))


def test_feature_stats_streaming_and_merge():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(103, 7)) * 0.01 + 1e4  # a large mean: raw sums would cancel badly
  a = frechet.FeatureStats()
  for lo, hi in [(0, 1), (1, 1), (1, 20), (20, 57)]:
    a.update(x[lo:hi])
  b = frechet.FeatureStats().update(x[57:90]).update(x[90:])
  a.merge(b).merge(frechet.FeatureStats())
  assert a.count == 103
  np.testing.assert_allclose(a.mean, x.mean(0), rtol=1e-14)
  np.testing.assert_allclose(a.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-15)
  mu, sigma = frechet.gaussian_stats(x)
  np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-15)
  with pytest.raises(UserError, match='features'):
    a.update(np.zeros((4, 3)))
  with pytest.raises(UserError, match='at least 2'):
    _ = frechet.FeatureStats().update(x[:1]).cov


def test_stats_file_roundtrip_cache_and_corruption(tmp_path):
  path = str(tmp_path / 'ref' / 'stats.npz')
  rng = np.random.default_rng(4)
  mu, sigma = frechet.gaussian_stats(rng.normal(size=(10, 4)))
  meta = dict(network='fmnist_classifier', dataset='fashion_mnist', split='test',
              num_examples=10, image_size=(28, 28))
  frechet.save_stats(path, mu, sigma, **meta)
  mu2, sigma2, meta2 = frechet.load_stats(path)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  assert meta2 == dict(meta, image_size=[28, 28])
  assert [p.name for p in (tmp_path / 'ref').iterdir()] == ['stats.npz']  # no temp files left

  calls = []
  def compute():
    calls.append(1)
    return mu + 1, sigma
  got, _ = frechet.cached_stats(path, compute, **meta)
  np.testing.assert_array_equal(got, mu)
  assert not calls  # same meta: loaded
  got, _ = frechet.cached_stats(path, compute, **dict(meta, split='train'))
  np.testing.assert_array_equal(got, mu + 1)
  assert calls == [1]  # meta changed: recomputed and saved
  assert frechet.load_stats(path)[2]['split'] == 'train'

  with open(path, 'wb') as f:
    f.write(b'not a zip file')
  with pytest.raises(UserError, match='stats.npz.*corrupt.*delete'):
    frechet.cached_stats(path, compute, **meta)
  with pytest.raises(UserError, match='no such'):
    frechet.load_stats(str(tmp_path / 'missing.npz'))


# ---------------------------------------------------------------- IS, precision/recall

def test_inception_score():
  # Hand-computed: p1 = (0.8, 0.2), p2 = (0.2, 0.8), p(y) = (0.5, 0.5);
  # KL = 0.8 ln 1.6 + 0.2 ln 0.4 for both.
  logits = np.log(np.array([[0.8, 0.2], [0.2, 0.8]]))
  mean, std = scores.inception_score(logits, splits=1)
  assert mean == pytest.approx(math.exp(0.8 * math.log(1.6) + 0.2 * math.log(0.4)), 1e-12)
  assert std == 0
  # Confident predictions spread uniformly over C classes score C in every split.
  c = 10
  onehot = 100.0 * np.eye(c)[np.arange(50) % c]
  mean, std = scores.inception_score(onehot, splits=5)
  assert mean == pytest.approx(c, 1e-9) and std < 1e-9
  # All samples predict one class: the score's minimum, 1.
  assert scores.inception_score(np.tile(onehot[:1], (20, 1)), splits=2)[0] == pytest.approx(1.0)


def _brute_pr(real, fake, k):
  d = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1)
  rr, ff, rf = d(real, real), d(fake, fake), d(real, fake)
  r_real = np.sort(rr, 1)[:, k]  # column 0 is the point itself
  r_fake = np.sort(ff, 1)[:, k]
  precision = np.mean((rf <= r_real[:, None]).any(0))
  recall = np.mean((rf <= r_fake[None, :]).any(1))
  density = (rf <= r_real[:, None]).sum() / (k * len(fake))
  coverage = np.mean(rf.min(1) <= r_real)
  return precision, recall, density, coverage


def test_precision_recall():
  rng = np.random.default_rng(5)
  real = rng.normal(size=(37, 5))
  assert scores.precision_recall(real, real, k=3, batch=8) == (1.0, 1.0)
  assert scores.precision_recall(real, real + 100.0, k=3, batch=8) == (0.0, 0.0)
  # Shifted, narrower fakes: partial overlap. Small uneven blocks exercise the padding.
  fake = rng.normal(size=(29, 5)) * 0.5 + 0.8
  p, r, dens, cov = _brute_pr(real.astype(np.float64), fake.astype(np.float64), 3)
  assert 0 < p < 1 and 0 < r < 1
  assert scores.precision_recall(real, fake, k=3, batch=8) == pytest.approx((p, r), abs=1e-12)
  assert scores.precision_recall(real, fake, k=3, batch=1024) == pytest.approx((p, r), abs=1e-12)
  assert scores.density_coverage(real, fake, k=3, batch=8) == pytest.approx((dens, cov), 1e-12)
  with pytest.raises(UserError, match='k=40'):
    scores.precision_recall(real, fake, k=40)


# ---------------------------------------------------------------- PSNR, SSIM

def test_psnr_constant_offset():
  x = jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 8, 3), minval=-1, maxval=0.5)
  got = jax.jit(image.psnr)(x, x + jnp.array([0.1, 0.2, 0.5])[:, None, None, None])
  np.testing.assert_allclose(got, 10 * np.log10(4 / np.array([0.1, 0.2, 0.5]) ** 2), rtol=1e-4)
  assert np.isinf(image.psnr(x, x)).all()


def _ssim_reference(x, y, data_range):
  """Float64 SSIM by scipy.signal.convolve2d with the 2-D Gaussian window, per channel."""
  t = np.arange(11) - 5.0
  g = np.exp(-t ** 2 / 4.5)
  w = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  out = []
  for xi, yi in zip(x, y):
    maps = []
    for c in range(x.shape[-1]):
      f = lambda v: scipy.signal.convolve2d(v, w, mode='valid')
      a, b = xi[..., c], yi[..., c]
      ma, mb = f(a), f(b)
      va, vb, cab = f(a * a) - ma ** 2, f(b * b) - mb ** 2, f(a * b) - ma * mb
      maps.append((2 * ma * mb + c1) * (2 * cab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    out.append(np.mean(maps))
  return np.array(out)


def test_ssim():
  rng = np.random.default_rng(6)
  x = np.clip(rng.normal(size=(2, 24, 20, 3)) * 0.3, -1, 1)
  # An attenuated, shifted, noisy copy so SSIM lands mid-range (all three factors matter).
  y = np.clip(0.8 * x + 0.15 * rng.normal(size=x.shape) + 0.05, -1, 1)
  np.testing.assert_allclose(image.ssim(x, x), 1.0, atol=1e-5)
  got = jax.jit(image.ssim)(x, y)
  want = _ssim_reference(x, y, 2.0)
  assert 0.2 < want.min() < want.max() < 0.9
  np.testing.assert_allclose(got, want, atol=2e-5)
  # Scaled images with the scaled range give the same SSIM (C1, C2 scale with range^2).
  np.testing.assert_allclose(image.ssim(x * 127.5, y * 127.5, data_range=255.0), want, atol=2e-4)
  with pytest.raises(UserError, match='window'):
    image.ssim(x[:, :8], y[:, :8])


# ---------------------------------------------------------------- codebook, LM

def test_codebook_metrics():
  codes = jnp.array([[0, 0, 1, 1], [2, 0, 1, 7]])
  mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])
  hist = jax.jit(codebook.code_histogram, static_argnums=1)(codes, 8, mask)
  np.testing.assert_array_equal(hist, [3, 3, 1, 0, 0, 0, 0, 0])
  assert float(codebook.codebook_usage(codes, 8, mask)) == pytest.approx(3 / 8)
  p = np.array([3, 3, 1]) / 7
  assert float(codebook.codebook_perplexity(codes, 8, mask)) == pytest.approx(
      math.exp(-np.sum(p * np.log(p))), 1e-6)
  # Uniform use of all entries: perplexity = K; out-of-range codes are not counted.
  assert float(codebook.codebook_perplexity(jnp.array([0, 1, 2, 3, -1, 4]), 4)) == pytest.approx(4)
  # Streaming across batches equals one histogram over everything.
  h = jnp.zeros(8, jnp.int32)
  for batch in (codes[0], codes[1]):
    h = codebook.update_histogram(h, batch)
  np.testing.assert_array_equal(h, codebook.code_histogram(codes, 8))
  assert float(codebook.usage_from_histogram(h)) == pytest.approx(4 / 8)


def test_lm_metrics():
  losses = jnp.array([[1.0, 2.0, 3.0], [3.0, 4.0, np.nan]])
  mask = jnp.array([[1, 1, 1], [1, 1, 0]])
  np.testing.assert_allclose(lm.per_position_loss(losses, mask), [2.0, 3.0, 3.0])
  np.testing.assert_allclose(lm.perplexity_curve(losses, mask), np.exp([2.0, 3.0, 3.0]), 1e-6)
  np.testing.assert_allclose(lm.per_position_loss(losses[:, :2]), [2.0, 3.0])
  assert np.isnan(lm.per_position_loss(losses, jnp.zeros((2, 3)))).all()
  np.testing.assert_allclose(lm.moving_average(jnp.array([1.0, 2.0, np.nan, 4.0, 6.0]), 2),
                             [1.0, 1.5, 2.0, 4.0, 5.0])
  assert lm.bits_per_character(100 * math.log(2), 50) == pytest.approx(2.0)

  acc = lm.PositionLoss().update(losses, mask)
  acc.merge(lm.PositionLoss().update(jnp.array([[5.0, 5.0, 5.0, 1.0]])))
  np.testing.assert_allclose(acc.curve(), [3.0, 11 / 3, 4.0, 1.0])
  assert acc.num_tokens == 9
  assert acc.mean_loss() == pytest.approx(29 / 9)
  assert acc.bits_per_character() == pytest.approx(29 / 9 / math.log(2))
  assert acc.bits_per_character(num_characters=29) == pytest.approx(1 / math.log(2))
  with pytest.raises(UserError, match='window'):
    lm.moving_average(jnp.ones(3), 0)
