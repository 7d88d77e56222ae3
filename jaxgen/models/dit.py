"""Class-conditional Diffusion Transformer (Peebles & Xie), the backbone DiT-MoE makes sparse.

Patchify -> fixed 2-D sin-cos positions -> N adaLN-Zero blocks conditioned on
c = t_emb + y_emb -> adaLN final layer -> unpatchify. Built from shared layers.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxgen.models import layers, moe as moe_lib


class DiTBlock(nn.Module):
  """adaLN-Zero block; its MLP is a sparse MoE layer when `moe` holds MoE fields.

  With `split` > 0 the first `split` tokens and the rest get separate modulations from c
  (FlexTok's decoder: noised patches, then registers); `mask` passes to the attention."""
  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: bool = False
  moe: Any = None
  mlp_kind: str = 'gelu'
  dtype: Any = jnp.float32
  split: int = 0
  use_bias: bool = True

  def modulation(self, c, x):
    width, length = x.shape[-1], x.shape[1]
    mods = layers.AdaLNModulation(6, dtype=self.dtype, name='adaLN')(c, width)
    if not self.split:
      return mods
    rest = layers.AdaLNModulation(6, dtype=self.dtype, name='adaLN_rest')(c, width)
    widen = lambda m, n: jnp.broadcast_to(m, (m.shape[0], n, width))
    return [jnp.concatenate([widen(a, self.split), widen(b, length - self.split)], axis=1)
            for a, b in zip(mods, rest)]

  @nn.compact
  def __call__(self, x, c, mask=None):
    width = x.shape[-1]
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c, x)
    norm = lambda name: layers.LayerNorm(use_scale=False, dtype=self.dtype, name=name)
    h = layers.modulate(norm('norm1')(x), shift_a, scale_a)
    x = x + gate_a * layers.Attention(self.num_heads, self.qk_norm, self.dtype,
                                      use_bias=self.use_bias, name='attn')(h, mask)
    h = layers.modulate(norm('norm2')(x), shift_m, scale_m)
    hidden = int(width * self.mlp_ratio)
    if self.moe:
      mlp = moe_lib.MoE(expert_hidden=hidden, dtype=self.dtype, name='moe', **self.moe)
    else:
      mlp = layers.Mlp(hidden, self.mlp_kind, self.dtype, use_bias=self.use_bias, name='mlp')
    x = x + gate_m * mlp(h)
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


class DiT(nn.Module):
  """x: [B, H, W, C] noisy input, t: [B] time, labels: [B] ints -> [B, H, W, C]."""
  image_size: int
  channels: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  num_classes: int
  mlp_ratio: float = 4.0
  class_dropout: float = 0.1
  qk_norm: bool = False
  moe: Any = None       # dict of MoE fields (num_experts, top_k, ...) -> DiT-MoE
  moe_every: int = 1    # MoE in blocks 0, e, 2e, ... (the paper: every block)
  mlp_kind: str = 'gelu'  # dense blocks' MLP: 'gelu' (DiT) or 'swiglu'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t, labels, *, train: bool = False):
    p = self.patch_size
    if self.image_size % p:
      raise ValueError(f'image_size {self.image_size} is not divisible by patch_size {p}')
    tokens = layers.patchify(x.astype(self.dtype), p)
    h = layers.dense(self.width, (None, 'embed'), dtype=self.dtype, name='patch_embed')(tokens)
    h = h + layers.sincos_2d_embedding(self.width, self.image_size // p)[None].astype(self.dtype)
    h = nn.with_logical_constraint(h, ('batch', 'length', 'embed'))
    c = layers.TimestepEmbedder(self.width, dtype=self.dtype, name='t_embed')(t)
    c = c + layers.LabelEmbedder(self.num_classes, self.width, self.class_dropout,
                                 name='y_embed')(labels, train).astype(self.dtype)
    for i in range(self.depth):
      block_moe = self.moe if self.moe and i % self.moe_every == 0 else None
      h = DiTBlock(self.num_heads, self.mlp_ratio, self.qk_norm, block_moe, self.mlp_kind,
                   self.dtype, name=f'block{i}')(h, c)
    shift, scale = layers.AdaLNModulation(2, dtype=self.dtype, name='final_adaLN')(c, self.width)
    h = layers.modulate(layers.LayerNorm(use_scale=False, dtype=self.dtype)(h), shift, scale)
    out = layers.dense(p * p * self.channels, ('embed', None), dtype=self.dtype,
                       kernel_init=nn.initializers.zeros, name='final_proj')(h)
    return layers.unpatchify(out, p, self.channels).astype(jnp.float32)


def flops_per_example(*, image_size, patch_size, width, depth, mlp_ratio=4.0, channels=1,
                      moe=None, moe_every=1, mlp_kind='gelu', train=True):
  """Analytic matmul FLOPs (2 per multiply-add) of one example; x3 for a training step.

  MoE blocks count what a token activates: the router, top_k experts and the shared MLP.
  """
  n = (image_size // patch_size) ** 2
  d, hidden = width, int(width * mlp_ratio)
  attn_and_mod = (2 * n * 4 * d * d          # q, k, v, out projections
                  + 2 * 2 * n * n * d        # q.k^T and attention-weighted values
                  + 2 * 6 * d * d)           # adaLN modulation (once per example)
  dense_mlp = 2 * n * (3 if mlp_kind == 'swiglu' else 2) * d * hidden
  num_moe = len(range(0, depth, moe_every)) if moe else 0
  moe_mlp = 0
  if moe:
    _, activated = moe_lib.moe_param_counts(
        d, moe['num_experts'], moe.get('top_k', 2), hidden, moe.get('num_shared', 2),
        moe.get('expert_kind', 'swiglu'))
    moe_mlp = 2 * n * activated  # every activated weight is used once per token
  fwd = (depth * attn_and_mod + (depth - num_moe) * dense_mlp + num_moe * moe_mlp
         + 2 * n * patch_size ** 2 * channels * d     # patch embedding
         + 2 * (256 * d + d * d)                       # timestep MLP
         + 2 * 2 * d * d                               # final adaLN
         + 2 * n * d * patch_size ** 2 * channels)     # final projection
  return 3 * fwd if train else fwd


def inactive_params(*, width, depth, mlp_ratio=4.0, moe=None, moe_every=1):
  """Parameters a token does not touch: the experts beyond top_k in every MoE block."""
  if not moe:
    return 0
  hidden = int(width * mlp_ratio)
  total, activated = moe_lib.moe_param_counts(
      width, moe['num_experts'], moe.get('top_k', 2), hidden, moe.get('num_shared', 2),
      moe.get('expert_kind', 'swiglu'))
  return len(range(0, depth, moe_every)) * (total - activated)
