"""Register-token utilities for FlexTok: the 'causal_last' attention mask that orders the
registers, keep_k sampling and nested dropout (coarse-to-fine), and the null condition for
the decoder's classifier-free guidance."""
import jax
import jax.numpy as jnp
import numpy as np

KEEP_K_MODES = ('uniform', 'pow2', 'pow2_ceil')


def causal_last_mask(num_patches: int, num_registers: int) -> np.ndarray:
  """bool [P+R, P+R] (True = may attend) over the sequence patches then registers: patches
  see all patches and no register; register i sees all patches and registers 0..i.

  Static numpy; broadcast it as mask[None, None] for Attention."""
  p, n = num_patches, num_patches + num_registers
  pos = np.arange(n)
  is_patch = pos < p
  causal = pos[None, :] <= pos[:, None]
  # Patch rows: patch keys only. Register rows: patch keys, or register keys up to the row.
  return np.where(is_patch[:, None], is_patch[None, :], is_patch[None, :] | causal)


def pow2_values(num_registers):
  """1, 2, 4, ... below num_registers, then num_registers itself (a power of two or not)."""
  values = [1 << i for i in range(num_registers.bit_length()) if (1 << i) < num_registers]
  return np.asarray(values + [num_registers], np.int32)


def sample_keep_k(rng, batch: int, num_registers: int, mode: str = 'uniform'):
  """int32 [batch] of register counts to keep, in 1..N (N = num_registers):

  * 'uniform'   — uniform on 1..N;
  * 'pow2'      — uniform over {1, 2, 4, ..., N}; when N is not a power of two the set is the
                  powers of two below N plus N itself (N = 6: {1, 2, 4, 6});
  * 'pow2_ceil' — uniform on 1..N rounded up to the next power of two, capped at N (so the
                  larger counts are more likely: N = 8 gives 1, 2, 4, 8 with 1/8, 1/8, 2/8, 4/8).
  """
  if mode not in KEEP_K_MODES:
    raise ValueError(f'unknown keep_k mode {mode!r}: use one of {", ".join(KEEP_K_MODES)}')
  if num_registers < 1:
    raise ValueError(f'num_registers must be >= 1, got {num_registers}')
  pow2 = pow2_values(num_registers)
  if mode == 'pow2':
    return jnp.asarray(pow2)[jax.random.randint(rng, (batch,), 0, len(pow2))]
  k = jax.random.randint(rng, (batch,), 1, num_registers + 1, dtype=jnp.int32)
  if mode == 'uniform':
    return k
  # The smallest value of the table >= k: its last entry is N, so the cap comes for free.
  return jnp.asarray(pow2)[jnp.searchsorted(jnp.asarray(pow2), k, side='left')]


def nested_dropout(registers, keep_k, mask_token):
  """registers [B, R, D] with positions >= keep_k [B] replaced by mask_token [D]; the
  sequence keeps its length R so every keep_k shares one compiled shape."""
  keep = jnp.arange(registers.shape[1])[None, :] < keep_k[:, None]
  return jnp.where(keep[..., None], registers, mask_token.astype(registers.dtype))


def null_condition(registers, drop, null_token):
  """registers [B, R, D] with every register of the rows where drop [B] is True replaced by
  null_token [D]: the unconditional input of the decoder's classifier-free guidance."""
  return jnp.where(drop[:, None, None], null_token.astype(registers.dtype), registers)
