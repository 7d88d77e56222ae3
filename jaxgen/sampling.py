"""Sampling toolkit shared by the families: guidance wrappers around a network."""
import jax.numpy as jnp


def classifier_free_guidance(apply_fn, labels, null_label, scale):
  """Wraps apply_fn(z, t, labels) into denoise(z, t) = uncond + scale * (cond - uncond).

  The conditional and unconditional halves run as one doubled batch.
  """
  if scale == 1.0:
    return lambda z, t: apply_fn(z, t, labels)

  def denoise(z, t):
    out = apply_fn(jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                   jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
    cond, uncond = jnp.split(out, 2)
    return uncond + scale * (cond - uncond)

  return denoise


def class_grid_labels(num_classes, per_class):
  """Labels for a grid with one row per class: [0]*per_class + [1]*per_class + ..."""
  return jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), per_class)
