"""Convolutional KL autoencoder (the LDM / Stable Diffusion VAE, Rombach et al. 2022).

NHWC images in [-1, 1] -> a diagonal Gaussian over a latent grid 2**(len(ch_mult) - 1) times
smaller with `z_channels` channels -> images (unbounded; clip for display).

  Encoder: conv_in -> per level `num_res_blocks` ResBlocks (a stride-2 conv between levels)
           -> mid (ResBlock, single-head spatial self-attention, ResBlock)
           -> GroupNorm, SiLU, conv_out to 2 * z_channels -> 1x1 quant_conv: (mean, logvar)
  Decoder: 1x1 post_quant_conv -> conv_in -> mid -> per level from the coarsest
           `num_res_blocks + 1` ResBlocks (nearest x2 + conv between levels)
           -> GroupNorm, SiLU, conv_out to the image channels
  ResBlock: x + conv(SiLU(GN(conv(SiLU(GN(x)))))), a 1x1 conv on x when channels change.

Conv parameters carry the StyleGAN2 discriminator's logical names, which the default axis
rules leave replicated: the SD VAE has 84M parameters and data parallelism suffices. The
attention is the shared layers.Attention (one head) over the H*W positions.
"""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.models import layers
from jaxgen.models.stylegan_disc import CONV_NAMES

Dtype = Any
LOGVAR_RANGE = (-30.0, 20.0)  # exp(logvar) neither underflows nor overflows in float32


def conv(features, kernel, dtype, name, stride=1, padding='SAME'):
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=padding, dtype=dtype,
                 name=name, kernel_init=layers.logical(nn.initializers.lecun_normal(), CONV_NAMES),
                 bias_init=layers.logical(nn.initializers.zeros, CONV_NAMES[-1:]))


def group_norm(groups, channels, dtype, name):
  """GroupNorm with gcd(groups, channels) groups, so narrow layers still divide evenly."""
  return nn.GroupNorm(num_groups=math.gcd(groups, channels), epsilon=1e-6, dtype=dtype,
                      name=name, scale_init=layers.logical(nn.initializers.ones, ('norm',)),
                      bias_init=layers.logical(nn.initializers.zeros, ('norm',)))


class DiagonalGaussian:
  """N(mean, exp(logvar)) per latent element; logvar is clipped to LOGVAR_RANGE."""

  def __init__(self, mean, logvar):
    self.mean = mean
    self.logvar = jnp.clip(logvar, *LOGVAR_RANGE)

  @property
  def var(self):
    return jnp.exp(self.logvar)

  def sample(self, rng):
    noise = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
    return self.mean + jnp.exp(0.5 * self.logvar) * noise

  def mode(self):
    return self.mean

  def kl(self):
    """KL(q || N(0, I)) summed over each example's latent elements: [B]."""
    terms = self.mean ** 2 + self.var - 1.0 - self.logvar
    return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))


class ResBlock(nn.Module):
  features: int
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    g, dt = self.norm_groups, self.dtype
    h = conv(self.features, 3, dt, 'conv1')(nn.silu(group_norm(g, x.shape[-1], dt, 'norm1')(x)))
    h = conv(self.features, 3, dt, 'conv2')(nn.silu(group_norm(g, self.features, dt, 'norm2')(h)))
    if x.shape[-1] != self.features:
      x = conv(self.features, 1, dt, 'shortcut')(x)
    return x + h


class MidBlock(nn.Module):
  """ResBlock, single-head self-attention over all H*W positions (optional), ResBlock."""
  attention: bool = True
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = ResBlock(c, self.norm_groups, self.dtype, name='block1')(x)
    if self.attention:
      y = group_norm(self.norm_groups, c, self.dtype, 'attn_norm')(x).reshape(b, h * w, c)
      y = layers.Attention(num_heads=1, dtype=self.dtype, name='attn')(y)
      x = x + y.reshape(b, h, w, c)
    return ResBlock(c, self.norm_groups, self.dtype, name='block2')(x)


class Encoder(nn.Module):
  """Images [B, H, W, C] -> moments [B, H/f, W/f, 2 * z_channels], f = 2**(levels - 1)."""
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  z_channels: int
  mid_attention: bool = True
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    g, dt = self.norm_groups, self.dtype
    h = conv(self.ch, 3, dt, 'conv_in')(x)
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = ResBlock(self.ch * mult, g, dt, name=f'down{level}_block{i}')(h)
      if level < len(self.ch_mult) - 1:
        # Pad right and bottom only, then a VALID stride-2 conv: an even side exactly halves.
        h = conv(h.shape[-1], 3, dt, f'down{level}_downsample', stride=2,
                 padding=((0, 1), (0, 1)))(h)
    h = MidBlock(self.mid_attention, g, dt, name='mid')(h)
    h = nn.silu(group_norm(g, h.shape[-1], dt, 'norm_out')(h))
    return conv(2 * self.z_channels, 3, dt, 'conv_out')(h)


class Decoder(nn.Module):
  """Latents [B, h, w, z] -> images [B, h*f, w*f, out_channels]."""
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  out_channels: int
  mid_attention: bool = True
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    g, dt = self.norm_groups, self.dtype
    h = conv(self.ch * self.ch_mult[-1], 3, dt, 'conv_in')(z)
    h = MidBlock(self.mid_attention, g, dt, name='mid')(h)
    for level in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = ResBlock(self.ch * self.ch_mult[level], g, dt, name=f'up{level}_block{i}')(h)
      if level > 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        h = conv(h.shape[-1], 3, dt, f'up{level}_upsample')(h)
    h = nn.silu(group_norm(g, h.shape[-1], dt, 'norm_out')(h))
    return conv(self.out_channels, 3, dt, 'conv_out')(h)


class AutoencoderKL(nn.Module):
  """encode(images) -> (mean, logvar); decode(latents) -> images; __call__ does both.

  Latents are the raw posterior's (no scale factor: the family applies it). Moments, latents,
  KL and images leave the model in float32 whatever the compute dtype.
  """
  channels: int
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 4
  mid_attention: bool = True
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @property
  def downsample_factor(self):
    return 2 ** (len(self.ch_mult) - 1)

  def setup(self):
    trunk = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                 mid_attention=self.mid_attention, norm_groups=self.norm_groups, dtype=self.dtype)
    self.encoder = Encoder(z_channels=self.z_channels, **trunk)
    self.quant_conv = conv(2 * self.z_channels, 1, self.dtype, 'quant_conv')
    self.post_quant_conv = conv(self.z_channels, 1, self.dtype, 'post_quant_conv')
    self.decoder = Decoder(out_channels=self.channels, **trunk)

  def encode(self, images):
    f = self.downsample_factor
    if images.ndim != 4 or images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f'AutoencoderKL downsamples {f}x: it needs NHWC images whose sides '
                       f'divide by {f}, got shape {images.shape}')
    moments = self.quant_conv(self.encoder(images.astype(self.dtype))).astype(jnp.float32)
    posterior = DiagonalGaussian(*jnp.split(moments, 2, axis=-1))
    return posterior.mean, posterior.logvar

  def decode(self, latents):
    h = self.post_quant_conv(latents.astype(self.dtype))
    return self.decoder(h).astype(jnp.float32)

  def __call__(self, images, rng=None, sample=True):
    """dict(recon, mean, logvar, latents, kl [B]); latents are a posterior sample (needs
    `rng`) or, with sample=False, its mean."""
    posterior = DiagonalGaussian(*self.encode(images))
    if sample and rng is None:
      raise ValueError('AutoencoderKL(sample=True) needs an rng for the posterior sample')
    z = posterior.sample(rng) if sample else posterior.mode()
    return dict(recon=self.decode(z), mean=posterior.mean, logvar=posterior.logvar,
                latents=z, kl=posterior.kl())


# ----------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------
def _conv_flops(side, kernel, cin, cout):
  return 2 * side * side * kernel * kernel * cin * cout


def _res_flops(side, cin, cout):
  return (_conv_flops(side, 3, cin, cout) + _conv_flops(side, 3, cout, cout) +
          (_conv_flops(side, 1, cin, cout) if cin != cout else 0))


def _mid_flops(side, c, attention):
  n = side * side
  attn = 2 * n * 4 * c * c + 2 * 2 * n * n * c if attention else 0  # q, k, v, out; QK^T, AV
  return 2 * _res_flops(side, c, c) + attn


def flops_per_example(image_size, channels, ch, ch_mult, num_res_blocks, z_channels,
                      mid_attention=True):
  """Analytic forward conv / attention matmul FLOPs (2 per multiply-add) of encoder + decoder
  for one square image; norms, activations and resampling copies are not counted."""
  side, cin = image_size, ch
  enc = _conv_flops(side, 3, channels, ch)
  for level, mult in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      enc += _res_flops(side, cin, ch * mult)
      cin = ch * mult
    if level < len(ch_mult) - 1:
      side //= 2
      enc += _conv_flops(side, 3, cin, cin)
  enc += _mid_flops(side, cin, mid_attention)
  enc += _conv_flops(side, 3, cin, 2 * z_channels) + _conv_flops(side, 1, 2 * z_channels,
                                                                  2 * z_channels)
  cin = ch * ch_mult[-1]
  dec = _conv_flops(side, 1, z_channels, z_channels) + _conv_flops(side, 3, z_channels, cin)
  dec += _mid_flops(side, cin, mid_attention)
  for level in reversed(range(len(ch_mult))):
    for _ in range(num_res_blocks + 1):
      dec += _res_flops(side, cin, ch * ch_mult[level])
      cin = ch * ch_mult[level]
    if level > 0:
      side *= 2
      dec += _conv_flops(side, 3, cin, cin)
  dec += _conv_flops(side, 3, cin, channels)
  return enc + dec
