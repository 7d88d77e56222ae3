"""FlexTok (Bachmann et al., 2025): an image's VAE latent resampled into an ordered sequence of
1..N discrete register tokens, decoded by a rectified-flow Transformer from any prefix.

  latent [B, h, w, c] -> 2x2 patches [B, P, 4c]
  encoder: [patches; N learned registers] with the causal_last mask (patches see patches,
           register i sees every patch and registers 0..i) -> registers -> linear -> FSQ
  decoder: [noised patches; embedded codes] in one sequence, adaLN-Zero time conditioning
           with separate modulations for patches and registers -> velocity of the patches

Registers past keep_k are replaced by a learned mask token (nested dropout: the order is
coarse to fine), and for classifier-free guidance all registers by a learned null token.
Blocks follow the paper: pre-norm without affine, QK-norm, SwiGLU of hidden 2*4d/3, no biases.
"""
from typing import Any, Tuple

import flax.linen as nn
import jax.numpy as jnp

from jaxgen.models import dit, fsq as fsq_lib, layers, registers as reg_lib


def swiglu_hidden(width):
  """The paper's SwiGLU hidden size int(2 * 4d / 3): the FLOPs of a 4d GELU MLP."""
  return int(width * (8 / 3))


def _embed(module, x, width, num_tokens, dtype, name):
  """Linear (no bias) to width plus a learned position embedding per token."""
  h = layers.dense(width, (None, 'embed'), dtype=dtype, use_bias=False, name=name)(x)
  pos = module.param(name + '_pos', layers.logical(nn.initializers.normal(0.02),
                                                   (None, 'embed')), (num_tokens, width))
  return h + pos.astype(dtype)


class Encoder(nn.Module):
  """Latent patches [B, P, patch_dim] -> (FSQ codes [B, N, dim] straight-through, ids [B, N])."""
  num_patches: int
  num_registers: int
  width: int
  depth: int
  num_heads: int
  levels: Tuple[int, ...]
  fsq_init_std: float = 0.01
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, patches):
    b, p, n = patches.shape[0], self.num_patches, self.num_registers
    h = _embed(self, patches.astype(self.dtype), self.width, p, self.dtype, 'patch_embed')
    regs = self.param('registers', layers.logical(nn.initializers.normal(0.02),
                                                  (None, 'embed')), (n, self.width))
    x = jnp.concatenate([h, jnp.broadcast_to(regs.astype(self.dtype), (b, n, self.width))], 1)
    mask = jnp.asarray(reg_lib.causal_last_mask(p, n))[None, None]
    for i in range(self.depth):
      x = layers.TransformerBlock(
          self.num_heads, swiglu_hidden(self.width), mlp_kind='swiglu', qk_norm=True,
          dtype=self.dtype, use_bias=False, norm_affine=False, name=f'block{i}')(x, mask)
    x = layers.LayerNorm(use_scale=False, dtype=self.dtype, name='norm')(x[:, p:])
    fsq = fsq_lib.FSQ(self.levels)
    # Small init keeps FSQ's tanh in its linear range at the start. With the default
    # (xavier) init the register outputs' shared component saturates whole channels within
    # 150 steps (the flow loss first rewards constant codes) and tanh' ~ 0 keeps them dead:
    # the Fashion-MNIST demo then used 4.4% of its codes after 2500 steps (perplexity 18.5);
    # with 0.01, 9.2% after 600 (perplexity 28).
    z = layers.dense(fsq.dim, ('embed', None), dtype=jnp.float32, use_bias=False,
                     kernel_init=nn.initializers.normal(self.fsq_init_std),
                     name='to_fsq')(x.astype(jnp.float32))
    return fsq(z)


class Decoder(nn.Module):
  """Rectified-flow velocity of noised latent patches z_t [B, P, patch_dim] at times t [B],
  conditioned on register codes [B, N, dim]; keep_k [B] (None: all) masks registers past
  it, and rows with null [B] True see only null tokens (CFG's unconditional branch)."""
  num_patches: int
  num_registers: int
  patch_dim: int
  width: int
  depth: int
  num_heads: int
  repa_layer: int = -1  # sow this block's projected patch features for REPA (-1: none)
  repa_dim: int = 0  # the frozen feature network's channels (the projector's output)
  repa_hidden: int = 2048
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z_t, t, codes, keep_k=None, null=None):
    p, n, d = self.num_patches, self.num_registers, self.width
    token = lambda name: self.param(name, layers.logical(nn.initializers.normal(0.02),
                                                         ('embed',)), (d,))
    mask_token, null_token = token('mask_token'), token('null_token')
    regs = _embed(self, codes.astype(self.dtype), d, n, self.dtype, 'register_embed')
    if keep_k is not None:
      regs = reg_lib.nested_dropout(regs, keep_k, mask_token)
    if null is not None:
      regs = reg_lib.null_condition(regs, null, null_token)
    h = _embed(self, z_t.astype(self.dtype), d, p, self.dtype, 'patch_embed')
    x = nn.with_logical_constraint(jnp.concatenate([h, regs], 1), ('batch', 'length', 'embed'))
    c = layers.TimestepEmbedder(d, dtype=self.dtype, name='t_embed')(t)
    for i in range(self.depth):
      x = dit.DiTBlock(self.num_heads, 8 / 3, qk_norm=True, mlp_kind='swiglu',
                       dtype=self.dtype, split=p, use_bias=False, name=f'block{i}')(x, c)
      if i == self.repa_layer and self.repa_dim:
        self.sow('intermediates', 'repa_features', self._project(x[:, :p]))
    shift, scale = layers.AdaLNModulation(2, dtype=self.dtype, name='final_adaLN')(c, d)
    h = layers.modulate(layers.LayerNorm(use_scale=False, dtype=self.dtype)(x[:, :p]),
                        shift, scale)
    out = layers.dense(self.patch_dim, ('embed', None), dtype=self.dtype, use_bias=False,
                       kernel_init=nn.initializers.zeros, name='final_proj')(h)
    return out.astype(jnp.float32)

  def _project(self, h):
    """REPA's projector: a 3-layer SiLU MLP from the decoder's width to the feature net's."""
    axes = (('embed', 'mlp'), ('mlp', None), (None, None))
    for i, width in enumerate((self.repa_hidden, self.repa_hidden, self.repa_dim)):
      if i:
        h = nn.silu(h)
      h = layers.dense(width, axes[i], dtype=self.dtype, name=f'repa_proj{i}')(h)
    return h.astype(jnp.float32)


class FlexTok(nn.Module):
  """Encoder + decoder; `enc` and `dec` are dicts of width, depth, num_heads."""
  num_patches: int
  patch_dim: int
  num_registers: int
  levels: Tuple[int, ...]
  enc: Any
  dec: Any
  repa_layer: int = -1
  repa_dim: int = 0
  repa_hidden: int = 2048
  dtype: Any = jnp.float32

  def setup(self):
    self.encoder = Encoder(self.num_patches, self.num_registers, levels=self.levels,
                           dtype=self.dtype, **dict(self.enc))
    self.decoder = Decoder(self.num_patches, self.num_registers, self.patch_dim,
                           repa_layer=self.repa_layer, repa_dim=self.repa_dim,
                           repa_hidden=self.repa_hidden, dtype=self.dtype, **dict(self.dec))

  def encode(self, patches):
    return self.encoder(patches)

  def decode(self, z_t, t, codes, keep_k=None, null=None):
    return self.decoder(z_t, t, codes, keep_k, null)

  def __call__(self, patches, t):
    codes, _ = self.encode(patches)
    return self.decode(patches, t, codes)


def flops_per_example(*, num_patches, patch_dim, num_registers, enc, dec, fsq_dim):
  """Analytic forward matmul FLOPs of one encoder pass and one decoder pass (the decoder
  runs once per training step and once per sampler step)."""
  n = num_patches + num_registers
  enc_f = layers.transformer_flops(n, enc['width'], enc['depth'],
                                   swiglu_hidden(enc['width']), 'swiglu')
  enc_f += 2 * (num_patches * patch_dim * enc['width'] + num_registers * enc['width'] * fsq_dim)
  w = dec['width']
  dec_f = layers.transformer_flops(n, w, dec['depth'], swiglu_hidden(w), 'swiglu')
  dec_f += 2 * dec['depth'] * 2 * 6 * w * w  # two adaLN modulations per block
  dec_f += 2 * (num_patches * patch_dim * w * 2 + num_registers * fsq_dim * w
                + 256 * w + w * w + 2 * w * w)
  return enc_f, dec_f
