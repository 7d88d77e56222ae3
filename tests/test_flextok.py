"""FlexTok: register order, nested dropout and the null condition inside the model; the
tokenizer family over a trained tiny KL-VAE (training loop, every k, one compiled sampler)."""
import functools
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

from conftest import load_config, load_script, run_cli, tree_norm
from jaxgen import families
from jaxgen.errors import UserError
from jaxgen.models import flextok, registers

P, N, PD = 16, 8, 16  # patches, registers, patch dim


def _model():
  vit = FrozenDict(dict(width=32, depth=2, num_heads=2))
  return flextok.FlexTok(num_patches=P, patch_dim=PD, num_registers=N, levels=(5, 5, 3),
                         enc=vit, dec=vit)


def _perturbed(params, scale=0.1):
  """The decoder's zero-initialised adaLN and head would make every output 0: randomise."""
  leaves, tree = jax.tree.flatten(nn.meta.unbox(params))
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  return jax.tree.unflatten(tree, [l + scale * jax.random.normal(k, l.shape)
                                   for l, k in zip(leaves, keys)])


@pytest.fixture(scope='module')
def model_and_params():
  model = _model()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, P, PD))
  params = _perturbed(model.init(jax.random.PRNGKey(1), x, jnp.zeros((2,)))['params'])
  return model, params, x


def _pre_fsq(model, params, x):
  """The encoder's continuous register outputs (before FSQ rounding)."""
  _, state = model.apply({'params': params}, x, method=model.encode,
                         capture_intermediates=lambda m, _: m.name == 'to_fsq')
  return state['intermediates']['encoder']['to_fsq']['__call__'][0]


def test_registers_are_ordered_and_patches_matter(model_and_params):
  """Register j sees registers 0..j only: changing register j's learned embedding leaves
  the outputs before it unchanged and changes j's; every patch reaches the registers."""
  model, params, x = model_and_params
  base = _pre_fsq(model, params, x)
  bump = jax.random.normal(jax.random.PRNGKey(5), (32,))  # not a constant: LN would remove it
  for j in (0, 3, N - 1):
    bumped = jax.tree_util.tree_map_with_path(
        lambda path, v: v.at[j].add(bump) if jax.tree_util.keystr(path).endswith(
            "['encoder']['registers']") else v, params)
    out = _pre_fsq(model, bumped, x)
    np.testing.assert_allclose(out[:, :j], base[:, :j], atol=1e-6)
    assert float(jnp.max(jnp.abs(out[:, j] - base[:, j]))) > 1e-3
  for i in (0, P - 1):
    out = _pre_fsq(model, params, x.at[:, i].add(bump[:PD]))
    assert float(jnp.min(jnp.max(jnp.abs(out - base), axis=-1))) > 0  # every register moved


def test_decoder_sees_only_the_first_keep_k_registers_and_null_sees_none(model_and_params):
  model, params, x = model_and_params
  codes, _ = model.apply({'params': params}, x, method=model.encode)
  t = jnp.full((2,), 0.5)
  decode = lambda c, k, null=None: model.apply({'params': params}, x, t, c, k, null,
                                               method=model.decode)
  keep = jnp.array([3, 5])
  base = decode(codes, keep)
  later = codes.at[:, 5:].set(-codes[:, 5:] + 0.3)  # past both rows' keep_k
  np.testing.assert_allclose(decode(later, keep), base, atol=1e-6)
  earlier = codes.at[:, 2].set(-codes[:, 2] + 0.3)  # inside both rows' keep_k
  assert float(jnp.min(jnp.max(jnp.abs(decode(earlier, keep) - base), axis=(1, 2)))) > 1e-4
  # Row 0 keeps 3 registers: its register 4 is masked, row 1's is not.
  mid = codes.at[:, 4].set(-codes[:, 4] + 0.3)
  diff = jnp.max(jnp.abs(decode(mid, keep) - base), axis=(1, 2))
  assert float(diff[0]) < 1e-6 < float(diff[1])
  null = jnp.array([True, False])
  a, b = decode(codes, keep, null), decode(earlier, keep, null)
  np.testing.assert_allclose(a[0], b[0], atol=1e-6)  # the null row ignores every code
  assert float(jnp.max(jnp.abs(a[1] - b[1]))) > 1e-4


# -- the family over a trained tiny KL-VAE ----------------------------------------------
@pytest.fixture
def tiny_flextok(tiny_vae, data_dir):
  def make(**sample):
    cfg = load_config('configs/flextok.py', 'tiny')
    cfg.data.data_dir = data_dir
    cfg.vae.workdir = tiny_vae[0]
    cfg.sample.update(sample)
    return families.get_family(cfg)
  return make


def _images(fam, n=4):
  return fam.fixed_test_images()[:n]


def test_one_compiled_sampler_decodes_every_k(tiny_flextok):
  fam = tiny_flextok()
  params = _perturbed(fam.init_params(jax.random.PRNGKey(0)), 0.3)
  images = _images(fam)
  ids = jax.jit(fam.tokenize)(params, images)
  assert ids.shape == (4, N) and ids.dtype == jnp.int32
  assert int(ids.min()) >= 0 and int(ids.max()) < fam.fsq.num_codes == 75

  @jax.jit
  @chex.assert_max_traces(n=1)
  def decode(params, ids, keep_k):
    return fam.decode_tokens(params, ids, keep_k, jax.random.PRNGKey(3))

  outs = [decode(params, ids, jnp.full((4,), k, jnp.int32)) for k in range(1, N + 1)]
  for k, out in enumerate(outs, 1):
    assert out.shape == images.shape and bool(jnp.all(jnp.isfinite(out))), k
    assert float(jnp.max(jnp.abs(out))) <= 1.0
  assert float(jnp.max(jnp.abs(outs[0] - outs[-1]))) > 1e-4  # k changes the decoding
  # detokenize(ids[:, :k]) is the same program with the tokens past k cut off.
  for k in (1, N):
    want = fam.detokenize(params, ids[:, :k], jax.random.PRNGKey(3))
    np.testing.assert_allclose(outs[k - 1], want, atol=1e-5)
  with pytest.raises(UserError, match='1 to 8 tokens'):
    fam.detokenize(params, jnp.zeros((1, N + 1), jnp.int32))


def test_apg_without_momentum_clip_or_projection_is_cfg(tiny_flextok):
  """The APG sampler (buffer carried through the Euler loop) reduces to CFG when its extras
  are off; with them on it differs."""
  fam = tiny_flextok(num_steps=2)
  params = _perturbed(fam.init_params(jax.random.PRNGKey(0)), 0.3)
  ids = fam.tokenize(params, _images(fam, 2))
  run = lambda **kw: jax.jit(lambda p, i: fam.detokenize(p, i, **kw))(params, ids)
  cfg = run(guidance='cfg', guidance_scale=3.0)
  apg_as_cfg = run(guidance='apg', guidance_scale=3.0, apg_momentum=0.0,
                   apg_norm_threshold=0.0, apg_eta=1.0)
  np.testing.assert_allclose(apg_as_cfg, cfg, atol=1e-5)
  apg = run(guidance='apg', guidance_scale=3.0)
  assert float(jnp.max(jnp.abs(apg - cfg))) > 1e-5


def test_fixed_batch_loss_falls(tiny_flextok):
  fam = tiny_flextok()
  params = nn.meta.unbox(fam.init_params(jax.random.PRNGKey(0)))
  batch = {'image': _images(fam, 8)}
  tx = optax.adam(3e-3)
  rng = jax.random.PRNGKey(1)

  @jax.jit
  def step(params, opt_state):
    (loss, _), grads = jax.value_and_grad(fam.loss, has_aux=True)(params, batch, rng, True)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  opt_state = tx.init(params)
  losses = []
  for i in range(15):
    params, opt_state, loss, grads = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0], losses
  # Straight through FSQ the encoder learns from the flow loss (not at step 0: adaLN-Zero
  # gates and the zero head keep the registers out of the first output).
  assert tree_norm(grads['encoder']) > 0


def test_repa_aligns_decoder_features_and_trains_only_blocks_up_to_its_layer(
    tiny_vae, data_dir, tmp_path):
  """REPA with a classifier file the test writes: the loss is the flow loss minus weight x
  the cosine alignment, which equals a NumPy recomputation from the projected decoder
  features and the pooled classifier map; its gradient reaches decoder block 0 (repa.layer)
  and the projector but not block 1 or the output head."""
  from jaxgen.data import default_data_config
  from jaxgen.metrics import fmnist_net
  from jaxgen.models.fmnist_classifier import FmnistClassifier
  net_cfg = default_data_config()
  net_cfg.data_dir = str(tmp_path)
  variables = FmnistClassifier().init(jax.random.PRNGKey(7), jnp.zeros((1, 32, 32, 1)))
  path = fmnist_net.save_classifier(net_cfg, variables, 0.5)

  cfg = load_config('configs/flextok.py', 'tiny')
  cfg.data.data_dir = data_dir
  cfg.vae.workdir = tiny_vae[0]
  cfg.model.decoder.depth = 2
  cfg.repa.update(weight=0.5, layer=0, tap=-1)
  cfg.repa.paths.path = path

  fam = families.get_family(cfg)
  params = _perturbed(fam.init_params(jax.random.PRNGKey(0)), 0.3)
  assert {k for k in params['decoder'] if k.startswith('repa')} == \
      {'repa_proj0', 'repa_proj1', 'repa_proj2'}
  batch, rng = {'image': _images(fam, 4)}, jax.random.PRNGKey(1)
  loss, metrics = jax.jit(lambda p: fam.loss(p, batch, rng, False))(params)
  np.testing.assert_allclose(loss, metrics['flow_loss'] - 0.5 * metrics['repa_cos'], rtol=1e-5)
  # Independently: the decoder pass the loss makes (its keep_k, t and noise redrawn from the
  # same keys), the projected block-0 features and the classifier's 4x4 map, in NumPy.
  k_rng, _, o_rng = jax.random.split(rng, 3)
  t_rng, n_rng = jax.random.split(o_rng)
  keep_k = registers.sample_keep_k(k_rng, 4, N, fam.config.model.keep_k_mode)
  x0 = fam.latent_patches(batch['image'])
  t = fam.objective.sample_t(t_rng, 4)
  z = (1 - t[:, None, None]) * x0 + t[:, None, None] * jax.random.normal(n_rng, x0.shape)
  codes, _ = fam.model.apply({'params': params}, x0, method=flextok.FlexTok.encode)
  _, state = jax.jit(functools.partial(fam.model.apply, method=flextok.FlexTok.decode,
                                       mutable=['intermediates']))(
      {'params': params}, z, t * fam.objective.time_scale, codes, keep_k)
  h = np.asarray(state['intermediates']['decoder']['repa_features'][0], np.float64)
  maps = np.asarray(fmnist_net.fmnist_taps(variables, batch['image'])[-1], np.float64)
  assert h.shape == (4, 16, maps.shape[-1]) and maps.shape[1:3] == (4, 4)
  y = maps.reshape(4, 16, -1)
  cos = np.sum(h * y, -1) / np.linalg.norm(h, axis=-1) / np.linalg.norm(y, axis=-1)
  np.testing.assert_allclose(float(metrics['repa_cos']), np.mean(cos), rtol=1e-4)

  grad = lambda: jax.device_get(
      jax.jit(jax.grad(lambda p: fam.loss(p, batch, rng, True)[0]))(params))
  grad_all = grad()
  fam.repa_weight = 0.0  # the same model and keys, the flow loss alone
  grad_flow = grad()
  diff = lambda name: tree_norm(jax.tree.map(np.subtract, grad_all['decoder'][name],
                                             grad_flow['decoder'][name]))
  assert diff('block0') > 1e-6 and tree_norm(grad_all['decoder']['repa_proj2']) > 0
  for name in ('block1', 'final_proj', 'final_adaLN'):
    assert diff(name) < 1e-7, name


def test_tiny_cli_trains_samples_and_evaluates(tiny_vae, data_dir, tmp_path):
  workdir = str(tmp_path / 'flextok')
  proc = run_cli('--config=configs/flextok.py:tiny', f'--workdir={workdir}',
                 f'--config.data.data_dir={data_dir}', f'--config.vae.workdir={tiny_vae[0]}',
                 '--config.eval_every=4', '--config.sample_every=4')
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(f'{workdir}/metrics.jsonl')]
  train = [r for r in rows if 'token_usage' in r and 'loss' in r]
  assert len(train) == 4 and all(np.isfinite(r['loss']) for r in train)
  assert all(1 <= r['keep_k_mean'] <= N for r in train)
  evals = [r for r in rows if 'eval/token_usage' in r]
  assert evals and 0 < evals[-1]['eval/token_usage'] <= 1
  assert os.path.exists(f'{workdir}/samples/step_0000004.png')
  # The coarse-to-fine experiment script on this checkpoint.
  k_sweep = load_script('flextok_k_sweep')
  out = tmp_path / 'sweep'
  result = k_sweep.main([f'--workdir={workdir}', f'--out={out}', '--num=6', '--batch_size=4',
                         f'--data_dir={data_dir}'])
  assert result['ks'] == [1, 2, 4, 8] and result['step'] == 4
  with open(out / 'k_sweep.json') as f:
    saved = json.load(f)
  for k in ('1', '8'):
    row = saved['by_k'][k]
    assert row['mse'] > 0 and np.isfinite(row['psnr'])
  assert os.path.getsize(out / 'k_sweep.png') > 1000 and os.path.getsize(out / 'k_grid.png') > 500
  # Stage 2: the shared AR model (VIM family) over this tokenizer's ordered tokens.
  cfg = load_config('configs/vim.py', 'tiny,flextok')
  cfg.data.data_dir = data_dir
  cfg.tokenizer.workdir = workdir
  vim = families.get_family(cfg)
  # Jitted: run op by op, these compiled ~260 small programs.
  params = nn.meta.unbox(jax.jit(vim.init_params)(jax.random.PRNGKey(0)))
  images = vim.tokenizer[0].fixed_test_images()
  loss, _ = jax.jit(vim.loss, static_argnums=3)(
      params, {'image': images, 'label': np.zeros(4, np.int32)}, jax.random.PRNGKey(1), False)
  assert abs(float(loss) - np.log(75)) < 1.0  # near uniform over the 75 FSQ codes at init
  labels = jnp.arange(2, dtype=jnp.int32)
  generate = jax.jit(vim.generate, static_argnames='num_tokens')
  ids = generate(params, labels, jax.random.PRNGKey(2), num_tokens=3)
  assert ids.shape == (2, 3) and int(ids.max()) < 75
  tok, tok_params = vim.tokenizer
  assert jax.jit(tok.detokenize)(tok_params, ids).shape == (2, 32, 32, 1)
  cfg.tokenizer.num_tokens = 16
  with pytest.raises(UserError, match='num_tokens=8'):
    families.get_family(cfg)


def test_bad_settings_are_one_line_errors(tiny_vae, data_dir):
  cfg = load_config('configs/flextok.py', 'tiny')
  cfg.data.data_dir = data_dir
  with pytest.raises(UserError, match='needs a trained KL-VAE'):
    families.get_family(cfg).tokenize(None, None)
  cfg.vae.update(workdir=tiny_vae[0], latent_size=8)
  with pytest.raises(UserError, match='latent_size=16'):
    families.get_family(cfg)
  cfg.vae.latent_size = 16
  cfg.sample.guidance = 'pag'
  with pytest.raises(UserError, match='guidance'):
    families.get_family(cfg)
  with pytest.raises(UserError, match='unknown flextok variant'):
    load_config('configs/flextok.py', 'd12')
