"""Shared Linen building blocks: one attention, one MLP, one Transformer block, one adaLN,
the embedders.

Every parameter carries logical axis names ('embed', 'mlp', 'heads', 'kv', ...);
the config's axis rules map them onto the device mesh (see jaxgen/sharding.py).
"""
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
xavier = nn.initializers.xavier_uniform()


def logical(init: Callable, names: Sequence[Optional[str]]) -> Callable:
  return nn.with_logical_partitioning(init, tuple(names))


def dense(features, names, *, dtype, use_bias=True, kernel_init=xavier, name=None):
  """nn.Dense whose kernel (and bias) carry logical axis names."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, name=name,
      kernel_init=logical(kernel_init, names),
      bias_init=logical(nn.initializers.zeros, names[-1:]))


class LayerNorm(nn.Module):
  """LayerNorm with optional affine params (adaLN blocks use none)."""
  use_scale: bool = True
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm(
        epsilon=self.epsilon, use_bias=self.use_scale, use_scale=self.use_scale,
        dtype=self.dtype,
        scale_init=logical(nn.initializers.ones, ('norm',)),
        bias_init=logical(nn.initializers.zeros, ('norm',)))(x)


class Attention(nn.Module):
  """Multi-head self-attention; `mask` broadcasts to [batch, heads, q, k], `bias` (e.g. T5
  relative positions) is added to the logits, `rope_positions` [B or 1, q] rotates q and k.

  With `decode=True` keys and values go to a 'cache' collection of `cache_len` slots: the
  call writes its q tokens at `cache_index` and attends over all slots (the caller's mask
  hides the empty and future ones). Projections are explicit [embed, heads, kv] tensors (not
  DenseGeneral) so their logical names hold for the stored shape. `use_bias=False` drops the
  q/k/v/out biases (FlexTok's blocks have none).
  """
  num_heads: int
  qk_norm: bool = False
  dtype: Dtype = jnp.float32
  use_bias: bool = True

  def _proj(self, name, x, head_dim):
    d = x.shape[-1]
    w = self.param(name + '_kernel', logical(xavier_fan(d, d), ('embed', 'heads', 'kv')),
                   (d, self.num_heads, head_dim))
    y = jnp.einsum('bld,dhk->blhk', x, w.astype(self.dtype))
    if not self.use_bias:
      return y
    b = self.param(name + '_bias', logical(nn.initializers.zeros, ('heads', 'kv')),
                   (self.num_heads, head_dim))
    return y + b.astype(self.dtype)

  @nn.compact
  def __call__(self, x, mask=None, bias=None, *, rope_positions=None, decode=False,
               cache_index=None, cache_len=None):
    d = x.shape[-1]
    head_dim = d // self.num_heads
    q, k, v = (self._proj(n, x, head_dim) for n in ('query', 'key', 'value'))
    if self.qk_norm:  # stabilises large models (DiT-MoE XL/G)
      q = LayerNorm(dtype=self.dtype, name='q_norm')(q)
      k = LayerNorm(dtype=self.dtype, name='k_norm')(k)
    if rope_positions is not None:
      q, k = apply_rope(q, rope_positions), apply_rope(k, rope_positions)
    if decode:
      k, v = self._update_cache(k, v, cache_index, cache_len)
    q = nn.with_logical_constraint(q, ('batch', 'length', 'heads', 'kv'))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(head_dim)
    if bias is not None:
      logits = logits + bias.astype(logits.dtype)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    # Softmax in f32 even under bf16 compute.
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    w = self.param('out_kernel', logical(xavier_fan(d, d), ('heads', 'kv', 'embed')),
                   (self.num_heads, head_dim, d))
    out = jnp.einsum('blhk,hkd->bld', out, w.astype(self.dtype))
    if not self.use_bias:
      return out
    b = self.param('out_bias', logical(nn.initializers.zeros, ('embed',)), (d,))
    return out + b.astype(self.dtype)

  def _update_cache(self, k, v, index, length):
    """Writes k, v [B, q, H, D] into the cache at `index`; returns the whole cache."""
    shape = (k.shape[0], length, *k.shape[2:])
    names = ('batch', 'length', 'heads', 'kv')
    ck = self.variable('cache', 'key', jnp.zeros, shape, k.dtype)
    cv = self.variable('cache', 'value', jnp.zeros, shape, v.dtype)
    at = (0, index, 0, 0)
    ck.value = nn.with_logical_constraint(jax.lax.dynamic_update_slice(ck.value, k, at), names)
    cv.value = nn.with_logical_constraint(jax.lax.dynamic_update_slice(cv.value, v, at), names)
    return ck.value, cv.value


def apply_rope(x, positions, max_wavelength=10000.0):
  """Rotary position embedding of x [B, L, H, D] at integer `positions` [B or 1, L]
  (rotates the two halves of the head dimension as pairs)."""
  half = x.shape[-1] // 2
  freqs = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[..., None, None].astype(jnp.float32) * freqs  # [B, L, 1, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def t5_relative_buckets(relative_position, *, num_buckets=32, max_distance=128,
                        bidirectional=False):
  """T5's bucket of each (key - query) offset: exact for small distances, log-spaced up to
  max_distance, one bucket beyond. Causal (bidirectional=False) folds future offsets to 0."""
  n = -relative_position
  buckets = 0
  if bidirectional:
    num_buckets //= 2
    buckets = (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  large = max_exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) /
                       math.log(max_distance / max_exact) * (num_buckets - max_exact))
  large = jnp.minimum(large.astype(jnp.int32), num_buckets - 1)
  return buckets + jnp.where(n < max_exact, n, large)


class RelativePositionBias(nn.Module):
  """T5 relative position bias: a learned scalar per (bucket, head), [1, H, q, k]."""
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = False

  @nn.compact
  def __call__(self, query_positions, key_positions):
    table = self.param('embedding', logical(nn.initializers.normal(0.1), (None, 'heads')),
                       (self.num_buckets, self.num_heads))
    buckets = t5_relative_buckets(key_positions[None, :] - query_positions[:, None],
                                  num_buckets=self.num_buckets, max_distance=self.max_distance,
                                  bidirectional=self.bidirectional)
    # A one-hot matmul, not a gather: the gather's gradient is a scatter-add of q*k values
    # into a tiny table, which was 3x slower than the whole rest of a CPU training step.
    one_hot = jax.nn.one_hot(buckets, self.num_buckets, dtype=table.dtype)
    return jnp.einsum('qkn,nh->hqk', one_hot, table)[None]


def xavier_fan(fan_in, fan_out):
  """Xavier-uniform for a reshaped matrix: the fans of the [fan_in, fan_out] linear map."""
  def init(key, shape, dtype=jnp.float32):
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -limit, limit)
  return init


class Mlp(nn.Module):
  """Transformer MLP: GELU(tanh) two-layer (biases unless `use_bias=False`), or SwiGLU
  (gate * up, never biases)."""
  hidden: int
  kind: str = 'gelu'
  dtype: Dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    if self.kind == 'gelu':
      h = nn.gelu(dense(self.hidden, ('embed', 'mlp'), dtype=self.dtype,
                        use_bias=self.use_bias, name='fc1')(x), approximate=True)
    elif self.kind == 'swiglu':
      gate = dense(self.hidden, ('embed', 'mlp'), dtype=self.dtype, use_bias=False, name='gate')(x)
      up = dense(self.hidden, ('embed', 'mlp'), dtype=self.dtype, use_bias=False, name='up')(x)
      h = nn.silu(gate) * up
    else:
      raise ValueError(f'unknown MLP kind {self.kind!r}: use gelu or swiglu')
    h = nn.with_logical_constraint(h, ('batch', 'length', 'mlp'))
    return dense(d, ('mlp', 'embed'), dtype=self.dtype,
                 use_bias=self.kind == 'gelu' and self.use_bias, name='fc2')(h)


class TransformerBlock(nn.Module):
  """Pre-LN Transformer block: x + Attention(LN(x)), then x + Mlp(LN(x)).

  Used by the LM, the ViT tokenizer and the AR image model; `mask`, `bias`, RoPE and the KV
  cache pass through to Attention. `dropout` applies to both residual branches in training
  (needs a 'dropout' rng). `use_bias=False` removes the attention and GELU-MLP biases,
  `norm_affine=False` the two LayerNorms' scale and bias (FlexTok's plain pre-norms).
  """
  num_heads: int
  mlp_dim: int
  mlp_kind: str = 'gelu'
  qk_norm: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  use_bias: bool = True
  norm_affine: bool = True

  @nn.compact
  def __call__(self, x, mask=None, bias=None, rope_positions=None, decode=False,
               cache_index=None, cache_len=None, train=False):
    drop = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0)
    h = LayerNorm(self.norm_affine, dtype=self.dtype, name='norm1')(x)
    x = x + drop(Attention(self.num_heads, self.qk_norm, dtype=self.dtype,
                           use_bias=self.use_bias, name='attn')(
        h, mask, bias, rope_positions=rope_positions, decode=decode, cache_index=cache_index,
        cache_len=cache_len))
    h = LayerNorm(self.norm_affine, dtype=self.dtype, name='norm2')(x)
    x = x + drop(Mlp(self.mlp_dim, self.mlp_kind, self.dtype, self.use_bias, name='mlp')(h))
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


def causal_positions(module, n, decode, max_len):
  """(start, query positions [n], causal mask [1, 1, n, keys]) for n new tokens.

  With decode=True the keys are the `max_len` slots of a KV cache whose next free position is
  the 'cache' variable 'index' of `module` (left at 0 by `init`), advanced by n; the mask
  also hides the empty slots."""
  if decode:
    index = module.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
    start, keys = index.value, jnp.arange(max_len)
    index.value = start + n
  else:
    start, keys = 0, jnp.arange(n)
  queries = start + jnp.arange(n)
  return start, queries, (keys[None, :] <= queries[:, None])[None, None]


def transformer_flops(num_tokens, width, depth, mlp_dim, mlp_kind='gelu'):
  """Analytic forward matmul FLOPs of `depth` TransformerBlocks over `num_tokens` tokens:
  q/k/v/out projections, full attention (QK^T and AV) and the MLP."""
  mlp_mats = 3 if mlp_kind == 'swiglu' else 2
  per_token = 2 * 4 * width * width + 2 * mlp_mats * width * mlp_dim + 2 * 2 * num_tokens * width
  return depth * num_tokens * per_token


class AdaLNModulation(nn.Module):
  """adaLN-Zero: SiLU(c) -> Linear to `num` modulation vectors, zero-initialised."""
  num: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, c, width):
    mods = dense(self.num * width, ('embed', 'mlp'), dtype=self.dtype,
                 kernel_init=nn.initializers.zeros, name='proj')(nn.silu(c))
    return jnp.split(mods[:, None, :], self.num, axis=-1)


def modulate(x, shift, scale):
  return x * (1 + scale) + shift


def timestep_features(t, dim, max_period=10000.0):
  """Sinusoidal features of (possibly fractional) timesteps t: [B] -> [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
  """Sinusoidal features -> MLP (SiLU) -> width."""
  width: int
  freq_dim: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    init = nn.initializers.normal(0.02)
    h = dense(self.width, (None, 'embed'), dtype=self.dtype, kernel_init=init, name='fc1')(
        timestep_features(t, self.freq_dim))
    return dense(self.width, ('mlp', 'embed'), dtype=self.dtype, kernel_init=init,
                 name='fc2')(nn.silu(h))


class LabelEmbedder(nn.Module):
  """Class embedding with an extra 'null' row used for classifier-free guidance.

  During training a `dropout` share of labels is replaced by the null class;
  samplers pass label == num_classes for the unconditional branch.
  """
  num_classes: int
  width: int
  dropout: float = 0.1

  @nn.compact
  def __call__(self, labels, train: bool):
    table = self.param('embedding', logical(nn.initializers.normal(0.02), ('vocab', 'embed')),
                       (self.num_classes + int(self.dropout > 0), self.width))
    if train and self.dropout > 0:
      drop = jax.random.bernoulli(self.make_rng('dropout'), self.dropout, labels.shape)
      labels = jnp.where(drop, self.num_classes, labels)
    return jnp.take(table, labels, axis=0)


def sincos_2d_embedding(width: int, grid: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding, [grid*grid, width] (MAE/DiT layout)."""
  if width % 4:
    raise ValueError(f'sin-cos 2-D position embedding needs width % 4 == 0, got {width}')
  coords = np.arange(grid, dtype=np.float64)
  gy, gx = np.meshgrid(coords, coords, indexing='ij')
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))

  def one_axis(pos):
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  # First half of the channels encodes the column (x), second half the row (y).
  return np.concatenate([one_axis(gx), one_axis(gy)], axis=1).astype(np.float32)


def patchify(x, p):
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x, p, channels):
  b, n, _ = x.shape
  g = int(round(math.sqrt(n)))
  x = x.reshape(b, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * p, g * p, channels)
