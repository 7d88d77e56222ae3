"""Language-model eval metrics: loss and perplexity by position, bits per character.

Per-position curves show whether a model uses its context (loss should fall with position);
for lexinvariant models they show in-context learning of the token mapping. Positions with no
(unmasked) tokens are NaN, not 0, so a plot cannot mistake them for a perfect prediction.
"""
import math

import jax.numpy as jnp
import numpy as np

from jaxgen.errors import UserError


def position_sums(token_losses, mask=None):
  """(sum of losses [L], number of tokens [L]) over the batch of token_losses [B, L]; jittable."""
  token_losses = jnp.asarray(token_losses)
  if token_losses.ndim != 2:
    raise UserError(f'lm metrics: token_losses must be [batch, length], got {token_losses.shape}')
  mask = jnp.ones_like(token_losses) if mask is None else jnp.asarray(mask, token_losses.dtype)
  if mask.shape != token_losses.shape:
    raise UserError(f'lm metrics: mask {mask.shape} must match token_losses {token_losses.shape}')
  # where, not multiply: a masked-out NaN/inf loss (padding) must not leak into the sum.
  return jnp.sum(jnp.where(mask > 0, token_losses * mask, 0.0), 0), jnp.sum(mask, 0)


def per_position_loss(token_losses, mask=None):
  """Mean loss over the batch at each position [L] (masked tokens excluded; NaN if none)."""
  sums, counts = position_sums(token_losses, mask)
  return jnp.where(counts > 0, sums / jnp.where(counts > 0, counts, 1), jnp.nan)


def perplexity_curve(token_losses, mask=None):
  """exp(per-position mean loss) [L]; token_losses in nats."""
  return jnp.exp(per_position_loss(token_losses, mask))


def moving_average(curve, window):
  """Trailing mean over `window` positions, same length as `curve` (shorter windows at the start).

  NaN entries are skipped, so out[i] is the mean of the finite values in curve[i-window+1 : i+1].
  """
  if not isinstance(window, int) or window < 1:
    raise UserError(f'moving_average: window must be a positive int, got {window!r}')
  curve = jnp.asarray(curve, jnp.float32)
  ok = ~jnp.isnan(curve)
  def trailing(v):
    c = jnp.cumsum(v)
    return c - jnp.concatenate([jnp.zeros(window, c.dtype), c[:-window]])[:c.shape[0]]
  total, count = trailing(jnp.where(ok, curve, 0.0)), trailing(ok.astype(jnp.float32))
  return jnp.where(count > 0, total / jnp.where(count > 0, count, 1), jnp.nan)


def bits_per_character(total_nats, num_characters):
  """Total loss in nats over a text -> bits per character (nats / ln 2 / characters).

  For character-level models characters = tokens; for subword models pass the number of
  characters of the evaluated text, not the number of tokens.
  """
  if isinstance(num_characters, (int, float)) and num_characters <= 0:
    raise UserError(f'bits_per_character: num_characters must be positive, got {num_characters}')
  return total_nats / math.log(2) / num_characters


class PositionLoss:
  """Streaming per-position loss over eval batches (host-side float64 sums and counts).

  Sequences may differ in length between batches; the curve covers the longest seen.
  """

  def __init__(self):
    self.sums = np.zeros(0)
    self.counts = np.zeros(0)

  def _add(self, sums, counts):
    n = max(len(self.sums), len(sums))
    grow = lambda a: np.pad(a, (0, n - len(a)))
    self.sums = grow(self.sums) + grow(sums)
    self.counts = grow(self.counts) + grow(counts)
    return self

  def update(self, token_losses, mask=None):
    """Adds token_losses [B, L] (nats; mask [B, L] marks real tokens); returns self."""
    sums, counts = position_sums(token_losses, mask)
    return self._add(np.asarray(sums, np.float64), np.asarray(counts, np.float64))

  def merge(self, other):
    return self._add(other.sums, other.counts)

  @property
  def num_tokens(self):
    return float(self.counts.sum())

  @property
  def total_nats(self):
    return float(self.sums.sum())

  def curve(self):
    """Mean loss per position [L] (NaN where no tokens were seen)."""
    with np.errstate(invalid='ignore', divide='ignore'):
      return np.where(self.counts > 0, self.sums / self.counts, np.nan)

  def perplexity_curve(self):
    return np.exp(self.curve())

  def mean_loss(self):
    """Token-weighted mean loss over all positions (nats per token)."""
    if self.num_tokens == 0:
      raise UserError('PositionLoss: no tokens seen; update() with some eval batches first')
    return self.total_nats / self.num_tokens

  def bits_per_character(self, num_characters=None):
    """Bits per character; num_characters defaults to the token count (character-level models)."""
    return bits_per_character(self.total_nats, num_characters or self.num_tokens)
