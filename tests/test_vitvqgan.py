"""ViT-VQGAN tokenizer: position embeddings used, code lookup, straight-through, the GAN step."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, load_script, tree_norm
from jaxgen import families, sharding, train_state
from jaxgen.models import layers, vitvqgan


@pytest.fixture
def tiny_vq(tiny_config):
  return lambda arg='tiny': tiny_config(arg, path='configs/vitvqgan.py')


def _model(**kw):
  vit = dict(width=32, depth=1, num_heads=2, mlp_dim=64)
  fields = dict(image_size=16, channels=1, patch_size=4, enc=vit, dec=vit, codebook_size=32,
                code_dim=8)
  fields.update(kw)
  return vitvqgan.VitVQGAN(**fields)


def _init(model, x):
  import flax.linen as nn
  return nn.meta.unbox(model.init(jax.random.PRNGKey(0), x))


def _init_family(fam):
  import flax.linen as nn
  return nn.meta.unbox(fam.init_params(jax.random.PRNGKey(0)))


def _images(n=2, size=16, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (n, size, size, 1), minval=-1, maxval=1)


def _permute_patches(images, perm, p=4):
  tokens = layers.patchify(images, p)[:, perm]
  return layers.unpatchify(tokens, p, images.shape[-1])


def test_permuting_patches_changes_encoder_and_decoder_outputs():
  """Without (or with unused) position embeddings both ViTs are permutation-equivariant:
  permuting the input tokens would just permute the outputs."""
  model, x = _model(), _images()
  params = _init(model, x)
  perm = np.random.default_rng(0).permutation(16)
  encode = lambda x: model.apply(params, x, method=lambda m, x: m.encoder(
      layers.patchify(x, 4)))
  out, out_perm = encode(x), encode(_permute_patches(x, perm))
  assert float(jnp.max(jnp.abs(out[:, perm] - out_perm))) > 1e-2
  q = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 8))
  decode = lambda q: model.apply(params, q, method=lambda m, q: m.decoder(q))
  assert float(jnp.max(jnp.abs(decode(q)[:, perm] - decode(q[:, perm])))) > 1e-2
  # Control: with the position embedding zeroed the encoder IS equivariant (so the check above
  # measures the position embedding, not numerical noise).
  zeroed = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.zeros_like(v) if 'pos_embedding' in jax.tree_util.keystr(path) else v,
      params)
  enc0 = lambda x: model.apply(zeroed, x, method=lambda m, x: m.encoder(layers.patchify(x, 4)))
  np.testing.assert_allclose(enc0(x)[:, perm], enc0(_permute_patches(x, perm)), atol=1e-5)


@pytest.mark.parametrize('l2', [True, False])
def test_code_lookup_equals_brute_force(l2):
  rng = np.random.default_rng(0)
  z, book = rng.normal(size=(5, 7, 8)), rng.normal(size=(32, 8))
  codes = np.asarray(vitvqgan.nearest_codes(jnp.asarray(z, jnp.float32),
                                            jnp.asarray(book, jnp.float32), l2))
  if l2:  # cosine similarity, float64
    sim = (z / np.linalg.norm(z, axis=-1, keepdims=True)) @ (
        book / np.linalg.norm(book, axis=-1, keepdims=True)).T
    want = sim.argmax(-1)
  else:
    want = ((z[..., None, :] - book) ** 2).sum(-1).argmin(-1)
  np.testing.assert_array_equal(codes, want)


@pytest.mark.parametrize('l2', [True, False])
def test_restart_dead_codes_moves_only_unused_codes(l2):
  rng = np.random.default_rng(0)
  book, z = rng.normal(size=(6, 3)), rng.normal(size=(2, 5, 3))
  codes = np.array([[0, 2, 2, 0, 2], [2, 0, 0, 2, 0]])
  out = np.asarray(vitvqgan.restart_dead_codes(
      jnp.asarray(book, jnp.float32), jnp.asarray(z, jnp.float32), jnp.asarray(codes),
      jax.random.PRNGKey(0), l2), np.float64)
  np.testing.assert_allclose(out[[0, 2]], book[[0, 2]], rtol=1e-6)  # live codes untouched
  flat = z.reshape(-1, 3)
  live_norm = np.linalg.norm(book[[0, 2]], axis=-1).mean()
  for row in out[[1, 3, 4, 5]]:
    if l2:  # an encoder output's direction at the live codes' mean norm
      cos = flat @ row / (np.linalg.norm(flat, axis=-1) * np.linalg.norm(row))
      assert cos.max() == pytest.approx(1.0, abs=1e-5)
      assert np.linalg.norm(row) == pytest.approx(live_norm, rel=1e-5)
    else:  # an encoder output itself
      assert np.abs(flat - row).sum(-1).min() < 1e-5


def test_dead_code_restart_in_the_train_step(tiny_vq):
  """after_update restarts codes on schedule only, and restarted codes are chosen afterwards."""
  cfg = tiny_vq()
  cfg.loss.update(restart_every=2, restart_until=3)
  fam = families.get_family(cfg)
  params = jax.device_get(_init_family(fam))
  images = _images(8, 32)
  book = params['generator']['quantizer']['codebook']
  used = lambda p: np.unique(np.asarray(fam.tokenize(p, images)))
  for step, restarts in ((0, False), (1, True), (3, False), (5, False)):
    out = fam.after_update(params, {'image': images}, jax.random.PRNGKey(step),
                           jnp.asarray(step))
    changed = np.any(np.asarray(out['generator']['quantizer']['codebook']) != book, -1)
    if not restarts:
      assert not changed.any(), step
      continue
    dead = np.setdiff1d(np.arange(len(book)), used(params))
    np.testing.assert_array_equal(np.flatnonzero(changed), dead)
    assert len(used(out)) > len(used(params))
    chex.assert_trees_all_equal(out['discriminator'], params['discriminator'])


def test_quantizer_values_losses_and_straight_through():
  model, x = _model(), _images()
  params = _init(model, x)
  out = model.apply(params, x)
  book = np.asarray(params['params']['quantizer']['codebook'], np.float64)
  book /= np.linalg.norm(book, axis=-1, keepdims=True)
  q, codes, vq = model.apply(params, x, method=lambda m, x: m.encode(x))
  # Forward: the straight-through vectors are the chosen (normalised) codes.
  np.testing.assert_allclose(q, book[np.asarray(codes)], atol=1e-5)
  z = model.apply(params, x, method=lambda m, x: m.to_code(m.encoder(layers.patchify(x, 4))))
  z = np.asarray(z, np.float64)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  want = np.mean(np.sum((z - book[np.asarray(codes)]) ** 2, -1))
  np.testing.assert_allclose(vq['commitment'], want, rtol=1e-4)
  np.testing.assert_allclose(vq['codebook_loss'], want, rtol=1e-4)
  assert out['recon'].shape == x.shape
  assert float(jnp.min(out['recon'])) >= -1 and float(jnp.max(out['recon'])) <= 1

  def l2_loss(p):
    return jnp.mean((model.apply(p, x)['recon'] - x) ** 2)
  grads = jax.grad(l2_loss)(params)['params']
  # The reconstruction loss reaches the encoder only through the straight-through estimator.
  for name in ('encoder', 'to_code'):
    norm = tree_norm(grads[name])
    assert norm > 1e-6, name
  # ... and never the codebook (it learns from the codebook loss alone).
  assert tree_norm(grads['quantizer']) == 0.0


def test_decode_codes_matches_forward():
  model, x = _model(), _images()
  params = _init(model, x)
  out = model.apply(params, x)
  recon = model.apply(params, out['codes'], method=vitvqgan.VitVQGAN.decode_codes)
  np.testing.assert_allclose(recon, out['recon'], atol=1e-5)


def test_gan_step_routes_each_loss_to_its_own_parameters(tiny_vq):
  """d total / d generator = d L_G / d generator; d total / d disc = d L_D / d disc.
  (R1 is off here to keep the compile short: its own tests are in test_gan.py and the tiny
  CLI run trains with it.)"""
  cfg = tiny_vq()
  cfg.loss.r1_gamma = 0.0
  fam = families.get_family(cfg)
  import flax.linen as nn
  params = nn.meta.unbox(fam.init_params(jax.random.PRNGKey(0)))
  batch = {'image': _images(8, 32), 'label': jnp.zeros(8, jnp.int32)}
  # The discriminator on; jitted, as op-by-op dispatch of these gradients is slow.
  step = jnp.asarray(cfg.loss.disc_start, jnp.int32)
  total_grad = jax.jit(jax.grad(lambda p, s: fam.train_loss(p, batch, jax.random.PRNGKey(0),
                                                             s)[0]))
  grads = total_grad(params, step)

  def gen_only(g):
    out, terms = fam.generator_terms(g, batch['image'])
    from jaxgen.objectives import gan
    adv = gan.generator_loss(fam.discriminate(params['discriminator'], out['recon']))
    return fam.generator_loss(terms) + cfg.loss.adv_weight * adv

  def disc_only(d):
    from jaxgen.objectives import gan
    recon = fam.reconstruct(params, batch['image'])
    return gan.discriminator_loss(fam.discriminate(d, batch['image']),
                                  fam.discriminate(d, recon))
  reference = jax.jit(lambda g, d: (jax.grad(gen_only)(g), jax.grad(disc_only)(d)))
  want_g, want_d = reference(params['generator'], params['discriminator'])
  chex.assert_trees_all_close(grads['generator'], want_g, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(grads['discriminator'], want_d, rtol=1e-4, atol=1e-6)
  # Before disc_start the discriminator gets no gradient at all.
  early = total_grad(params, jnp.asarray(0, jnp.int32))
  assert tree_norm(early['discriminator']) == 0.0


def test_two_optimizers_and_one_compiled_step(tiny_vq):
  """Generator and discriminator keep separate optimizer states (the discriminator's Adam has
  b1 = 0) and the trainer's step compiles once across the discriminator's start."""
  cfg = tiny_vq()
  cfg.loss.r1_gamma = 0.0  # a shorter compile; the tiny CLI run trains with R1
  fam = families.get_family(cfg)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  rules = sharding.rules_tuple(cfg.axis_rules)
  tx, schedule = fam.make_optimizer(cfg.total_steps)
  state, shardings = train_state.init_state(fam, tx, jax.random.PRNGKey(0), mesh, rules)
  step_fn = train_state.make_train_step(fam, tx, schedule, cfg, mesh, shardings,
                                        sharding.batch_sharding(mesh))
  before = jax.device_get(state.params)
  batch = {'image': np.asarray(_images(8, 32)), 'label': np.zeros(8, np.int32)}
  with train_state.mesh_context(mesh, rules):
    for _ in range(cfg.loss.disc_start + 2):
      state, metrics = step_fn(state, sharding.global_batch(batch, mesh))
  after = jax.device_get(state.params)
  assert step_fn._cache_size() == 1
  moved = lambda a, b: tree_norm(jax.tree.map(lambda x, y: x - y, a, b))
  assert moved(after['generator'], before['generator']) > 0
  assert moved(after['discriminator'], before['discriminator']) > 0
  assert float(metrics['disc_on']) == 1.0


def test_tiny_cli_trains_and_evaluates(tiny_tokenizer):
  """The real loop on tiny data with its final eval: PSNR, codebook usage and rFID (the
  session's tiny tokenizer, also used by the VIM tests)."""
  workdir, _ = tiny_tokenizer
  rows = [json.loads(line) for line in open(f'{workdir}/metrics.jsonl')]
  assert all(0 < r['codebook_usage'] <= 1 for r in rows if 'codebook_usage' in r)
  assert any(r.get('disc_on') == 1.0 for r in rows)
  result = [r for r in rows if 'eval/psnr' in r][-1]
  assert os.path.exists(f'{workdir}/samples/step_0000004.png')
  assert 0 < result['eval/codebook_usage'] <= 1
  assert 1 <= result['eval/codebook_perplexity'] <= 64
  assert result['eval/psnr'] > 0
  assert result['eval/rfid[fmnist_classifier_v1]'] > 0


def test_info_reports_paper_sizes():
  """Encoder / decoder sizes of the paper's pairings, counted without allocating."""
  from jaxgen import trainer
  want = {'S': vitvqgan.vit_params(1024, 192, 512, 8, 2048),
          'L': vitvqgan.vit_params(1024, 192, 1280, 32, 5120)}
  info = trainer.info(load_config('configs/vitvqgan.py', 'SL'))
  b = info['param_breakdown']
  # The encoder adds its projection to the code dim; the decoder its tanh head.
  assert abs(b['encoder'] - want['S']) / want['S'] < 0.01
  assert abs(b['decoder'] - want['L']) / want['L'] < 0.01
  assert b['quantizer'] == 8192 * 32


def test_unknown_variant_is_one_clear_error():
  from jaxgen.errors import UserError
  with pytest.raises(UserError, match='unknown vitvqgan config'):
    load_config('configs/vitvqgan.py', 'XL')
  plain = load_config('configs/vitvqgan.py', 'demo,plain')
  assert not plain.model.l2_normalize and plain.model.code_dim == plain.model.encoder.width


def test_ablation_script_writes_its_table(tmp_path, data_dir):
  """The Table-4 script: its arms differ only in the quantizer, and one arm runs end to end
  on the tiny config (trained, evaluated, saved as JSON and a chart)."""
  ablation = load_script('vitvqgan_ablation')
  out = tmp_path / 'ablation'
  args = [f'--out={out}', '--variant=demo', '--steps=2', '--eval_batches=1',
          f'--data_dir={data_dir}']
  configs = {arm: ablation.arm_config(arm, ablation.parse_args(args)) for arm in ablation.ARMS}
  fields = {arm: (c.model.code_dim, c.model.l2_normalize) for arm, c in configs.items()}
  assert fields == {'l2_dim8': (8, True), 'l2_dim32': (32, True), 'plain': (64, False)}
  for c in configs.values():  # no discriminator, no restart: only the quantizer differs
    assert c.loss.disc_start > c.total_steps and not c.loss.restart_every
    c.model.update(code_dim=0, l2_normalize=True)
    assert c.to_json() == configs['l2_dim8'].to_json()
  args[1] = '--variant=tiny'
  result = ablation.main(args + ['--arms=plain'])
  with open(out / 'ablation.json') as f:
    saved = json.load(f)
  assert saved['arms'].keys() == {'plain'} and not saved['restart']
  row = saved['arms']['plain']
  assert row['code_dim'] == 32 and not row['l2_normalize']
  assert 0 < row['codebook_usage'] <= 1 and np.isfinite(row['psnr'])
  assert row == result['arms']['plain']
  assert os.path.getsize(out / 'ablation.png') > 1000
