"""DiT-MoE routing analysis: counting/summary on synthetic routing, and train -> analyze."""
import json
import os

import numpy as np
import pytest

from conftest import load_config, run_cli
from jaxgen import objectives, trainer
from jaxgen.analysis import routing
from jaxgen.errors import UserError

B, L, K, E, C, T = 8, 16, 2, 4, 10, 3
LABELS = np.arange(B) % C


def _stats(route, labels=LABELS, num_experts=E):
  """route(t, b, l) -> K expert ids; counts and statistics of one synthetic layer."""
  image, position, null = [], [], []
  rng = np.random.default_rng(1)
  for t in range(T):
    idx = np.array([[route(t, b, l) for l in range(L)] for b in range(B)], np.int32)
    img, pos = routing.count_assignments(idx, num_experts)
    perm = np.argsort(rng.random((B, L)), axis=1)
    image.append(np.asarray(img))
    position.append(np.asarray(pos))
    null.append(np.asarray(routing.count_assignments(idx, num_experts, perm)[1]))
  image, position, null = (np.stack(v)[None] for v in (image, position, null))
  st = routing.routing_statistics(image, position, labels, C, position_null_counts=null)
  return st, st['summary']


def test_routing_by_position_only():
  st, s = _stats(lambda t, b, l: [l % E, (l + 1) % E])
  assert s['assignments_per_layer'] == B * L * K * T
  np.testing.assert_allclose(st['counts']['position'].sum(), B * L * K * T)
  dep = s['dependence']
  # Each position uses 2 of 4 equally used experts: TV(p(e|l), uniform) = 0.5 exactly.
  np.testing.assert_allclose(dep['position'], [0.5])
  np.testing.assert_allclose(dep['timestep'], [0.0])
  np.testing.assert_allclose(dep['class'], [0.0])
  np.testing.assert_allclose(dep['class_null'], [0.0])
  assert dep['position_null'][0] < 0.35  # shuffling positions per image breaks the pattern
  np.testing.assert_allclose(s['evenness'], [1.0])
  np.testing.assert_allclose(s['specialisation_by_timestep'], [[0.0] * T])
  np.testing.assert_allclose(st['frequency']['position'].sum(1), 1.0)  # columns are p(e | l)
  np.testing.assert_allclose(s['position_dependence_by_timestep'], [[0.5] * T])


def test_routing_by_class_and_timestep():
  two = np.arange(B) % 2  # 4 images per class, so a permutation can separate class from image
  st, s = _stats(lambda t, b, l: [two[b], two[b] + 1], labels=two)
  dep = s['dependence']
  np.testing.assert_allclose(dep['class'], [0.25])  # p(e|0) = (.5, .5, 0, 0), p = (.25, .5, .25, 0)
  assert dep['class_null'][0] < 0.2
  np.testing.assert_allclose([dep['position'][0], dep['timestep'][0]], [0.0, 0.0], atol=1e-12)

  # Only the noisiest time bin routes everything to experts 0 and 1.
  st, s = _stats(lambda t, b, l: [0, 1] if t == T - 1 else [l % E, (l + 1) % E])
  spec = s['specialisation_by_timestep'][0]
  np.testing.assert_allclose(spec, [0.0, 0.0, 0.5])
  assert s['dependence']['timestep'][0] > s['dependence']['timestep_null'][0]
  np.testing.assert_allclose(st['frequency']['timestep'][0][:, -1], [0.5, 0.5, 0, 0])


def test_evenness_extremes():
  _, s = _stats(lambda t, b, l: [0], num_experts=E)  # top-1, always expert 0
  np.testing.assert_allclose(s['evenness'], [0.0], atol=1e-12)
  rng = np.random.default_rng(0)
  image = np.eye(E, dtype=np.int64)[rng.integers(0, E, (1, T, 512))]  # [1, T, N, E], top-1
  position = np.full((1, T, E, L), 1)
  s = routing.routing_statistics(image, position, rng.integers(0, C, 512), C)['summary']
  assert s['evenness'][0] > 0.99


def test_noise_coefficients_follow_the_objectives():
  t = routing.timestep_grid(4)
  np.testing.assert_allclose(t, [0.125, 0.375, 0.625, 0.875])
  rf = objectives.make_objective(load_config('configs/dit_moe.py', 'demo').objective)
  a, s, model_t = routing.noise_coefficients(rf, t)
  np.testing.assert_allclose(a, 1 - t)
  np.testing.assert_allclose(s, t)
  np.testing.assert_allclose(model_t, t * 1000.0)  # the demo's time_scale
  ddpm = objectives.make_objective(load_config('configs/dit_moe.py', 'tiny,ddpm').objective)
  a, s, model_t = routing.noise_coefficients(ddpm, [0.05, 0.5])
  np.testing.assert_array_equal(model_t, [50, 500])
  np.testing.assert_allclose(a ** 2, ddpm.alphas_cumprod[[50, 500]])
  np.testing.assert_allclose(a ** 2 + s ** 2, 1.0)


def test_train_then_analyze(tmp_path, data_dir):
  cfg = load_config('configs/dit_moe.py', 'tiny')
  cfg.data.data_dir = data_dir
  cfg.update(total_steps=2, checkpoint_every=0)
  workdir = str(tmp_path / 'moe')
  trainer.train(cfg, workdir)
  cfg.analysis.update(num_batches=1, num_timesteps=3)
  summary = routing.analyze(cfg, workdir)

  outdir = os.path.join(workdir, 'analysis', 'routing')
  layers = ['block0', 'block1']  # tiny: depth 2, MoE in every block
  assert summary['layers'] == layers and summary['step'] == 2
  names = sorted(os.listdir(outdir))
  assert names == ['block0.png', 'block1.png', 'routing.json', 'routing_counts.npz',
                   'summary.png'], names
  with open(os.path.join(outdir, 'routing.json')) as f:
    report = json.load(f)
  num_images, num_t, num_patches, top_k = cfg.batch_size, 3, (32 // 8) ** 2, 2
  expected = num_images * num_t * num_patches * top_k
  for name in layers:
    counts = report['layer_stats'][name]['counts']
    for factor in ('overall', 'timestep', 'position', 'class'):
      assert np.sum(counts[factor]) == expected, (name, factor)
    assert np.shape(counts['position']) == (4, num_patches)
    assert np.shape(counts['class']) == (4, 10) and np.shape(counts['timestep']) == (4, 3)
  for values in summary['dependence'].values():
    assert all(0 <= v <= 1 for v in values)
  assert all(0 < v <= 1 for v in summary['evenness'])
  assert report['summary']['dependence'] == summary['dependence']

  # The CLI mode prints the same summary (JSON on the last line).
  out = run_cli('--config=configs/dit_moe.py:tiny', f'--workdir={workdir}', '--mode=analyze',
                '--config.analysis.num_batches=1', '--config.analysis.num_timesteps=3',
                f'--config.data.data_dir={data_dir}')
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.strip().splitlines()[-1])['dependence'] == summary['dependence']


def test_analyze_needs_moe_and_a_checkpoint(tmp_path, data_dir):
  dense = load_config('configs/dit.py', 'tiny')
  with pytest.raises(UserError, match='needs an MoE model'):
    routing.analyze(dense, str(tmp_path))
  cfg = load_config('configs/dit_moe.py', 'tiny')
  cfg.data.data_dir = data_dir
  with pytest.raises(UserError, match='no checkpoint'):
    routing.analyze(cfg, str(tmp_path / 'empty'))


def test_collect_routing_ddpm_untrained(data_dir):
  cfg = load_config('configs/dit_moe.py', 'tiny,ddpm')
  cfg.data.data_dir = data_dir
  cfg.model.moe.every = 2  # MoE only in block 0
  exp = trainer.Experiment(cfg, None)
  state = exp.init_state()
  result = routing.collect_routing(exp, state.ema_params, num_batches=2, timesteps=[0.1, 0.9])
  assert result['layers'] == ['block0'] and result['model_timesteps'] == [100.0, 900.0]
  assert result['image_counts'].shape == (1, 2, 16, 4)
  np.testing.assert_array_equal(result['image_counts'].sum((2, 3)), 16 * 16 * 2)
  np.testing.assert_array_equal(result['position_null_counts'].sum((2, 3)),
                                result['position_counts'].sum((2, 3)))
  assert result['labels'].shape == (16,)
