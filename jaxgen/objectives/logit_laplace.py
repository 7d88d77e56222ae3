"""DALL-E's logit-Laplace likelihood (Ramesh et al. 2021) for images in [-1, 1].

Pixels are squeezed into (eps, 1 - eps) so that logit(y) stays finite, and modelled by
  f(y | mu, b) = exp(-|logit(y) - mu| / b) / (2 b y (1 - y)),
a Laplace density on logit(y) carried over to y in (0, 1). The decoder predicts (mu, log b)
per pixel; the reconstruction is the mean image sigmoid(mu) mapped back to [-1, 1].
"""
import math

import jax
import jax.numpy as jnp

EPS = 0.1
# log b is clamped for numerical safety: exp(-log b) multiplies |logit(y) - mu|, so a very
# negative log b overflows (or spikes the loss and its gradient), and a very large one makes
# the density flat and the loss blind to mu. logit(y) spans only about +-2.2 for eps = 0.1 and
# one 8-bit step is ~0.0125 in logit space near mid-grey, so b in [e^-7, e^5] ~ [9e-4, 148]
# covers every useful scale. The clamp has zero gradient outside the range: start the log b
# head near 0.
LOG_B_MIN = -7.0
LOG_B_MAX = 5.0


def _f32(x):
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def to_unit(x, eps=EPS):
  """[-1, 1] pixels -> (eps, 1 - eps): x01 = (x + 1) / 2, y = (1 - 2 eps) x01 + eps."""
  return (1.0 - 2.0 * eps) * (_f32(x) + 1.0) * 0.5 + eps


def nll_map(x, mu, log_b, eps=EPS):
  """Per-pixel -log f(y | mu, b) at y = to_unit(x), same shape as x:
  |logit(y) - mu| / b + log(2 b) + log y + log(1 - y), with log b clamped to
  [LOG_B_MIN, LOG_B_MAX]."""
  y = to_unit(x, eps)
  log_b = jnp.clip(_f32(log_b), LOG_B_MIN, LOG_B_MAX)
  log_y, log_1my = jnp.log(y), jnp.log1p(-y)
  return (jnp.abs(log_y - log_1my - _f32(mu)) * jnp.exp(-log_b) + math.log(2.0) + log_b
          + log_y + log_1my)


def nll_per_example(x, mu, log_b, eps=EPS):
  """Mean per-pixel negative log-likelihood of each example: [B, ...] -> [B]."""
  return jnp.mean(nll_map(x, mu, log_b, eps), axis=tuple(range(1, jnp.ndim(x))))


def nll(x, mu, log_b, eps=EPS):
  """Mean over all pixels (and the batch) of the logit-Laplace negative log-likelihood.

  It is a density, so it can be negative; the log y + log(1 - y) term does not depend on
  the model and only makes the value a proper log-density."""
  return jnp.mean(nll_map(x, mu, log_b, eps))


def mean_image(mu, eps=EPS):
  """Reconstruction in [-1, 1]: clip((sigmoid(mu) - eps) / (1 - 2 eps), 0, 1) * 2 - 1."""
  x01 = jnp.clip((jax.nn.sigmoid(_f32(mu)) - eps) / (1.0 - 2.0 * eps), 0.0, 1.0)
  return x01 * 2.0 - 1.0
