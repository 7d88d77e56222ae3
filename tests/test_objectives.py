"""Objectives and compiled samplers against NumPy references and analytic solutions."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxgen import objectives
from jaxgen.objectives import ddpm as ddpm_lib


def _rf(**kw):
  return objectives.make_objective(ml_collections.ConfigDict(dict(name='rectified_flow', **kw)))


def _ddpm(**kw):
  return objectives.make_objective(ml_collections.ConfigDict(dict(name='ddpm', **kw)))


def _linear_denoise(a=0.7, b=0.2):
  """A stand-in network with a known closed form: f(z, t) = a z + b t."""
  return lambda z, t: a * z + b * t.reshape(-1, *([1] * (z.ndim - 1)))


def test_rectified_flow_loss_matches_numpy():
  obj = _rf(time_scale=1000.0)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 3, 1))
  rng = jax.random.PRNGKey(5)
  loss, _ = obj.loss(_linear_denoise(), x, rng)
  t_rng, n_rng = jax.random.split(rng)
  t = np.asarray(jax.nn.sigmoid(jax.random.normal(t_rng, (4,))), np.float64)
  eps = np.asarray(jax.random.normal(n_rng, x.shape), np.float64)
  xn, tb = np.asarray(x, np.float64), t[:, None, None, None]
  z = (1 - tb) * xn + tb * eps
  ref = np.mean((0.7 * z + 0.2 * 1000 * tb - (eps - xn)) ** 2)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)


def _np_flow_reference(f, noise, n, method):
  z, dt = np.asarray(noise, np.float64), 1.0 / n
  for i in range(n):
    t = 1 - i * dt
    v = f(z, t)
    if method == 'heun' and i < n - 1:
      z = z - dt * 0.5 * (v + f(z - dt * v, t - dt))
    else:
      z = z - dt * v
  return z


@pytest.mark.parametrize('method', ['euler', 'heun'])
def test_flow_sampler_matches_python_loop(method):
  obj = _rf(time_scale=1.0)
  noise = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 1))
  out = jax.jit(lambda n: obj.sample(_linear_denoise(), n, None, num_steps=7, method=method))(noise)
  ref = _np_flow_reference(lambda z, t: 0.7 * z + 0.2 * t, noise, 7, method)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_flow_euler_recovers_point_mass_exactly():
  # For data = a point c the true velocity is (z - c) / t; Euler follows the straight line.
  c = jnp.array([0.5, -0.25])
  obj = _rf()
  noise = jax.random.normal(jax.random.PRNGKey(2), (6, 2))
  v = lambda z, t: (z - c) / t[:, None]
  out = obj.sample(v, noise, None, num_steps=10, method='euler')
  np.testing.assert_allclose(out, jnp.broadcast_to(c, out.shape), atol=1e-5)


def _np_ddim_reference(obj, f, noise, rng, n, eta):
  ts = ddpm_lib.respaced_timesteps(obj.num_timesteps, n)
  x = np.asarray(noise, np.float64)
  for i, t in enumerate(ts):
    ab = obj.alphas_cumprod[t]
    ab_prev = obj.alphas_cumprod[ts[i + 1]] if i + 1 < n else 1.0
    eps = f(x, t)
    x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    z = np.asarray(jax.random.normal(jax.random.fold_in(rng, i), x.shape), np.float64)
    x = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev - sigma ** 2) * eps + sigma * z
  return x


@pytest.mark.parametrize('method,eta', [('ddim', 0.0), ('ddpm', 1.0)])
def test_ddpm_samplers_match_python_loop(method, eta):
  obj = _ddpm(clip_x0=False)
  noise = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 1))
  rng = jax.random.PRNGKey(4)
  f = lambda z, t: 0.1 * z + 1e-4 * t
  out = jax.jit(lambda n: obj.sample(lambda z, t: 0.1 * z + 1e-4 * t[:, None, None, None], n,
                                     rng, num_steps=8, method=method))(noise)
  ref = _np_ddim_reference(obj, f, noise, rng, 8, eta)
  np.testing.assert_allclose(out, ref, rtol=2e-4, atol=2e-4)


def test_ddim_recovers_point_mass_exactly():
  c = jnp.array([0.3, -0.6])
  obj = _ddpm(clip_x0=False)
  ab = jnp.asarray(obj.alphas_cumprod, jnp.float32)
  def eps(x, t):  # exact noise prediction for a point mass at c
    a = ab[t.astype(jnp.int32)][:, None]
    return (x - jnp.sqrt(a) * c) / jnp.sqrt(1 - a)
  noise = jax.random.normal(jax.random.PRNGKey(5), (4, 2))
  out = obj.sample(eps, noise, jax.random.PRNGKey(0), num_steps=20, method='ddim')
  np.testing.assert_allclose(out, jnp.broadcast_to(c, out.shape), atol=1e-4)


def test_ddpm_schedule_and_loss():
  obj = _ddpm()
  betas = np.linspace(1e-4, 2e-2, 1000)
  np.testing.assert_allclose(obj.alphas_cumprod[-1], np.prod(1 - betas))
  x = jnp.ones((8, 2))
  loss, _ = obj.loss(lambda z, t: jnp.zeros_like(z), x, jax.random.PRNGKey(0))
  t_rng, n_rng = jax.random.split(jax.random.PRNGKey(0))
  eps = jax.random.normal(n_rng, x.shape)
  np.testing.assert_allclose(loss, jnp.mean(eps ** 2), rtol=1e-6)


def test_dit_sampler_traces_once_and_matches_step_loop(tiny_config):
  from jaxgen import families
  cfg = tiny_config()
  fam = families.get_family(cfg)
  params = nn.meta.unbox(fam.init_params(jax.random.PRNGKey(0)))
  params = jax.tree.map(lambda p: p + 0.02 * jnp.ones_like(p), params)  # escape the zero init
  traced = chex.assert_max_traces(fam.sample, n=1)
  sample = jax.jit(traced)
  labels = fam.sample_labels()
  out1 = sample(params, jax.random.PRNGKey(1), labels)
  out2 = sample(params, jax.random.PRNGKey(2), (labels + 1) % 10)  # same shapes: no retrace
  assert out1.shape == (10, 32, 32, 1) and not np.allclose(out1, out2)
  # Plain Python loop of the same Euler steps with the same guided network.
  s = cfg.sample
  noise_rng, _ = jax.random.split(jax.random.PRNGKey(1))
  z = jax.random.normal(noise_rng, out1.shape)
  denoise = jax.jit(fam.denoiser(params, labels, s.cfg_scale))
  for i in range(s.num_steps):
    t = 1.0 - i / s.num_steps
    z = z - (1.0 / s.num_steps) * denoise(z, jnp.full((10,), t * fam.objective.time_scale))
  np.testing.assert_allclose(out1, jnp.clip(z, -1, 1), rtol=1e-4, atol=1e-5)
