"""Rectified flow: z_t = (1 - t) x + t eps, the model predicts v = eps - x.

Training draws t from a logit-normal; sampling integrates dz/dt = v from t = 1
(noise) to t = 0 (data) with Euler or Heun, the whole loop compiled as one
`lax.fori_loop`. `denoise(z, t_model)` is the network (with CFG already folded in).
"""
import jax
import jax.numpy as jnp


class RectifiedFlow:
  def __init__(self, cfg):
    self.time_scale = cfg.get('time_scale', 1.0)  # the reference feeds t in [0, 1] unscaled
    self.logit_mean = cfg.get('logit_mean', 0.0)
    self.logit_std = cfg.get('logit_std', 1.0)

  def sample_t(self, rng, n):
    return jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(rng, (n,)))

  def loss(self, denoise, x, rng):
    t_rng, n_rng = jax.random.split(rng)
    t = self.sample_t(t_rng, x.shape[0])
    eps = jax.random.normal(n_rng, x.shape, x.dtype)
    tb = t.reshape(-1, *([1] * (x.ndim - 1)))
    z = (1 - tb) * x + tb * eps
    v = denoise(z, t * self.time_scale)
    per_example = jnp.mean(jnp.square(v - (eps - x)), axis=tuple(range(1, x.ndim)))
    return jnp.mean(per_example), {'t_mean': jnp.mean(t)}

  def velocity(self, denoise, z, t):
    return denoise(z, jnp.full((z.shape[0],), t * self.time_scale, jnp.float32))

  def sample(self, denoise, noise, rng, *, num_steps, method='euler', state=None):
    """Integrate from noise at t=1 to data at t=0 in `num_steps` uniform steps.

    Heun corrects every step but the last (its endpoint t=0 is outside the model's
    training range), so it costs 2 * num_steps - 1 network evaluations. With `state` (e.g.
    adaptive projected guidance's momentum buffer) the loop is Euler and carries it:
    denoise(z, t, state) -> (v, state).
    """
    del rng  # deterministic ODE
    if method not in ('euler', 'heun'):
      raise ValueError(f'unknown flow sampler {method!r}: use euler or heun')
    dt = 1.0 / num_steps
    if state is not None:
      def stateful_euler(i, carry):
        z, s = carry
        t = jnp.full((z.shape[0],), (1.0 - i * dt) * self.time_scale, jnp.float32)
        v, s = denoise(z, t, s)
        return z - dt * v, s

      return jax.lax.fori_loop(0, num_steps, stateful_euler, (noise, state))[0]

    def euler(i, z):
      return z - dt * self.velocity(denoise, z, 1.0 - i * dt)

    def heun(i, z):
      t = 1.0 - i * dt
      v = self.velocity(denoise, z, t)
      v_next = self.velocity(denoise, z - dt * v, t - dt)
      return z - dt * 0.5 * (v + v_next)

    if method == 'euler':
      return jax.lax.fori_loop(0, num_steps, euler, noise)
    return euler(num_steps - 1, jax.lax.fori_loop(0, num_steps - 1, heun, noise))
