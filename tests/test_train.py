"""The shared train step and loop: sharded == unsharded, accumulation, EMA, outputs, traces."""
import glob
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from jaxgen import families, optim, sharding, train_state, trainer
from jaxgen.families.base import FamilyBase


def _mesh(devices, **axes):
  return sharding.make_mesh(ml_collections.ConfigDict(
      dict(dict(data=1, fsdp=1, expert=1, tensor=1), **axes)), devices)


def build_step(cfg, fam, mesh):
  """(jitted train step, abstract state, logical rules) exactly as the trainer builds them."""
  rules = sharding.rules_tuple(cfg.axis_rules)
  tx, schedule = fam.make_optimizer(cfg.total_steps)
  abstract, shardings = train_state.abstract_state(fam, tx, jax.random.PRNGKey(0), mesh, rules)
  step = train_state.make_train_step(fam, tx, schedule, cfg, mesh, shardings,
                                     sharding.batch_sharding(mesh))
  return step, abstract, rules


def _run_steps(cfg, fam, mesh, batches):
  step, _, rules = build_step(cfg, fam, mesh)
  tx, _ = fam.make_optimizer(cfg.total_steps)
  state, _ = train_state.init_state(fam, tx, jax.random.PRNGKey(0), mesh, rules)
  losses = []
  with train_state.mesh_context(mesh, rules):
    for b in batches:
      state, m = step(state, sharding.global_batch(b, mesh))
      losses.append(float(m['loss']))
  return state, losses


def _random_batches(n, batch, seed=0):
  rng = np.random.default_rng(seed)
  return [{'image': rng.uniform(-1, 1, (batch, 32, 32, 1)).astype(np.float32),
           'label': rng.integers(0, 10, batch).astype(np.int32)} for _ in range(n)]


def sharded_equals_single_device(cfg, fam, batches, **mesh_axes):
  """Trains on 1 device and on the 8-device mesh `mesh_axes`; asserts equal losses,
  parameters and EMA; returns the sharded state."""
  ref_state, ref_losses = _run_steps(cfg, fam, _mesh(jax.devices()[:1]), batches)
  state, losses = _run_steps(cfg, fam, _mesh(jax.devices(), **mesh_axes), batches)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  chex.assert_trees_all_close(jax.device_get(state.params), jax.device_get(ref_state.params),
                              rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(jax.device_get(state.ema_params),
                              jax.device_get(ref_state.ema_params), rtol=1e-4, atol=1e-6)
  return state


def test_sharded_step_equals_single_device(tiny_config):
  cfg = tiny_config()
  cfg.model.update(width=64, num_heads=4)  # mlp 256: divisible by fsdp=4
  fam = families.get_family(cfg)
  state = sharded_equals_single_device(cfg, fam, _random_batches(3, 8), data=2, fsdp=4)
  # A large weight is really split over 'fsdp': each device holds a quarter of its rows.
  w = state.params['block0']['mlp']['fc1']['kernel']  # [embed=64, mlp=256]
  assert w.sharding.spec == jax.sharding.PartitionSpec('fsdp', None)
  assert {s.data.shape for s in w.addressable_shards} == {(16, 256)}
  mu = state.opt_state[1][0].mu['block0']['mlp']['fc1']['kernel']  # Adam moments follow
  assert mu.sharding.spec == w.sharding.spec


class _LinearRegression(FamilyBase):
  """A deterministic family (no noise in the loss) to test the step's arithmetic."""

  def init_params(self, rng):
    init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ('embed', 'mlp'))
    return {'w': init(rng, (4, 2))}

  def loss(self, params, batch, rng, train):
    err = batch['x'] @ params['w'] - batch['y']
    return jnp.mean(err ** 2), {'abs_err': jnp.mean(jnp.abs(err))}

  def sample(self, params, rng, labels):
    return None

  def flops_per_example(self, train=True):
    return 16


def _regression_config(accum):
  cfg = ml_collections.ConfigDict(dict(
      grad_accum_steps=accum, total_steps=10, axis_rules=sharding.DEFAULT_RULES,
      optim=dict(name='adamw', lr=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                 schedule='constant', warmup_steps=0, grad_clip=0.0, ema_decay=0.5,
                 ema_warmup=False)))
  return cfg


def test_gradient_accumulation_equals_full_batch_and_ema():
  rng = np.random.default_rng(0)
  batch = {'x': rng.normal(size=(8, 4)).astype(np.float32),
           'y': rng.normal(size=(8, 2)).astype(np.float32)}
  mesh = _mesh(jax.devices()[:1])
  results = []
  for accum in (1, 4):
    cfg = _regression_config(accum)
    fam = _LinearRegression(cfg)
    state, losses = _run_steps(cfg, fam, mesh, [batch, batch])
    results.append((jax.device_get(state), losses))
  (s1, l1), (s4, l4) = results
  np.testing.assert_allclose(l1, l4, rtol=1e-6)
  np.testing.assert_allclose(s1.params['w'], s4.params['w'], rtol=1e-5)
  # Independent check of step 1 and the EMA: Adam's first step moves each weight by -lr*sign(g).
  w0 = np.asarray(jax.device_get(train_state.init_state(
      fam, optim.make_optimizer(cfg.optim, 10)[0], jax.random.PRNGKey(0), mesh,
      sharding.rules_tuple(cfg.axis_rules))[0].params['w']), np.float64)
  g = 2 * batch['x'].T @ (batch['x'] @ w0 - batch['y']) / batch['y'].size
  w1 = w0 - 0.1 * np.sign(g)
  np.testing.assert_allclose(l1[0], np.mean((batch['x'] @ w0 - batch['y']) ** 2), rtol=1e-5)
  # After two steps with decay 0.5: ema = 0.25 w0 + 0.25 w1 + 0.5 w2.
  w2 = np.asarray(s1.params['w'], np.float64)
  np.testing.assert_allclose(s1.ema_params['w'], 0.25 * w0 + 0.25 * w1 + 0.5 * w2, rtol=1e-4)


def test_ema_warmup_and_schedule():
  cfg = ml_collections.ConfigDict(dict(ema_decay=0.999, ema_warmup=True))
  np.testing.assert_allclose(train_state.ema_decay(cfg, 0), 0.1)
  np.testing.assert_allclose(train_state.ema_decay(cfg, 10_000), 0.999)
  ocfg = ml_collections.ConfigDict(dict(lr=1.0, schedule='cosine', warmup_steps=10,
                                        end_lr_ratio=0.1))
  sched = optim.make_schedule(ocfg, 110)
  np.testing.assert_allclose([sched(0), sched(5), sched(10), sched(60), sched(110)],
                             [0.0, 0.5, 1.0, 0.55, 0.1], rtol=1e-5, atol=1e-6)


def test_train_loop_writes_outputs_and_traces_once(tiny_config, tmp_path):
  cfg = tiny_config()
  cfg.update(total_steps=4, checkpoint_every=2, sample_every=2, eval_every=4)
  original = families.get_family

  def counted_family(config):
    fam = original(config)
    fam.loss = chex.assert_max_traces(fam.loss, n=2)  # one trace for train, one for eval
    return fam

  trainer.families.get_family = counted_family
  try:
    last = trainer.train(cfg, str(tmp_path))
  finally:
    trainer.families.get_family = original
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3, 4]
  assert all(np.isfinite(r['loss']) for r in rows if 'loss' in r)
  assert any('eval/loss' in r for r in rows)
  assert last['loss'] == rows[3]['loss']
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
  assert glob.glob(str(tmp_path / 'events.out.tfevents.*'))
  assert sorted(os.listdir(tmp_path / 'samples')) == ['step_0000002.png', 'step_0000004.png']


def test_bf16_compute_keeps_f32_params_and_tracks_f32_loss(tiny_config):
  cfg = tiny_config()
  fam32 = families.get_family(cfg)
  cfg16 = tiny_config()
  cfg16.model.dtype = 'bfloat16'
  fam16 = families.get_family(cfg16)
  mesh = _mesh(jax.devices()[:1])
  batches = _random_batches(2, 8, seed=1)
  s32, l32 = _run_steps(cfg, fam32, mesh, batches)
  s16, l16 = _run_steps(cfg16, fam16, mesh, batches)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.params))
  np.testing.assert_allclose(l16, l32, rtol=2e-2)
  assert not np.array_equal(l16, l32)  # bf16 really was used


def test_ddpm_variant_trains_and_samples(tiny_config, tmp_path):
  cfg = tiny_config('tiny,ddpm')
  assert cfg.objective.name == 'ddpm' and cfg.sample.method == 'ddim'
  cfg.sample.method = 'ddpm'
  metrics = trainer.train(cfg, str(tmp_path))
  assert np.isfinite(metrics['loss'])
  img = np.asarray(Image.open(
      tmp_path / 'samples' / 'step_0000004.png'))
  assert img.ndim == 3 and img.shape[2] == 3


def test_adafactor_with_fsdp_replicates_factored_statistics(tiny_config):
  cfg = tiny_config()
  cfg.model.update(width=64, num_heads=4)
  cfg.optim.update(name='adafactor', lr=1e-2)
  fam = families.get_family(cfg)
  state, losses = _run_steps(cfg, fam, _mesh(jax.devices(), data=2, fsdp=4),
                             _random_batches(2, 8))
  assert all(np.isfinite(losses))
  w = state.params['block0']['mlp']['fc1']['kernel']
  assert w.sharding.spec == jax.sharding.PartitionSpec('fsdp', None)
  # Factored second moments have other shapes than the weights: replicated, not mis-sharded.
  for leaf in jax.tree.leaves(state.opt_state):
    assert len(leaf.sharding.spec) <= leaf.ndim
