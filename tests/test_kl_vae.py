"""KL-VAE: the posterior's KL and samples, shapes and downsampling, gradients, the latent API's
scaling, a loss that falls, the tiny CLI run loaded back as a trained VAE, the SD-1 size."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config, run_cli, tree_norm
from jaxgen import families
from jaxgen.errors import UserError
from jaxgen.models import kl_vae


def _model(ch_mult):
  return kl_vae.AutoencoderKL(channels=1, ch=8, ch_mult=ch_mult, num_res_blocks=1,
                              z_channels=3, norm_groups=4)


def _images(n=2, size=16, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (n, size, size, 1), minval=-1, maxval=1)


def test_kl_equals_numpy_float64():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
  logvar = rng.uniform(-4, 3, size=(3, 4, 4, 2)).astype(np.float32)
  logvar[0, 0, 0, 0], logvar[1, 0, 0, 0] = 25.0, -40.0  # outside the clip range [-30, 20]
  got = kl_vae.DiagonalGaussian(jnp.asarray(mean), jnp.asarray(logvar)).kl()
  lv = np.clip(logvar.astype(np.float64), -30, 20)
  want = 0.5 * np.sum(mean.astype(np.float64) ** 2 + np.exp(lv) - 1 - lv, axis=(1, 2, 3))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # N(0, I) itself has zero KL.
  zero = kl_vae.DiagonalGaussian(jnp.zeros((2, 3)), jnp.zeros((2, 3))).kl()
  np.testing.assert_allclose(zero, 0.0, atol=1e-7)


def test_sample_has_the_posteriors_mean_and_variance():
  n = 20_000
  mean = np.array([[-1.5, 0.0, 2.0]], np.float32)
  logvar = np.array([[-2.0, 0.0, 1.0]], np.float32)
  q = kl_vae.DiagonalGaussian(jnp.broadcast_to(mean, (n, 3)), jnp.broadcast_to(logvar, (n, 3)))
  z = np.asarray(q.sample(jax.random.PRNGKey(0)), np.float64)
  var = np.exp(logvar[0])
  # 5 standard errors of the sample mean and of the sample variance (Gaussian: 2 var^2 / n).
  np.testing.assert_array_less(np.abs(z.mean(0) - mean[0]), 5 * np.sqrt(var / n))
  np.testing.assert_array_less(np.abs(z.var(0) - var), 5 * var * np.sqrt(2 / n))
  np.testing.assert_array_equal(q.mode(), q.mean)


@pytest.mark.parametrize('ch_mult,factor', [((1, 2), 2), ((1, 2, 2, 2), 8)])
def test_shapes_and_downsampling_factor(ch_mult, factor):
  """Shapes by jax.eval_shape: nothing is compiled."""
  model, x = _model(ch_mult), _images(2, 16)
  params = jax.eval_shape(lambda r: model.init(r, x, sample=False), jax.random.PRNGKey(0))
  mean, logvar = jax.eval_shape(lambda p: model.apply(p, x, method=model.encode), params)
  assert model.downsample_factor == factor
  assert mean.shape == logvar.shape == (2, 16 // factor, 16 // factor, 3)
  out = jax.eval_shape(lambda p: model.apply(p, x, jax.random.PRNGKey(1)), params)
  assert out['recon'].shape == x.shape and out['kl'].shape == (2,)
  assert out['latents'].shape == mean.shape
  decoded = jax.eval_shape(lambda p: model.apply(p, jnp.zeros((1, 3, 5, 3)), method=model.decode),
                           params)
  assert decoded.shape == (1, 3 * factor, 5 * factor, 1)
  with pytest.raises(ValueError, match='divide by'):
    jax.eval_shape(lambda p: model.apply(p, _images(1, 9), method=model.encode), params)


@pytest.fixture(scope='module')
def tiny_run(tiny_vae, data_dir):
  """configs/kl_vae.py:tiny trained by the real CLI (conftest's `tiny_vae`: 4 steps, the
  discriminator from step 2, R1 on step 2, a final loss eval, reconstruction samples), then
  loaded back the way FlexTok loads the KL-VAE its config names: (workdir, family, params)."""
  from jaxgen.families import kl_vae as kl_family
  workdir = tiny_vae[0]
  return (workdir, *kl_family.load(workdir, data_dir))


def test_tiny_cli_trains_evaluates_and_loads(tiny_run, data_dir):
  workdir, fam, params = tiny_run
  rows = [json.loads(line) for line in open(f'{workdir}/metrics.jsonl')]
  train = [r for r in rows if 'l1' in r]
  assert len(train) == 4 and all(np.isfinite(r['loss']) and r['kl'] > 0 for r in train)
  assert [r['disc_on'] for r in train] == [0.0, 0.0, 1.0, 1.0]  # steps 0..3; disc_start 2
  assert train[2]['r1'] > 0  # lazy R1 on step 2 (every 2)
  assert train[-1]['l1'] < train[0]['l1']
  result = [r for r in rows if 'eval/psnr' in r][-1]
  assert result['eval/psnr'] > 0 and result['eval/kl'] > 0
  assert os.path.exists(f'{workdir}/samples/step_0000004.png')
  assert set(params) == {'generator', 'discriminator'}
  scale = fam.measure_latent_scale(params, num_batches=1)
  np.testing.assert_allclose(scale['scale_factor'], 1 / scale['std'])
  from jaxgen import trainer
  with pytest.raises(UserError, match="not a 'vitvqgan'"):
    trainer.load_trained(workdir, 'vitvqgan', 'hint', data_dir)


def test_latent_api_scales_and_round_trips(tiny_run):
  _, trained, params = tiny_run
  cfg = trained.config.copy_and_resolve_references()
  cfg.model.update(scale_factor=0.5, shift_factor=0.1)
  fam = families.get_family(cfg)
  x = _images(2, 32)
  mean = jax.jit(trained.encode_latents)(params, x)  # scale 1, shift 0: the posterior mean
  z = jax.jit(fam.encode_latents)(params, x)
  assert z.shape == (2, *fam.latent_shape) == (2, 16, 16, 4)
  np.testing.assert_allclose(z, (mean - 0.1) * 0.5, rtol=1e-5, atol=1e-6)
  want = jax.jit(trained.decode_latents)(params, mean)
  np.testing.assert_allclose(jax.jit(fam.decode_latents)(params, z), want, atol=1e-5)
  np.testing.assert_allclose(jax.jit(fam.reconstruct)(params, x), np.clip(want, -1, 1),
                             atol=1e-5)
  drawn = jax.jit(lambda p, x, r: fam.encode_latents(p, x, sample=True, rng=r))(
      params, x, jax.random.PRNGKey(2))
  assert drawn.shape == z.shape and float(jnp.max(jnp.abs(drawn - z))) > 0
  with pytest.raises(UserError, match='needs rng'):
    fam.encode_latents(params, x, sample=True)


def test_fixed_batch_loss_falls_and_gradients_reach_every_parameter(tiny_run):
  """20 Adam steps on one test batch, from the tiny run's autoencoder: the family's own loss
  (posterior samples, L1 + KL) falls, and the first step's gradient reaches every
  encoder and decoder parameter."""
  _, fam, params = tiny_run
  it = fam.make_iterator('test', global_batch_size=8, seed=0, train=False)
  batch = next(it)  # Fashion-MNIST: structure to learn (uniform noise has none)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(g, s, i):
    loss = lambda g: fam.generator_loss(fam.generator_terms(g, batch['image'],
                                                            jax.random.PRNGKey(i))[1])
    value, grads = jax.value_and_grad(loss)(g)
    u, s = tx.update(grads, s, g)
    return optax.apply_updates(g, u), s, value, grads

  g, losses = params['generator'], []
  state = tx.init(g)
  for i in range(20):
    g, state, value, grads = step(g, state, i)
    if i == 0:
      first = grads
    losses.append(float(value))
  assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
  first = jax.device_get(first)  # NumPy: eager jnp ops would compile one program per shape
  for name in ('encoder', 'quant_conv', 'post_quant_conv', 'decoder'):
    assert tree_norm(first[name]) > 1e-6, name
  dead = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(first)
          if not np.max(np.abs(v)) > 0]
  assert not dead, dead


def test_info_reports_the_sd_vae_size():
  """The SD-1 VAE (LDM kl-f8) has 83,653,863 parameters; counted without allocating."""
  proc = run_cli('--config=configs/kl_vae.py:f8c4', '--mode=info')
  assert proc.returncode == 0, proc.stderr[-2000:]
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  b = info['param_breakdown']
  assert abs((b['encoder'] + b['decoder']) / 83.7e6 - 1) < 0.02
  assert b['encoder'] + b['decoder'] == 83_653_863
  assert info['total_params'] == b['encoder'] + b['decoder'] + b['discriminator']
  from jaxgen import trainer
  f8c16 = trainer.info(load_config('configs/kl_vae.py', 'f8c16'))['param_breakdown']
  # 16 latent channels change only the layers next to the latent.
  assert 0 < f8c16['encoder'] + f8c16['decoder'] - 83_653_863 < 0.01 * 83.7e6


def test_unknown_variant_and_bad_settings_are_clear_errors():
  with pytest.raises(UserError, match='unknown kl_vae config'):
    load_config('configs/kl_vae.py', 'f16')
  cfg = load_config('configs/kl_vae.py', 'tiny')
  cfg.loss.reconstruction = 'l3'
  with pytest.raises(UserError, match='loss.reconstruction'):
    families.get_family(cfg)
  cfg = load_config('configs/kl_vae.py', 'tiny')
  cfg.model.ch_mult = (1, 2, 2, 2, 2, 2, 2)  # 64x on 32px images
  with pytest.raises(UserError, match='does not divide'):
    families.get_family(cfg)
