"""Finite Scalar Quantization (Mentzer et al., 2023): no codebook, no parameters, no
auxiliary loss. Each of the `dim = len(levels)` channels is squashed by a tanh and rounded
to one of L evenly spaced values; the code index is the mixed-radix number of the digits.

Grid convention (all L, even or odd): channel i takes the L values

    code = 2 k / (L - 1) - 1,   k = 0 .. L - 1   (the digit),

i.e. exactly L points spanning [-1, 1]: L=5 -> -1, -.5, 0, .5, 1; L=8 -> +-1, +-5/7, +-3/7,
+-1/7 (no exact 0). This is the paper's integer grid round(tanh(z + shift) * half_l - offset)
with the even-level half-offset added back and divided by (L - 1) / 2, so it is symmetric,
unlike the paper's code which divides by L // 2 and spans [-1, 0.75] for L=8 (the two differ
by a per-channel affine map, which the next linear layer absorbs). z = 0 maps onto the digit
L // 2 (code 0 for odd L, +1/(L-1) for even L), never onto a rounding boundary.

Index convention: the first channel is the least significant digit,
index = sum_i k_i * prod(levels[:i]).
"""
import dataclasses
import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class FSQ:
  """FSQ over `levels` (e.g. (8, 8, 8, 5, 5, 5): 64,000 codes of 6 channels). Hashable, so it
  can sit as a static field of a Linen module. Works in float32 whatever the input dtype:
  rounding boundaries must not move under bf16."""
  levels: Tuple[int, ...]
  eps: float = 1e-3  # keeps tanh's range strictly inside the outermost rounding cells

  def __post_init__(self):
    object.__setattr__(self, 'levels', tuple(int(l) for l in self.levels))
    if not self.levels or min(self.levels) < 2:
      raise ValueError(f'FSQ levels must all be >= 2, got {self.levels}')
    if self.num_codes >= 2 ** 31:
      raise ValueError(f'FSQ levels {self.levels} give {self.num_codes} codes: over int32')

  @property
  def dim(self) -> int:
    return len(self.levels)

  @property
  def num_codes(self) -> int:
    return math.prod(self.levels)

  def _arrays(self):
    levels = np.asarray(self.levels, np.float32)
    basis = np.cumprod((1,) + self.levels[:-1]).astype(np.int32)
    return levels, basis

  def bound(self, z):
    """z [..., dim] -> (1 - eps) tanh(z + shift) in (-1, 1), float32, on the code scale.

    shift = atanh(offset / half_l) with offset 1/2 for even L (0 for odd) and
    half_l = (1 - eps)(L - 1) / 2, the paper's shift: it puts z = 0 on the digit L // 2.
    """
    levels, _ = self._arrays()
    half_l = (1 - self.eps) * (levels - 1) / 2
    offset = np.where(levels % 2 == 0, 0.5, 0.0)
    shift = np.arctanh(offset / half_l).astype(np.float32)
    return (1 - self.eps) * jnp.tanh(z.astype(jnp.float32) + shift)

  def _digits(self, codes):
    levels, _ = self._arrays()
    return jnp.round((codes + 1) * (levels - 1) / 2)

  def quantize(self, z):
    """Codes [..., dim] on the grid 2k/(L-1) - 1; straight-through: the forward value is the
    rounded one, the gradient is that of `bound`."""
    levels, _ = self._arrays()
    b = self.bound(z)
    rounded = 2 * self._digits(b) / (levels - 1) - 1
    return b + jax.lax.stop_gradient(rounded - b)

  def codes_to_indices(self, codes):
    """Codes [..., dim] (on the grid) -> int32 indices [...] in 0 .. num_codes - 1."""
    _, basis = self._arrays()
    digits = self._digits(codes.astype(jnp.float32)).astype(jnp.int32)
    return jnp.sum(digits * basis, axis=-1).astype(jnp.int32)

  def indices_to_codes(self, indices):
    """Int indices [...] -> float32 codes [..., dim]."""
    levels, basis = self._arrays()
    digits = (jnp.asarray(indices, jnp.int32)[..., None] // basis) % levels.astype(np.int32)
    return 2 * digits.astype(jnp.float32) / (levels - 1) - 1

  def __call__(self, z):
    """z [..., dim] -> (codes [..., dim] float32 straight-through, indices [...] int32)."""
    codes = self.quantize(z)
    return codes, self.codes_to_indices(jax.lax.stop_gradient(codes))
