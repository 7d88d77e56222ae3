"""REPA (Yu et al., 2024): representation alignment of a generator's hidden states.

An early block's patch tokens, through a small MLP projector, are pulled towards a frozen
feature network's features of the clean image at the same positions: the loss is the
negative cosine similarity, averaged over patches and examples. FlexTok uses it on its flow
decoder with DINOv2-L; any `jaxgen.metrics.perceptual` network's feature maps can serve
(offline default: the Fashion-MNIST classifier's).
"""
import jax.numpy as jnp

from jaxgen.errors import UserError


def pool_to_patches(maps, grid):
  """Feature maps [B, H, W, F] -> [B, grid * grid, F], average-pooled to the patch grid
  in row-major order (as `layers.patchify` orders patches)."""
  b, h, w, f = maps.shape
  if h % grid or w % grid:
    raise UserError(f'REPA: a {h}x{w} feature map does not pool to the {grid}x{grid} patch '
                    'grid; pick another --config.repa.tap')
  pooled = maps.reshape(b, grid, h // grid, grid, w // grid, f).mean(axis=(2, 4))
  return pooled.reshape(b, grid * grid, f)


def alignment(projected, target, eps=1e-6):
  """Mean cosine similarity of projected [B, P, F] and target [B, P, F] features (the REPA
  loss is its negative)."""
  projected, target = projected.astype(jnp.float32), target.astype(jnp.float32)
  norm = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
  return jnp.mean(jnp.sum(norm(projected) * norm(target), axis=-1))
