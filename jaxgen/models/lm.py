"""Decoder-only Transformer LM with standard or lexinvariant (per-sequence random) embeddings.

Lexinvariant LM (Huang et al., 2023): every sequence gets its own table E ~ N(0, I_d), used
both to embed the tokens and, tied, as the readout, so the model can only tell tokens apart
by how they are used in context. The caller draws the tables (`random_tables`) and passes
them in; `standard` mode learns one table instead. Both modes share everything else: a
learnable scale and bias on the embedding output (the paper's Appendix B), pre-LN blocks
from the shared layers, T5 relative position bias (or RoPE), logits = h . E^T / sqrt(d).
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.models import layers

EMBEDDINGS = ('standard', 'lexinvariant')
POSITIONS = ('t5', 'rope')
TABLES = ('gaussian', 'orthogonal')


def random_tables(keys, vocab_size, width, dtype=jnp.float32, kind='gaussian'):
  """One random embedding table per key: [B] keys -> [B, vocab_size, width].

  gaussian    E ~ N(0, I_d), the paper's table.
  orthogonal  sqrt(d) times V Haar-random orthonormal rows (needs d >= V): the same scale per
              coordinate, but E E^T = d I exactly. At the paper's d = 1024 with 128 characters
              Gaussian rows are nearly orthogonal (|cos| ~ 0.03); at a CPU model's d = V = 128
              they are not (|cos| ~ 0.09, a square table's smallest singular value near 0),
              and the tied readout then blurs every in-context distribution.
  """
  if kind not in TABLES:
    raise ValueError(f'unknown table {kind!r}: use one of {TABLES}')
  if kind == 'gaussian':
    return jax.vmap(lambda k: jax.random.normal(k, (vocab_size, width), dtype))(keys)
  if width < vocab_size:
    raise ValueError(f'orthogonal tables need width >= vocab size, got {width} < {vocab_size}: '
                     'use the gaussian table')

  def orthogonal(key):
    q, r = jnp.linalg.qr(jax.random.normal(key, (width, vocab_size), jnp.float32))
    q = q * jnp.sign(jnp.diagonal(r))  # sign fix: makes Q Haar-distributed
    return (q.T * math.sqrt(width)).astype(dtype)
  return jax.vmap(orthogonal)(keys)


class TransformerLM(nn.Module):
  """tokens [B, L] (and per-sequence tables [B, V, d] if lexinvariant) -> logits [B, L, V].

  decode=True runs incrementally with a KV cache of `max_len` positions (collection
  'cache'): each call appends its L tokens; initialise the cache by calling `init` with
  decode=True and tokens [B, max_len].
  """
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  max_len: int
  embedding: str = 'standard'
  position: str = 't5'
  mlp_kind: str = 'gelu'
  rel_buckets: int = 32
  rel_max_distance: int = 128
  logit_scale_init: float = 1.0  # 1: logits = h.E^T / sqrt(d) (meliad); else a learned scale
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, tables=None, *, decode=False, return_hidden=False):
    if self.position not in POSITIONS:
      raise ValueError(f'unknown position {self.position!r}: use one of {POSITIONS}')
    tables = self._tables(tokens, tables)
    b, n = tokens.shape
    if tables.ndim == 3:
      x = jnp.take_along_axis(tables, tokens[..., None], axis=1)
    else:
      x = jnp.take(tables, tokens, axis=0)
    scale = self.param('embed_scale', layers.logical(nn.initializers.ones, ('norm',)),
                       (self.width,))
    shift = self.param('embed_bias', layers.logical(nn.initializers.zeros, ('norm',)),
                       (self.width,))
    x = x.astype(self.dtype) * scale.astype(self.dtype) + shift.astype(self.dtype)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    start, queries, mask = layers.causal_positions(self, n, decode, self.max_len)
    keys = jnp.arange(self.max_len) if decode else queries
    bias = None
    if self.position == 't5':  # one bias table shared by all layers, as in T5
      bias = layers.RelativePositionBias(self.num_heads, self.rel_buckets,
                                         self.rel_max_distance, name='rel_bias')(queries, keys)
    rope = queries[None] if self.position == 'rope' else None
    for i in range(self.depth):
      x = layers.TransformerBlock(self.num_heads, self.mlp_dim, self.mlp_kind,
                                  dtype=self.dtype, name=f'block{i}')(
          x, mask, bias, rope, decode, start, self.max_len)
    h = layers.LayerNorm(dtype=self.dtype, name='final_norm')(x)
    readout = tables.astype(self.dtype)
    spec = 'bld,bvd->blv' if readout.ndim == 3 else 'bld,vd->blv'
    logits = jnp.einsum(spec, h, readout).astype(jnp.float32) / math.sqrt(self.width)
    if self.logit_scale_init != 1.0:  # a learnable temperature, starting near uniform
      logits = logits * self.param('logit_scale',
                                   nn.initializers.constant(self.logit_scale_init), ())
    return (logits, h) if return_hidden else logits

  def _tables(self, tokens, tables):
    if self.embedding not in EMBEDDINGS:
      raise ValueError(f'unknown embedding {self.embedding!r}: use one of {EMBEDDINGS}')
    if self.embedding == 'standard':
      if tables is not None:
        raise ValueError('standard embeddings are learned: do not pass tables')
      return self.param('embedding', layers.logical(nn.initializers.normal(1.0),
                                                    ('vocab', 'embed')),
                        (self.vocab_size, self.width))
    if tables is None or tables.shape != (tokens.shape[0], self.vocab_size, self.width):
      raise ValueError('lexinvariant embeddings need per-sequence tables '
                       f'[{tokens.shape[0]}, {self.vocab_size}, {self.width}] (random_tables)')
    return tables


def flops_per_token(*, vocab_size, width, depth, mlp_dim, seq_len, mlp_kind='gelu'):
  """Analytic forward matmul FLOPs per token: the blocks (full L x L attention, the usual
  convention) and the readout."""
  blocks = layers.transformer_flops(seq_len, width, depth, mlp_dim, mlp_kind) / seq_len
  return int(blocks) + 2 * width * vocab_size
