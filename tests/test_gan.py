"""StyleGAN2 discriminator, GAN losses / lazy R1 and the logit-Laplace likelihood against
float64 NumPy references, finite differences and analytic identities (tiny shapes)."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import sharding
from jaxgen.models import stylegan_disc as sd
from jaxgen.objectives import gan
from jaxgen.objectives import logit_laplace as ll


def _images(shape, seed=0, dtype=np.float32):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(dtype)


def _disc(**kw):
  kw = dict(dict(base_channels=4, max_channels=8), **kw)
  return sd.StyleGANDiscriminator(**kw)


def _init(model, x, seed=0):
  return jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.asarray(x))


@pytest.fixture(scope='module')
def small_vars():
  """Variables of _disc() on 8x8x1 images: one block, one mbstd feature (any group size)."""
  return _init(_disc(), np.zeros((1, 8, 8, 1), np.float32))


# ------------------------------------------------------------------ discriminator


@pytest.mark.parametrize('shape', [(4, 32, 32, 1), (3, 16, 16, 3)])
def test_disc_output_shape_finite_and_replicated(shape):
  model = _disc(base_channels=8, max_channels=16)
  x = _images(shape)
  variables = _init(model, x)
  logits = jax.jit(model.apply)(variables, x)
  chex.assert_shape(logits, (shape[0],))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  assert np.ptp(np.asarray(logits)) > 0  # different images get different logits
  # Every parameter carries logical names that the default rules replicate.
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  boxes = jax.tree.leaves(variables, is_leaf=sharding.is_boxed)
  assert boxes and all(sharding.is_boxed(b) for b in boxes)
  for b in boxes:
    spec = sharding.logical_to_mesh(b.names, b.value.shape, mesh, sharding.DEFAULT_RULES)
    assert all(s is None for s in spec), (b.names, spec)


@pytest.mark.parametrize('shape', [(2, 24, 24, 1), (2, 4, 4, 1), (2, 16, 8, 1), (16, 16, 1)])
def test_disc_bad_size_raises(shape):
  with pytest.raises(ValueError, match='square|power of two'):
    _init(_disc(), np.zeros(shape, np.float32))


def test_flops_bad_size_raises():
  with pytest.raises(ValueError, match='power of two'):
    sd.disc_flops_per_example(12, 3, 8, 16)


def test_batch_permutation_and_mbstd_coupling(small_vars):
  x = _images((4, 8, 8, 1), seed=1)
  off = _disc(mbstd_features=0)
  v_off = _init(off, x)
  cross = np.array([0, 2, 1, 3])  # moves examples between the groups {0, 1} and {2, 3}
  apply_off = jax.jit(off.apply)
  np.testing.assert_allclose(apply_off(v_off, x[cross]), apply_off(v_off, x)[cross],
                             rtol=1e-5, atol=1e-6)
  on = _disc(mbstd_group=2)
  v_on, apply_on = small_vars, jax.jit(on.apply)
  base = np.asarray(apply_on(v_on, x))
  within = np.array([1, 0, 3, 2])  # permutes inside each group: group statistics unchanged
  np.testing.assert_allclose(apply_on(v_on, x[within]), base[within], rtol=1e-5, atol=1e-6)
  moved = np.asarray(apply_on(v_on, x[cross]))
  assert np.max(np.abs(moved - base[cross])) > 1e-4  # group statistics changed


def _np_mbstd(x, group, features):
  x = np.asarray(x, np.float64)
  b, _, _, c = x.shape
  g = min(group, b)
  g = b if b % g else g
  cs = c // features
  out = np.zeros(x.shape[:3] + (features,))
  for i in range(b):
    start = (i // g) * g
    std = np.sqrt(np.var(x[start:start + g], axis=0) + 1e-8)  # population variance
    for f in range(features):
      out[i, :, :, f] = std[:, :, f * cs:(f + 1) * cs].mean()
  return out


@pytest.mark.parametrize('b,group,features', [(6, 4, 1), (6, 3, 2), (3, 4, 1), (4, 2, 2),
                                              (5, 1, 1)])
def test_minibatch_stddev_matches_numpy(b, group, features):
  x = np.random.default_rng(b * 10 + group).normal(size=(b, 3, 2, 4)).astype(np.float32)
  got = np.asarray(sd.minibatch_stddev(jnp.asarray(x), group, features))
  chex.assert_shape(got, (b, 3, 2, 4 + features))
  np.testing.assert_array_equal(got[..., :4], x)
  np.testing.assert_allclose(got[..., 4:], _np_mbstd(x, group, features), rtol=1e-5, atol=1e-7)


def test_minibatch_stddev_rejects_uneven_features():
  with pytest.raises(ValueError, match='features'):
    sd.minibatch_stddev(jnp.zeros((2, 4, 4, 3)), 2, 2)


def test_blur_downsample_matches_numpy():
  x = np.random.default_rng(3).normal(size=(2, 8, 6, 3))
  k = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.zeros((2, 4, 3, 3))
  for i in range(4):  # each output pixel: the filter on the 4x4 window at (2i, 2j)
    for j in range(3):
      want[:, i, j] = np.einsum('bhwc,hw->bc', xp[:, 2 * i:2 * i + 4, 2 * j:2 * j + 4], k)
  np.testing.assert_allclose(sd.blur_downsample(jnp.asarray(x, jnp.float32)), want,
                             rtol=1e-5, atol=1e-6)
  # Normalised: a constant image stays constant away from the zero-padded border.
  const = sd.blur_downsample(jnp.full((1, 8, 8, 2), 3.0))
  np.testing.assert_allclose(const[:, 1:-1, 1:-1], 3.0, rtol=1e-6)


def _np_conv_same(x, kernel, bias=None):
  """NHWC x HWIO 'SAME' convolution (odd kernel), float64."""
  kh, kw = kernel.shape[:2]
  xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  h, w = x.shape[1:3]
  out = sum(np.einsum('bhwi,io->bhwo', xp[:, i:i + h, j:j + w], kernel[i, j])
            for i in range(kh) for j in range(kw))
  return out if bias is None else out + bias


def _np_blur_down(x):
  k = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1] // 2, x.shape[2] // 2
  return sum(k[i, j] * xp[:, i:i + 2 * h:2, j:j + 2 * w:2] for i in range(4) for j in range(4))


def test_discriminator_block_matches_numpy():
  x = np.random.default_rng(9).normal(size=(2, 8, 8, 3)).astype(np.float32)
  block = sd.DiscriminatorBlock(5)
  variables = jax.jit(block.init)(jax.random.PRNGKey(1), x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(variables))['params']
  chex.assert_shape([p['conv0']['kernel'], p['conv1']['kernel'], p['skip']['kernel']],
                    [(3, 3, 3, 3), (3, 3, 3, 5), (1, 1, 3, 5)])
  assert 'bias' not in p['skip']
  lrelu = lambda v: np.where(v > 0, v, 0.2 * v)  # noqa: E731
  h = lrelu(_np_conv_same(x.astype(np.float64), p['conv0']['kernel'], p['conv0']['bias']))
  h = lrelu(_np_conv_same(h, p['conv1']['kernel'], p['conv1']['bias']))
  skip = _np_conv_same(_np_blur_down(x.astype(np.float64)), p['skip']['kernel'])
  want = (_np_blur_down(h) + skip) / np.sqrt(2.0)
  np.testing.assert_allclose(jax.jit(block.apply)(variables, x), want, rtol=1e-4, atol=1e-5)


def _count_matmul_flops(jaxpr):
  """2 * multiply-adds of every dense conv and dot in a (nested) jaxpr (not the blur's
  depthwise conv, which disc_flops_per_example leaves out)."""
  total = 0
  for eqn in jaxpr.eqns:
    out = eqn.outvars[0].aval.shape
    if eqn.primitive.name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      if eqn.params['feature_group_count'] > 1:
        assert rhs[:3] == (4, 4, 1), rhs  # only the blur is depthwise
        continue
      out_ch = rhs[eqn.params['dimension_numbers'].rhs_spec[0]]
      total += 2 * int(np.prod(out)) * int(np.prod(rhs)) // out_ch
    elif eqn.primitive.name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2 * int(np.prod(out)) * int(np.prod([lhs[d] for d in lhs_contract]))
    for p in eqn.params.values():
      sub = getattr(p, 'jaxpr', p)
      if hasattr(sub, 'eqns'):
        total += _count_matmul_flops(sub)
  return total


@pytest.mark.parametrize('size,channels,mbstd', [(16, 3, 1), (32, 1, 2), (8, 1, 0)])
def test_flops_match_traced_convs(size, channels, mbstd):
  model = _disc(base_channels=4, max_channels=8, mbstd_features=mbstd)
  x = jnp.zeros((2, size, size, channels))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
  traced = _count_matmul_flops(jax.make_jaxpr(model.apply)(params, x[:1]).jaxpr)
  assert traced > 0
  assert sd.disc_flops_per_example(size, channels, 4, 8, mbstd_features=mbstd) == traced


# ------------------------------------------------------------------ GAN losses and R1


def _np_softplus(x):
  return np.logaddexp(0.0, np.asarray(x, np.float64))


def test_gan_losses_match_numpy():
  real = np.array([-60.0, -3.0, -0.5, 0.0, 1.5, 60.0], np.float32)
  fake = np.array([-40.0, -1.0, 0.25, 2.0, 5.0, 70.0], np.float32)
  np.testing.assert_allclose(gan.generator_loss(fake), _np_softplus(-fake).mean(), rtol=1e-6)
  np.testing.assert_allclose(gan.discriminator_loss(real, fake),
                             _np_softplus(-real).mean() + _np_softplus(fake).mean(), rtol=1e-6)
  np.testing.assert_allclose(gan.discriminator_loss(np.zeros(3), np.zeros(3)), 2 * np.log(2),
                             rtol=1e-6)


def test_r1_linear_discriminator_is_weight_norm():
  w = np.random.default_rng(0).normal(size=(4, 4, 2)).astype(np.float32)

  def disc_fn(x):  # d D(x)_b / d x_b = w for every example, so R1 = ||w||^2
    return jnp.sum(x * w, axis=(1, 2, 3)) + 3.0

  np.testing.assert_allclose(gan.r1_penalty(disc_fn, _images((3, 4, 4, 2))),
                             np.sum(w.astype(np.float64) ** 2), rtol=1e-5)


def test_r1_matches_central_finite_differences_float64(small_vars):
  with jax.enable_x64(True):
    model = _disc(mbstd_group=2, dtype=jnp.float64)  # mbstd on: examples are coupled
    x = jnp.asarray(_images((2, 8, 8, 1), seed=4), jnp.float64)
    variables = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), small_vars)
    disc_fn = lambda imgs: model.apply(variables, imgs)  # noqa: E731
    got = float(jax.jit(lambda imgs: gan.r1_penalty(disc_fn, imgs))(x))
    h = 1e-5  # central FD error ~h^2 (smooth) + 1e-16 / h (rounding): ~1e-10
    eye = jnp.eye(x.size, dtype=jnp.float64).reshape((x.size,) + x.shape)
    total = jax.jit(jax.vmap(lambda imgs: jnp.sum(disc_fn(imgs))))
    grad = (total(x + h * eye) - total(x - h * eye)) / (2 * h)
    want = np.mean(np.sum(np.asarray(grad).reshape(x.shape) ** 2, axis=(1, 2, 3)))
  assert want > 0
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_lazy_r1_schedule_and_scale(small_vars):
  model, variables = _disc(), small_vars
  x = jnp.asarray(_images((2, 8, 8, 1), seed=5))
  disc_fn = lambda imgs: model.apply(variables, imgs)  # noqa: E731
  lazy = jax.jit(lambda step: gan.lazy_r1(disc_fn, x, step, 4, 10.0))
  r1 = float(jax.jit(gan.r1_penalty, static_argnums=0)(disc_fn, x))
  assert r1 > 0
  assert float(lazy(jnp.int32(3))) == 0.0
  assert float(lazy(jnp.int32(5))) == 0.0
  np.testing.assert_allclose(lazy(jnp.int32(8)), 10.0 / 2 * 4 * r1, rtol=1e-5)
  np.testing.assert_allclose(lazy(jnp.int32(0)), 10.0 / 2 * 4 * r1, rtol=1e-5)
  # The double backprop sits in a lax.cond branch, not in straight-line code.
  assert 'cond' in str(jax.make_jaxpr(lazy)(jnp.int32(0)))
  with pytest.raises(ValueError, match='every'):
    gan.lazy_r1(disc_fn, x, 0, 0, 10.0)


def test_r1_gradients_reach_discriminator_params(small_vars):
  model, params = _disc(mbstd_group=2), small_vars['params']
  x = jnp.asarray(_images((4, 8, 8, 1), seed=6))

  def loss(p, step):
    return gan.lazy_r1(lambda imgs: model.apply({'params': p}, imgs), x, step, 2, 1.0)

  grad_fn = jax.jit(jax.grad(loss))
  grads = grad_fn(params, jnp.int32(4))
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  kernels = [(jax.tree_util.keystr(k), g) for k, g in flat if 'kernel' in jax.tree_util.keystr(k)]
  assert len(kernels) >= 6
  chex.assert_tree_all_finite(grads)
  for name, g in kernels:
    assert float(jnp.max(jnp.abs(g))) > 0, name
  off = grad_fn(params, jnp.int32(3))
  assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(off))


# ------------------------------------------------------------------ logit-Laplace


def _np_logit_laplace_nll(x, mu, log_b, eps=0.1):
  x, mu = np.asarray(x, np.float64), np.asarray(mu, np.float64)
  b = np.exp(np.clip(np.asarray(log_b, np.float64), ll.LOG_B_MIN, ll.LOG_B_MAX))
  y = (1 - 2 * eps) * (x + 1) / 2 + eps
  density = np.exp(-np.abs(np.log(y / (1 - y)) - mu) / b) / (2 * b * y * (1 - y))
  return -np.log(density)


def test_logit_laplace_nll_matches_numpy_density():
  rng = np.random.default_rng(7)
  shape = (3, 4, 4, 2)
  x = rng.uniform(-1, 1, shape).astype(np.float32)
  x[0, 0, 0] = [-1.0, 1.0]  # the ends of the pixel range
  mu = rng.normal(0, 1.5, shape).astype(np.float32)
  log_b = rng.uniform(-2.5, 1.0, shape).astype(np.float32)
  log_b[1, 0, 0] = [-30.0, 12.0]  # outside the clamp range
  y = (0.8 * (x[1, 0, 0].astype(np.float64) + 1) / 2 + 0.1)
  mu[1, 0, 0] = np.log(y / (1 - y)) + 0.01  # keeps exp(-|logit y - mu| / b) above underflow
  want = _np_logit_laplace_nll(x, mu, log_b)
  np.testing.assert_allclose(ll.nll_map(x, mu, log_b), want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(ll.nll_per_example(x, mu, log_b), want.mean(axis=(1, 2, 3)),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ll.nll(x, mu, log_b), want.mean(), rtol=1e-5, atol=1e-5)
  chex.assert_shape(ll.nll_per_example(x, mu, log_b), (3,))
  # Clamping: below LOG_B_MIN the loss is that of LOG_B_MIN.
  np.testing.assert_allclose(ll.nll(x, mu, np.full(shape, -50.0)),
                             ll.nll(x, mu, np.full(shape, ll.LOG_B_MIN)), rtol=1e-6)


def test_logit_laplace_density_integrates_to_one():
  # y = to_unit(x) covers (0, 1) for x in (-1.25, 1.25); dy = (1 - 2 eps) / 2 dx.
  with jax.enable_x64(True):
    x = jnp.linspace(-1.25, 1.25, 200001, dtype=jnp.float64)[1:-1]
    dens = jnp.exp(-ll.nll_map(x, 0.3, jnp.log(0.5)))
    integral = float(jnp.trapezoid(dens, x) * (1 - 2 * ll.EPS) / 2)
  np.testing.assert_allclose(integral, 1.0, atol=1e-5)


def test_mean_image_inverts_to_unit():
  x = np.concatenate([[-1.0, 1.0, 0.0], _images((97,), seed=8)]).astype(np.float32)
  y = np.asarray(ll.to_unit(x), np.float64)
  assert y.min() >= ll.EPS - 1e-7 and y.max() <= 1 - ll.EPS + 1e-7
  mu = np.log(y / (1 - y)).astype(np.float32)
  np.testing.assert_allclose(ll.mean_image(mu), x, atol=2e-6)
  np.testing.assert_array_equal(ll.mean_image(np.array([-20.0, 20.0])), [-1.0, 1.0])
