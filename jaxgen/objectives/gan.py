"""Adversarial losses for the VQGAN tokenizer: non-saturating logistic GAN loss and lazy R1.

`disc_fn(images) -> logits [B]` is the discriminator with its parameters closed over, e.g.
`lambda x: disc.apply({'params': p}, x)`; differentiate the R1 term with respect to `p`.
All losses are float32 scalars (float64 under x64 with float64 inputs).
"""
import jax
import jax.numpy as jnp


def _f32(x):
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def generator_loss(fake_logits):
  """Non-saturating generator loss: mean(softplus(-D(G(z)))) = -mean(log sigmoid(D(G(z))))."""
  return jnp.mean(jax.nn.softplus(-_f32(fake_logits)))


def discriminator_loss(real_logits, fake_logits):
  """Logistic discriminator loss: mean(softplus(-D(x))) + mean(softplus(D(G(z))))."""
  return (jnp.mean(jax.nn.softplus(-_f32(real_logits))) +
          jnp.mean(jax.nn.softplus(_f32(fake_logits))))


def r1_penalty(disc_fn, real_images):
  """R1 = mean_b || d(sum_b' D(x)_b') / d x_b ||^2, the squared L2 norm over each example's
  pixels of the gradient of the logits with respect to the real images (Mescheder et al. 2018).

  Differentiable with respect to whatever `disc_fn` closes over (double backprop). Summing the
  logits gives per-example gradients in one backward pass; with minibatch stddev an example's
  gradient also picks up its group mates' logits, as in StyleGAN2.
  """
  grads = jax.grad(lambda x: jnp.sum(disc_fn(x)))(real_images)
  grads = _f32(grads)
  return jnp.mean(jnp.sum(jnp.square(grads), axis=tuple(range(1, grads.ndim))))


def lazy_r1(disc_fn, real_images, step, every: int, gamma: float):
  """Lazy R1 regularisation (StyleGAN2): gamma/2 * every * R1 when step % every == 0, else 0.

  Scaling by `every` keeps the expected penalty of an R1-every-step run. `step` may be a traced
  int32 scalar; `jax.lax.cond` runs the double backprop only on the scheduled steps.
  """
  if int(every) != every or every < 1:
    raise ValueError(f'lazy_r1: every must be an integer >= 1, got {every}')
  scale = 0.5 * gamma * every

  def on(x):
    return scale * r1_penalty(disc_fn, x)

  def off(x):
    del x
    return jnp.zeros((), jnp.promote_types(real_images.dtype, jnp.float32))

  return jax.lax.cond(jnp.asarray(step) % every == 0, on, off, real_images)
