"""DDPM epsilon-prediction (Ho et al.) with a linear beta schedule.

One sampler covers both DDPM and DDIM on a respaced timestep grid (Song et al.):
eta = 1 is ancestral DDPM sampling, eta = 0 deterministic DDIM. The loop over
steps is a single compiled `lax.fori_loop`.
"""
import jax
import jax.numpy as jnp
import numpy as np


def linear_alphas_cumprod(num_timesteps, beta_start, beta_end):
  betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  return np.cumprod(1.0 - betas)


def respaced_timesteps(num_timesteps, num_steps):
  """Descending integer timesteps, num_steps of them, from T-1 down to 0."""
  return np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int32)


class DDPM:
  def __init__(self, cfg):
    self.num_timesteps = cfg.get('num_timesteps', 1000)
    self.alphas_cumprod = linear_alphas_cumprod(
        self.num_timesteps, cfg.get('beta_start', 1e-4), cfg.get('beta_end', 2e-2))
    self.clip_x0 = cfg.get('clip_x0', True)  # images live in [-1, 1]

  def loss(self, denoise, x, rng):
    t_rng, n_rng = jax.random.split(rng)
    t = jax.random.randint(t_rng, (x.shape[0],), 0, self.num_timesteps)
    ab = jnp.asarray(self.alphas_cumprod, jnp.float32)[t].reshape(-1, *([1] * (x.ndim - 1)))
    eps = jax.random.normal(n_rng, x.shape, x.dtype)
    x_t = jnp.sqrt(ab) * x + jnp.sqrt(1 - ab) * eps
    pred = denoise(x_t, t.astype(jnp.float32))
    per_example = jnp.mean(jnp.square(pred - eps), axis=tuple(range(1, x.ndim)))
    return jnp.mean(per_example), {'t_mean': jnp.mean(t / self.num_timesteps)}

  def sample(self, denoise, noise, rng, *, num_steps, method='ddim'):
    eta = {'ddpm': 1.0, 'ddim': 0.0}.get(method)
    if eta is None:
      raise ValueError(f'unknown diffusion sampler {method!r}: use ddpm or ddim')
    ts = respaced_timesteps(self.num_timesteps, num_steps)
    ab = self.alphas_cumprod[ts]
    ab_prev = np.append(ab[1:], 1.0)  # the step after t=0 is clean data
    ts, ab, ab_prev = (jnp.asarray(a, jnp.float32) for a in (ts, ab, ab_prev))

    def step(i, x):
      eps = denoise(x, jnp.full((x.shape[0],), ts[i]))
      x0 = (x - jnp.sqrt(1 - ab[i]) * eps) / jnp.sqrt(ab[i])
      if self.clip_x0:
        x0 = jnp.clip(x0, -1, 1)
        eps = (x - jnp.sqrt(ab[i]) * x0) / jnp.sqrt(1 - ab[i])
      x_prev = jnp.sqrt(ab_prev[i]) * x0
      if eta == 0:  # deterministic DDIM: no noise to draw
        return x_prev + jnp.sqrt(1 - ab_prev[i]) * eps
      sigma = eta * jnp.sqrt((1 - ab_prev[i]) / (1 - ab[i]) * (1 - ab[i] / ab_prev[i]))
      z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
      return x_prev + jnp.sqrt(1 - ab_prev[i] - sigma ** 2) * eps + sigma * z

    return jax.lax.fori_loop(0, num_steps, step, noise)
