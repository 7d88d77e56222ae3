"""ViT-VQGAN tokenizer (Yu et al., 2022): ViT encoder, factorized l2-normalised codebook,
ViT decoder with a tanh MLP output head that emits logit-Laplace (mu, log b) per pixel.

  images [B, H, W, C] in [-1, 1] -> patches -> encoder -> linear down to `code_dim`
  -> l2-normalise -> nearest code by cosine -> straight-through -> linear up -> decoder
  -> per-token head -> mu, log_b [B, H, W, C]; the reconstruction is the logit-Laplace mean.

`code_dim = width` with `l2_normalize=False` is plain VQ (Euclidean nearest neighbour), the
paper's Table 4 baseline.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.models import layers
from jaxgen.objectives import logit_laplace


def l2_normalize(x, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def nearest_codes(z, codebook, l2):
  """Code indices [...] for vectors z [..., D]: cosine argmax (l2) or Euclidean argmin."""
  if l2:
    return jnp.argmax(jnp.einsum('...d,kd->...k', l2_normalize(z), l2_normalize(codebook)), -1)
  dist = (jnp.sum(z * z, -1, keepdims=True) - 2 * jnp.einsum('...d,kd->...k', z, codebook)
          + jnp.sum(codebook * codebook, -1))
  return jnp.argmin(dist, -1)


def restart_dead_codes(codebook, z, codes, rng, l2):
  """Codebook [K, D] with every code that no token of the batch chose moved onto an encoder
  output z [..., D] of the batch drawn at random (dead codes get no gradient, so without a
  restart they stay dead). With l2 codes the new rows get the live rows' mean norm, so that
  Adam's fixed-size steps turn them as fast as the others."""
  k = codebook.shape[0]
  z = z.reshape(-1, z.shape[-1]).astype(codebook.dtype)
  dead = jnp.bincount(codes.reshape(-1), length=k) == 0
  new = z[jax.random.randint(rng, (k,), 0, z.shape[0])]
  if l2:
    norms = jnp.linalg.norm(codebook, axis=-1)
    live_norm = jnp.sum(jnp.where(dead, 0.0, norms)) / jnp.maximum(jnp.sum(~dead), 1)
    new = l2_normalize(new) * live_norm
  return jnp.where(dead[:, None], new, codebook)


class Quantizer(nn.Module):
  """Codebook learned by gradient (no EMA): codebook loss ||sg(z) - e||^2 and commitment
  ||z - sg(e)||^2 (the caller weights it by beta); straight-through z + sg(e - z)."""
  codebook_size: int
  code_dim: int
  l2_normalize: bool = True

  def setup(self):
    self.codebook = self.param('codebook', layers.logical(nn.initializers.normal(1.0),
                                                          ('vocab', None)),
                               (self.codebook_size, self.code_dim))

  def lookup(self, codes):
    e = self.codebook[codes]
    return l2_normalize(e) if self.l2_normalize else e

  def __call__(self, z):
    z = z.astype(jnp.float32)
    if self.l2_normalize:
      z = l2_normalize(z)
    codes = nearest_codes(z, self.codebook, self.l2_normalize)
    e = self.lookup(codes)
    codebook_loss = jnp.mean(jnp.sum((jax.lax.stop_gradient(z) - e) ** 2, -1))
    commitment = jnp.mean(jnp.sum((z - jax.lax.stop_gradient(e)) ** 2, -1))
    quantized = z + jax.lax.stop_gradient(e - z)
    return quantized, codes, dict(codebook_loss=codebook_loss, commitment=commitment)


class ViT(nn.Module):
  """Tokens [B, N, Din] -> linear to width + learned position embedding -> blocks -> LN."""
  num_tokens: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.dense(self.width, (None, 'embed'), dtype=self.dtype, name='embed')(x)
    pos = self.param('pos_embedding', layers.logical(nn.initializers.normal(0.02),
                                                     (None, 'embed')),
                     (self.num_tokens, self.width))
    x = x + pos.astype(self.dtype)
    for i in range(self.depth):
      x = layers.TransformerBlock(self.num_heads, self.mlp_dim, dtype=self.dtype,
                                  name=f'block{i}')(x)
    return layers.LayerNorm(dtype=self.dtype, name='norm')(x)


class VitVQGAN(nn.Module):
  """Encoder / quantizer / decoder; `enc` and `dec` are dicts of ViT fields (width, depth,
  num_heads, mlp_dim)."""
  image_size: int
  channels: int
  patch_size: int
  enc: Any
  dec: Any
  codebook_size: int = 8192
  code_dim: int = 32
  l2_normalize: bool = True
  head_dim: int = 0  # hidden width of the output head's tanh MLP; 0: the decoder width
  dtype: Any = jnp.float32

  def setup(self):
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size {self.image_size} is not divisible by patch_size '
                       f'{self.patch_size}')
    n = self.num_tokens
    self.encoder = ViT(n, **dict(self.enc), dtype=self.dtype)
    self.to_code = layers.dense(self.code_dim, ('embed', None), dtype=jnp.float32)
    self.quantizer = Quantizer(self.codebook_size, self.code_dim, self.l2_normalize)
    self.decoder = ViT(n, **dict(self.dec), dtype=self.dtype)
    p2c = self.patch_size ** 2 * self.channels
    self.head_hidden = layers.dense(self.head_dim or self.dec['width'], ('embed', 'mlp'),
                                    dtype=self.dtype)
    self.head_out = layers.dense(2 * p2c, ('mlp', None), dtype=self.dtype)

  @property
  def num_tokens(self):
    return (self.image_size // self.patch_size) ** 2

  def encoder_outputs(self, images):
    """The encoder's vectors before quantisation, [B, N, code_dim] (float32)."""
    x = layers.patchify(images.astype(self.dtype), self.patch_size)
    return self.to_code(self.encoder(x).astype(jnp.float32))

  def encode(self, images):
    """-> (straight-through code vectors [B, N, code_dim], codes [B, N], VQ losses)."""
    return self.quantizer(self.encoder_outputs(images))

  def decode(self, quantized):
    """Code vectors [B, N, code_dim] -> (mu, log_b) [B, H, W, C] of the logit-Laplace."""
    h = self.decoder(quantized.astype(self.dtype))
    # The paper's output head: a 2-layer MLP with tanh in the middle, per token to a patch.
    out = self.head_out(jnp.tanh(self.head_hidden(h))).astype(jnp.float32)
    out = layers.unpatchify(out, self.patch_size, 2 * self.channels)
    return jnp.split(out, 2, axis=-1)

  def decode_codes(self, codes):
    """Codes [B, N] -> reconstructions [B, H, W, C] in [-1, 1]."""
    mu, _ = self.decode(self.quantizer.lookup(codes))
    return logit_laplace.mean_image(mu)

  def __call__(self, images):
    quantized, codes, vq = self.encode(images)
    mu, log_b = self.decode(quantized)
    return dict(recon=logit_laplace.mean_image(mu), mu=mu, log_b=log_b, codes=codes, **vq)


def vit_params(num_tokens, in_dim, width, depth, mlp_dim):
  """Parameter count of one ViT (embedding, positions, blocks, final LN), computed."""
  block = 4 * (width * width + width) + 2 * width * mlp_dim + mlp_dim + width + 4 * width
  return in_dim * width + width + num_tokens * width + depth * block + 2 * width


def flops_per_example(*, image_size, channels, patch_size, enc, dec, code_dim, codebook_size,
                      head_dim=0):
  """Analytic forward matmul FLOPs of one image through encoder, lookup, decoder and head."""
  n = (image_size // patch_size) ** 2
  p2c = patch_size ** 2 * channels
  head = head_dim or dec['width']
  flops = layers.transformer_flops(n, enc['width'], enc['depth'], enc['mlp_dim'])
  flops += layers.transformer_flops(n, dec['width'], dec['depth'], dec['mlp_dim'])
  flops += 2 * n * (p2c * enc['width'] + enc['width'] * code_dim + code_dim * codebook_size
                    + code_dim * dec['width'] + dec['width'] * head + head * 2 * p2c)
  return flops
