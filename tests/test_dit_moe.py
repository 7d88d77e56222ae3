"""DiT-MoE: the shared MoE layer inside DiT, its configs, counts and sharded training."""
import jax
import numpy as np
import pytest

from conftest import load_config
from jaxgen import families, train_state, trainer

# Paper Table 1, as printed: (total, activated) parameters.
PAPER_COUNTS = {
    'S/2-8E2A': ('199M', '71M'), 'S/2-16E2A': ('369M', '71M'), 'B/2-8E2A': ('795M', '286M'),
    'L/2-8E2A': ('2.8B', '1.0B'), 'XL/2-8E2A': ('4.1B', '1.5B'), 'G/2-16E2A': ('16.5B', '3.1B'),
}


def _printed(text):
  """'2.8B' -> (2.8e9, 1e8): the value and the unit of its last printed digit."""
  scale = {'M': 1e6, 'B': 1e9}[text[-1]]
  decimals = len(text[:-1].partition('.')[2])
  return float(text[:-1]) * scale, scale / 10**decimals


@pytest.mark.parametrize('variant', sorted(PAPER_COUNTS))
def test_parameter_counts_match_paper_table(variant):
  info = trainer.info(load_config('configs/dit_moe.py', variant))  # eval_shape only
  for kind, text in zip(('total_params', 'activated_params'), PAPER_COUNTS[variant]):
    count, (value, unit) = info[kind], _printed(text)
    # The table prints some counts rounded (XL activated: 1.49B -> 1.5B) and some truncated
    # (XL total: 4.17B -> 4.1B; G activated, 40 blocks x 40 D^2 + embedders: 3.18B -> 3.1B),
    # so our count must read as the printed one either way: within [value - unit/2, value + unit).
    assert value - unit / 2 <= count < value + unit, (kind, count, text)
    tol = 0.03 if (variant, kind) == ('G/2-16E2A', 'activated_params') else 0.02
    assert abs(count / value - 1) < tol, (kind, count, text)


def test_moe_training_step_logs_routing_metrics(tiny_config, tmp_path, data_dir):
  cfg = load_config('configs/dit_moe.py', 'tiny')
  cfg.data.data_dir = data_dir
  cfg.update(total_steps=2, checkpoint_every=0)
  metrics = trainer.train(cfg, str(tmp_path))
  for key in ('moe_aux_loss', 'moe_router_entropy', 'moe_dropped_fraction', 'moe_max_load',
              'moe_window_spill', 'moe_window_overflow', 'moe_load/expert00', 'diffusion_loss'):
    assert key in metrics, key
  for key in ('moe_window_spill', 'moe_window_overflow'):  # shares of the 2 MoE layers
    assert metrics[key] in (0.0, 0.5, 1.0), key
  assert metrics['moe_window_spill'] + metrics['moe_window_overflow'] <= 1.0
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
