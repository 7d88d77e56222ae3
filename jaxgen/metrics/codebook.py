"""Codebook health of vector-quantised models: code histogram, usage and perplexity.

All functions are jittable (codebook_size is static). For whole-eval numbers, accumulate one
histogram over the batches (`update_histogram`) and read usage / perplexity from it at the end:
per-batch usage averaged over batches underestimates the codebook the model actually uses.
"""
import jax.numpy as jnp

from jaxgen.errors import UserError


def code_histogram(codes, codebook_size, mask=None):
  """Counts [codebook_size] (int32) of the integer `codes` (any shape).

  `mask` (same shape as codes) excludes padded positions; codes outside [0, codebook_size) are
  not counted (jnp.bincount alone would fold negative codes into entry 0).
  """
  if not isinstance(codebook_size, int) or codebook_size < 1:
    raise UserError(f'codebook metrics: codebook_size must be a positive int, '
                    f'got {codebook_size!r}')
  codes = jnp.asarray(codes).reshape(-1)
  valid = (codes >= 0) & (codes < codebook_size)
  if mask is not None:
    valid &= jnp.asarray(mask, bool).reshape(-1)
  return jnp.bincount(jnp.where(valid, codes, 0), weights=valid.astype(jnp.int32),
                      length=codebook_size).astype(jnp.int32)


def update_histogram(histogram, codes, mask=None):
  """Streaming: histogram [K] plus the counts of one more batch of codes."""
  return histogram + code_histogram(codes, histogram.shape[0], mask)


def usage_from_histogram(histogram):
  """Share of codebook entries with at least one count."""
  return jnp.mean(histogram > 0)


def perplexity_from_histogram(histogram):
  """exp(entropy) of the code distribution: from 1 (one code) to K (all codes equally used)."""
  p = histogram / jnp.maximum(jnp.sum(histogram), 1)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return jnp.exp(entropy)


def codebook_usage(codes, codebook_size, mask=None):
  """Share of the codebook's entries used at least once in `codes`."""
  return usage_from_histogram(code_histogram(codes, codebook_size, mask))


def codebook_perplexity(codes, codebook_size, mask=None):
  """exp of the entropy of the code histogram of `codes`."""
  return perplexity_from_histogram(code_histogram(codes, codebook_size, mask))
