"""StyleGAN2 residual discriminator (Karras et al. 2020) for the ViT-VQGAN adversarial loss.

NHWC images in [-1, 1], square, a power-of-two side >= 8:
  fromRGB 1x1 conv -> residual blocks halving the side down to 4x4 (channels double from
  `base_channels`, capped at `max_channels`) -> minibatch stddev -> 3x3 conv -> dense -> dense(1).
Each block is  (conv3x3 -> lrelu -> conv3x3 -> lrelu -> blur+down  +  blur+down -> 1x1) / sqrt 2.

Parameters carry the logical names 'conv_h', 'conv_w', 'conv_in', 'conv_out', which are not in
the default axis rules, so sharding.logical_to_mesh replicates them: the network is small (24M
parameters at 256x256 with the defaults, 9M at 32x32) and data parallelism suffices. Plain
He-style initialisation, no equalised learning rate: use a VQGAN-sized Adam learning rate
(~1e-4), not StyleGAN2's 2e-3.
"""
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models import layers

Dtype = Any
CONV_NAMES = ('conv_h', 'conv_w', 'conv_in', 'conv_out')
DENSE_NAMES = ('conv_in', 'conv_out')
LRELU_SLOPE = 0.2
# He init for leaky ReLU(0.2): keeps activations near unit scale through the stack.
he_lrelu = nn.initializers.variance_scaling(2.0 / (1.0 + LRELU_SLOPE ** 2), 'fan_in', 'normal')
BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)  # binomial low-pass


def lrelu(x):
  return nn.leaky_relu(x, LRELU_SLOPE)


def num_blocks(image_size: int) -> int:
  """Residual blocks from `image_size` down to 4x4; ValueError unless a power of two >= 8."""
  if image_size < 8 or image_size & (image_size - 1):
    raise ValueError(f'StyleGANDiscriminator needs a square image whose side is a power of two '
                     f'>= 8 (it halves the side down to 4x4), got side {image_size}')
  return int(math.log2(image_size)) - 2


def block_channels(i: int, base_channels: int, max_channels: int) -> int:
  """Channels after fromRGB (i = 0) and after block i (i >= 1)."""
  return min(base_channels * 2 ** i, max_channels)


def blur_downsample(x):
  """[1,3,3,1] separable low-pass (the outer product / 64, so it sums to 1) with zero padding
  1, then stride 2: [B,H,W,C] -> [B,H/2,W/2,C]. One depthwise conv: it compiles faster (not
  least its double backprop for R1) than the equivalent strided slices."""
  c = x.shape[-1]
  taps = np.asarray(BLUR_TAPS) / sum(BLUR_TAPS)
  kernel = np.broadcast_to(np.outer(taps, taps)[:, :, None, None], (4, 4, 1, c))
  return jax.lax.conv_general_dilated(
      x, jnp.asarray(kernel, x.dtype), window_strides=(2, 2), padding=((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)


def minibatch_stddev(x, group: int, features: int):
  """Appends `features` channels: per group of examples, the stddev over the group of each
  activation, averaged over H, W and the channels of each of `features` channel slices.

  Groups are contiguous runs of g examples (example i is in group i // g), so under
  data-parallel sharding a group stays on one device when the per-device batch divides by g.
  g = min(group, batch), or the whole batch when that does not divide it. Statistics in at
  least float32 (bf16 variance of near-equal values is mostly rounding error).
  """
  b, h, w, c = x.shape
  if features < 1 or c % features:
    raise ValueError(f'minibatch_stddev: {c} channels do not split into {features} features')
  g = min(group, b)
  if g < 1 or b % g:
    g = b
  dt = jnp.promote_types(x.dtype, jnp.float32)
  y = x.astype(dt).reshape(b // g, g, h, w, features, c // features)
  y = y - jnp.mean(y, axis=1, keepdims=True)
  y = jnp.sqrt(jnp.mean(jnp.square(y), axis=1) + 1e-8)  # [b/g, h, w, F, c/F]
  y = jnp.mean(y, axis=(1, 2, 4))                          # [b/g, F]
  y = jnp.broadcast_to(y[:, None, None, None, :], (b // g, g, h, w, features))
  return jnp.concatenate([x, y.reshape(b, h, w, features).astype(x.dtype)], axis=-1)


def _conv(features, kernel, dtype, name, use_bias=True):
  return nn.Conv(features, (kernel, kernel), padding='SAME', use_bias=use_bias, dtype=dtype,
                 name=name, kernel_init=layers.logical(he_lrelu, CONV_NAMES),
                 bias_init=layers.logical(nn.initializers.zeros, CONV_NAMES[-1:]))


class DiscriminatorBlock(nn.Module):
  """Residual block: two 3x3 convs (in -> in -> out) then blur+down, plus a blurred,
  downsampled 1x1 skip; the sum is scaled by 1/sqrt(2) to keep unit variance."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    skip = _conv(self.features, 1, self.dtype, 'skip', use_bias=False)(blur_downsample(x))
    h = lrelu(_conv(x.shape[-1], 3, self.dtype, 'conv0')(x))
    h = lrelu(_conv(self.features, 3, self.dtype, 'conv1')(h))
    return (blur_downsample(h) + skip) * (1.0 / math.sqrt(2.0))


class StyleGANDiscriminator(nn.Module):
  """Real/fake logits [B] for NHWC images [B, S, S, C] in [-1, 1] (S a power of two >= 8).

  The minibatch-stddev layer couples the examples of a group, so call it on the real and the
  fake batch separately (as StyleGAN2 does), not on their concatenation. `mbstd_group <= 0`
  or `mbstd_features <= 0` turns the layer off (then examples are independent).
  Logits are float32 (float64 if `dtype` is float64).
  """
  base_channels: int = 64
  max_channels: int = 512
  mbstd_group: int = 4
  mbstd_features: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
      raise ValueError(f'StyleGANDiscriminator needs square NHWC images [B, S, S, C], got '
                       f'shape {images.shape}')
    blocks = num_blocks(images.shape[1])
    ch = functools.partial(block_channels, base_channels=self.base_channels,
                           max_channels=self.max_channels)
    x = lrelu(_conv(ch(0), 1, self.dtype, 'from_rgb')(images.astype(self.dtype)))
    for i in range(blocks):
      x = DiscriminatorBlock(ch(i + 1), self.dtype, name=f'block{x.shape[1]}')(x)
    if self.mbstd_group > 0 and self.mbstd_features > 0:
      x = minibatch_stddev(x, self.mbstd_group, self.mbstd_features)
    c = ch(blocks)
    x = lrelu(_conv(c, 3, self.dtype, 'epilogue_conv')(x))
    x = x.reshape(x.shape[0], -1)
    x = lrelu(layers.dense(c, DENSE_NAMES, dtype=self.dtype, kernel_init=he_lrelu,
                           name='epilogue_fc')(x))
    out = layers.dense(1, DENSE_NAMES, dtype=self.dtype,
                       kernel_init=nn.initializers.lecun_normal(), name='out')(x)
    return out[:, 0].astype(jnp.promote_types(self.dtype, jnp.float32))


def disc_flops_per_example(image_size, channels, base_channels, max_channels,
                           mbstd_features=1) -> int:
  """Analytic forward conv/matmul FLOPs (2 per multiply-add) of one example.

  Blur (a 16-tap depthwise conv), activations and minibatch stddev are not counted. Pass
  mbstd_features=0 when the model's mbstd layer is off. A discriminator training step costs
  about 3x this per image it sees (real and fake); a lazy-R1 step's double backprop costs
  more again on the real images.
  """
  blocks = num_blocks(image_size)
  ch = functools.partial(block_channels, base_channels=base_channels, max_channels=max_channels)
  flops = 2 * image_size ** 2 * channels * ch(0)  # fromRGB
  res = image_size
  for i in range(blocks):
    cin, cout = ch(i), ch(i + 1)
    flops += 2 * res ** 2 * 9 * cin * cin            # conv0
    flops += 2 * res ** 2 * 9 * cin * cout           # conv1
    flops += 2 * (res // 2) ** 2 * cin * cout        # 1x1 skip after downsampling
    res //= 2
  c = ch(blocks)
  flops += 2 * 16 * 9 * (c + mbstd_features) * c    # epilogue conv on 4x4
  flops += 2 * 16 * c * c + 2 * c                   # epilogue dense and output
  return flops
