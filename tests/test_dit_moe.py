"""DiT-MoE: the shared MoE layer inside DiT, its configs, counts and sharded training."""
import jax
import numpy as np
import pytest

from conftest import load_config
from jaxgen import families, train_state, trainer

# Paper Table 1: (total, activated) parameters.
PAPER_COUNTS = {
    'S/2-8E2A': (199e6, 71e6), 'S/2-16E2A': (369e6, 71e6), 'B/2-8E2A': (795e6, 286e6),
    'L/2-8E2A': (2.8e9, 1.0e9), 'XL/2-8E2A': (4.1e9, 1.5e9), 'G/2-16E2A': (16.5e9, 3.1e9),
}


@pytest.mark.parametrize('variant', sorted(PAPER_COUNTS))
def test_parameter_counts_match_paper_table(variant):
  info = trainer.info(load_config('configs/dit_moe.py', variant))  # eval_shape only
  total, activated = PAPER_COUNTS[variant]
  assert abs(info['total_params'] / total - 1) < 0.02, info['total_params']
  # G's activated count: 40 blocks x 40 D^2 = 3.17B; the paper prints 3.1B (truncated).
  tol = 0.03 if variant.startswith('G/') else 0.02
  assert abs(info['activated_params'] / activated - 1) < tol, info['activated_params']


def test_moe_training_step_logs_routing_metrics(tiny_config, tmp_path, data_dir):
  cfg = load_config('configs/dit_moe.py', 'tiny')
  cfg.data.data_dir = data_dir
  cfg.update(total_steps=2, checkpoint_every=0)
  metrics = trainer.train(cfg, str(tmp_path))
  for key in ('moe_aux_loss', 'moe_router_entropy', 'moe_dropped_fraction', 'moe_max_load',
              'moe_load/expert00', 'diffusion_loss'):
    assert key in metrics, key
  loads = [metrics[f'moe_load/expert{i:02d}'] for i in range(4)]
  np.testing.assert_allclose(sum(loads), 1.0, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss'], metrics['diffusion_loss'] + metrics['moe_aux_loss'],
                             rtol=1e-5)


def test_dense_dit_has_no_moe(tiny_config):
  fam = families.get_family(tiny_config())
  assert fam.moe is None and fam.activated_params(100) == 100


@pytest.mark.parametrize('dispatch', ['dropless', 'capacity'])
def test_expert_parallel_train_step_equals_single_device(dispatch, data_dir):
  from test_train import _mesh, _random_batches, build_step, sharded_equals_single_device
  cfg = load_config('configs/dit_moe.py', 'tiny')
  cfg.data.data_dir = data_dir
  cfg.model.moe.dispatch = dispatch
  cfg.model.moe.capacity_factor = 4.0  # nothing dropped: both layouts compute the same function
  cfg.model.depth = 1  # one MoE block shows the layout; a second only doubles compile time
  fam = families.get_family(cfg)
  batches = _random_batches(2, 8)
  state = sharded_equals_single_device(cfg, fam, batches, data=2, expert=4)
  mesh = _mesh(jax.devices(), data=2, expert=4)
  w = state.params['block0']['moe']['wi_gate']  # [E=4, D, H]
  assert {s.data.shape[0] for s in w.addressable_shards} == {1}  # E/4 experts per device
  # The compiled step exchanges tokens with all-to-all.
  step, abstract, rules = build_step(cfg, fam, mesh)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batches[0])
  with train_state.mesh_context(mesh, rules):
    hlo = step.lower(abstract, batch).compile().as_text()
  assert 'all-to-all' in hlo
