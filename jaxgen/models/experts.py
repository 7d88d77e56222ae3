"""Expert MLPs with stacked weights [E, ...]: run batched over experts, or as a grouped matmul
over rows sorted by expert id (the dropless MoE dispatch).

Grouped matmuls (`GROUPED_MATMULS`, chosen by `grouped_ffn`):
  'windows'     each expert's rows are copied into its own window of `window_rows` rows and all
                experts run as one batched matmul with their own weights (no weight gather, as
                capacity dispatch). Rows beyond a window would be dropped, so lax.conds pick
                per step (`window_route`): nothing more when every group fits; when at most
                `spill_experts` groups overflow, each by at most the spill rows, a second small
                batched matmul over just those experts (the spill); else 'blocks' for all rows.
                Dropless either way. (Measured on CPU only; on a GPU a lax.cond may read its
                predicate back to the host, twice per layer and direction.)
  'blocks'      each group padded to whole blocks of one expert; one batched matmul over the
                blocks with per-block gathered weights (the gathers cost memory traffic).
  'ragged_dot'  `jax.lax.ragged_dot`, for backends with a grouped-GEMM kernel; XLA:CPU expands it
                into a masked dense dot over all experts (E x the useful FLOPs).
Rows with an id >= E (padding, as in the expert-parallel receive buffer) come back as zeros.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def expert_ffn(x, p, kind, mm, bias):
  """One expert MLP with stacked weights; `mm(x, w[E, a, b])` and `bias(b[E, f])` pick the
  expert per row (batched einsum or ragged_dot)."""
  if kind == 'swiglu':
    h = nn.silu(mm(x, p['wi_gate'])) * mm(x, p['wi_up'])
    return mm(h, p['wo'])
  h = nn.gelu(mm(x, p['wi']) + bias(p['bi']), approximate=True)
  return mm(h, p['wo']) + bias(p['bo'])


def batched_ffn(xe, p, kind):
  """xe: [E, ..., D] -> [E, ..., D], expert e applied to xe[e]."""
  def mm(x, w):
    return jnp.einsum('e...a,eab->e...b', x, w)

  def bias(b):
    return b.reshape(b.shape[:1] + (1,) * (xe.ndim - 2) + b.shape[1:])
  return expert_ffn(xe, p, kind, mm, bias)


def ragged_ffn(xs, ids, group_sizes, p, kind):
  """xs: [N, D] rows sorted by expert id `ids` [N] with `group_sizes` [E_local]."""
  def mm(x, w):
    return jax.lax.ragged_dot(x, w, group_sizes)

  def bias(b):
    return jnp.take(b, ids, axis=0, mode='clip')
  return expert_ffn(xs, p, kind, mm, bias)


def block_size(rows, num_experts):
  """Rows per block of the blocked grouped matmul: a power of two near rows / (2 E), in
  [8, 512]. Each block gathers its expert's weights, so fewer, larger blocks move less memory;
  the padding (< one block per expert, about a quarter of the rows on average) bounds them.
  Measured on 2 CPU cores (S width, 8E2A): 64 rows best at 1024 assignments, 128-256 at 4096."""
  target = max(rows // (2 * num_experts), 8)
  return min(1 << (target.bit_length() - 1), 512)


def block_layout(ids, group_sizes, block):
  """Rows sorted by expert id (ids >= E mark padding rows) -> (destination of each row in a
  buffer of nb * block rows where every expert's group is padded to whole blocks, the expert
  of each block [nb], nb). Padding rows get destination nb * block (out of range)."""
  n, e = ids.shape[0], group_sizes.shape[0]
  nb = -(-n // block) + e  # sum_e ceil(g_e / block) <= ceil(n / block) + E
  padded = (group_sizes + block - 1) // block * block
  padded_end = jnp.cumsum(padded)
  group_start = jnp.cumsum(group_sizes) - group_sizes
  expert = jnp.minimum(ids, e - 1)
  dest = padded_end[expert] - padded[expert] + jnp.arange(n) - group_start[expert]
  dest = jnp.where(ids < e, dest, nb * block)
  block_expert = jnp.searchsorted(padded_end, jnp.arange(nb) * block, side='right')
  return dest, jnp.minimum(block_expert, e - 1), nb


def blocked_ffn(xs, ids, group_sizes, p, kind):
  """Same contract as ragged_ffn, as a batched matmul over blocks of one expert each: rows
  are scattered into per-expert groups padded to whole blocks, each block is multiplied by
  its expert's (gathered) weights, and the rows gathered back. XLA:CPU expands ragged_dot
  into a dense dot over all experts; this does the routed FLOPs plus < one block per expert."""
  block = block_size(xs.shape[0], group_sizes.shape[0])
  dest, block_expert, nb = block_layout(ids, group_sizes, block)
  xb = jnp.zeros((nb * block, xs.shape[-1]), xs.dtype).at[dest].set(xs, mode='drop')

  def mm(x, w):
    return jnp.einsum('nbi,nio->nbo', x, jnp.take(w, block_expert, axis=0))

  def bias(b):
    return jnp.take(b, block_expert, axis=0)[:, None, :]
  yb = expert_ffn(xb.reshape(nb, block, -1), p, kind, mm, bias).reshape(nb * block, -1)
  return jnp.take(yb, dest, axis=0, mode='fill', fill_value=0)


def window_rows(rows, num_experts, factor):
  """Rows of each expert's window (or spill): `factor` x the mean group size, rounded up to a
  multiple of 8 and at most `rows` (a window that large always fits)."""
  return min(-(-math.ceil(factor * rows / num_experts) // 8) * 8, rows)


def spill_rows(rows, num_experts, factor):
  """Rows of the spill of each of the `spill_experts` experts (0: no spill)."""
  return window_rows(rows, num_experts, factor) if factor > 0 else 0


def spill_experts(num_experts):
  """How many overflowing experts the spill takes: a quarter of them, at least 2 (E = 8: 2,
  E = 16: 4), so that it costs the same share of the rows at any E; a step whose windows
  overflow for more experts runs 'blocks'."""
  return min(max(2, num_experts // 4), num_experts)


def _rows_into_windows(xs, first, count, size):
  """Rows first[i] + s of xs into slot s of window i while s < count[i], zeros after:
  [m] first rows and counts -> [m, size, D]."""
  slot = jnp.arange(size)
  src = jnp.minimum(first[:, None] + slot[None], xs.shape[0] - 1)
  return jnp.where((slot[None] < count[:, None])[..., None], jnp.take(xs, src, axis=0), 0)


def windowed_ffn(xs, ids, group_sizes, p, kind, window):
  """Same contract as ragged_ffn for the first `window` rows of every group (later rows come
  back as zeros): each expert's rows are copied into its own window [E, window, D] and all
  experts run as one batched matmul with their own weights (no weight gather, as capacity
  dispatch), then the rows are gathered back into sorted order."""
  n, e = xs.shape[0], group_sizes.shape[0]
  start = jnp.cumsum(group_sizes) - group_sizes
  yw = batched_ffn(_rows_into_windows(xs, start, group_sizes, window), p, kind)  # [E, window, D]
  expert = jnp.minimum(ids, e - 1)
  row = jnp.arange(n) - start[expert]  # each row's place in its group
  inside = (ids < e) & (row < window)
  return jnp.where(inside[:, None], yw[expert, jnp.minimum(row, window - 1)], 0)


def window_route(group_sizes, window, spill):
  """0: every group fits its window; 1: at most `spill_experts` groups overflow it, each by at
  most `spill` rows (the spill takes them); 2: neither (the blocked fallback)."""
  over = jnp.maximum(group_sizes - window, 0)
  spilled = ((jnp.sum(over > 0) <= spill_experts(group_sizes.shape[0]))
             & (jnp.max(over) <= spill))
  return jnp.where(jnp.max(over) == 0, 0, jnp.where(spilled, 1, 2))


def spill_ffn(xs, ids, group_sizes, p, kind, window, spill):
  """The rows past the window of the `spill_experts` most overflowing groups, up to `spill` rows
  each, as one batched matmul over just those experts' (gathered) weights; zeros for every
  other row. windowed_ffn + spill_ffn is exact when window_route(...) <= 1."""
  n, e = xs.shape[0], group_sizes.shape[0]
  m = spill_experts(e)
  start = jnp.cumsum(group_sizes) - group_sizes
  over = jnp.maximum(group_sizes - window, 0)
  chosen = jax.lax.top_k(over, m)[1]  # [m] expert ids
  xw = _rows_into_windows(xs, start[chosen] + window, over[chosen], spill)
  yw = batched_ffn(xw, jax.tree.map(lambda w: jnp.take(w, chosen, axis=0), p), kind)
  expert = jnp.minimum(ids, e - 1)
  which = jnp.full((e,), m, jnp.int32).at[chosen].set(jnp.arange(m, dtype=jnp.int32))[expert]
  row = jnp.arange(n) - start[expert] - window  # place in the spill
  inside = (ids < e) & (which < m) & (row >= 0) & (row < spill)
  return jnp.where(inside[:, None],
                   yw[jnp.minimum(which, m - 1), jnp.clip(row, 0, spill - 1)], 0)


def windows_or_blocks_ffn(xs, ids, group_sizes, p, kind, window, spill=0):
  """windowed_ffn when every group fits its window (balanced routing, the common case), plus
  spill_ffn when a few groups overflow a little, else the blocked grouped matmul: dropless,
  chosen at run time by window_route. Nested conds compute the windows only when they are
  used and the spill only when it is needed. The fallback is rematerialised (jax.checkpoint)
  so that its residuals (the per-block weight gathers) are not kept, and zero-filled, on the
  steps that do not take it."""
  if window >= xs.shape[0]:
    return windowed_ffn(xs, ids, group_sizes, p, kind, window)
  route = window_route(group_sizes, window, spill)
  blocks = jax.checkpoint(lambda xs, p: blocked_ffn(xs, ids, group_sizes, p, kind))

  def windows(xs, p):
    y = windowed_ffn(xs, ids, group_sizes, p, kind, window)
    if not spill:
      return y
    spilled = lambda xs, p: spill_ffn(xs, ids, group_sizes, p, kind, window, spill)
    return y + jax.lax.cond(route == 1, spilled, lambda xs, p: jnp.zeros_like(xs), xs, p)
  return jax.lax.cond(route == 2, blocks, windows, xs, p)


GROUPED_MATMULS = ('windows', 'blocks', 'ragged_dot')


def grouped_ffn(grouped, xs, ids, group_sizes, p, kind, rows, window_factor, spill_factor=0.0):
  """The grouped matmul `grouped` over rows sorted by expert id; `rows` is the expected
  number of real rows (xs may hold padding rows with sentinel ids)."""
  if grouped == 'windows':
    e = group_sizes.shape[0]
    return windows_or_blocks_ffn(xs, ids, group_sizes, p, kind, window_rows(rows, e, window_factor),
                                 spill_rows(rows, e, spill_factor))
  ffn = blocked_ffn if grouped == 'blocks' else ragged_ffn
  return ffn(xs, ids, group_sizes, p, kind)
