"""The logical-axis rules table and mesh construction."""
import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from jaxgen import sharding
from jaxgen.errors import UserError


def _mesh(**axes):
  cfg = ml_collections.ConfigDict(dict(dict(data=1, fsdp=1, expert=1, tensor=1), **axes))
  return sharding.make_mesh(cfg)


def test_mesh_fills_free_axis_and_rejects_bad_products():
  assert dict(_mesh(data=-1, fsdp=2).shape) == dict(data=4, fsdp=2, expert=1, tensor=1)
  with pytest.raises(UserError, match='needs 4 devices but 8'):
    _mesh(data=2, fsdp=2)
  with pytest.raises(UserError, match='not divisible'):
    _mesh(data=-1, fsdp=3)


def test_logical_rules_map_names_once_and_respect_divisibility():
  mesh = _mesh(data=2, fsdp=2, tensor=2)
  rules = sharding.DEFAULT_RULES
  assert sharding.logical_to_mesh(('embed', 'mlp'), (64, 256), mesh, rules) == P('fsdp', 'tensor')
  # 'batch' takes data+fsdp, so 'embed' (also fsdp) must stay replicated in activations.
  assert sharding.logical_to_mesh(('batch', 'length', 'embed'), (8, 16, 64), mesh, rules) == \
      P(('data', 'fsdp'), None, None)
  # A dimension the mesh axis does not divide is replicated rather than failing.
  assert sharding.logical_to_mesh(('embed', 'mlp'), (63, 256), mesh, rules) == P(None, 'tensor')
  # Rank mismatch (e.g. factored optimizer statistics) is replicated.
  assert sharding.logical_to_mesh(('embed', 'mlp'), (64,), mesh, rules) == P()


def test_batch_divisibility_check():
  mesh = _mesh(data=2, fsdp=4)
  sharding.check_batch(16, mesh)
  with pytest.raises(UserError, match='not divisible by the 8 batch shards'):
    sharding.check_batch(12, mesh)
  assert sharding.batch_sharding(mesh).spec == P(('data', 'fsdp'))
  assert jax.device_count() == 8
