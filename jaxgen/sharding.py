"""Device mesh, logical-axis rules and shardings: one table decides where every array lives.

Parameters carry logical axis names (see models/layers.py). `logical_to_mesh`
maps a tuple of names to a PartitionSpec with the config's rules: each name
takes the first rule whose mesh axes are still unused in that spec and divide
the dimension, else it is replicated (so odd-sized tiny models still shard).
"""
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgen.errors import UserError

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')
BATCH_AXES = ('data', 'fsdp', 'expert')  # the global batch is split over all of these

# maxtext-style defaults: FSDP shards the 'embed' side of every weight, tensor
# parallelism the 'mlp'/'heads' side, experts go to 'expert'.
DEFAULT_RULES = (
    ('batch', BATCH_AXES),
    ('length', None),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('vocab', 'tensor'),
    ('norm', None),
    ('expert', 'expert'),
)


def mesh_shape(mesh_cfg, num_devices):
  """Sizes for MESH_AXES; one axis may be -1 (all remaining devices, default 'data')."""
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise UserError(f'mesh: only one axis may be -1, got {free}')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise UserError(f'mesh: {num_devices} devices are not divisible by the fixed axes '
                      f'(product {fixed}); set --config.mesh.* so they divide {num_devices}')
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise UserError(f'mesh {sizes} needs {math.prod(sizes.values())} devices but '
                    f'{num_devices} are available; set --config.mesh.* to multiply to {num_devices}')
  return sizes


def make_mesh(mesh_cfg, devices=None):
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)


def rules_tuple(rules):
  return tuple((name, tuple(ax) if isinstance(ax, (list, tuple)) else ax) for name, ax in rules)


def logical_to_mesh(names, shape, mesh, rules):
  """PartitionSpec for an array of `shape` whose dims carry logical `names`."""
  if names is None or len(names) != len(shape):
    return P()  # e.g. factored optimizer statistics: small, replicate
  used, spec = set(), []
  for name, dim in zip(names, shape):
    choice = None
    for rule_name, axes in rules:
      if rule_name != name or axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      size = math.prod(mesh.shape[a] for a in axes)
      if axes and not used.intersection(axes) and dim % size == 0:
        choice = axes[0] if len(axes) == 1 else axes
        used.update(axes)
        break
    spec.append(choice)
  return P(*spec)


def is_boxed(x):
  return isinstance(x, nn.LogicallyPartitioned)


def tree_shardings(abstract_boxed_tree, mesh, rules):
  """NamedShardings for a tree whose leaves may be LogicallyPartitioned boxes."""
  def one(leaf):
    if is_boxed(leaf):
      return NamedSharding(mesh, logical_to_mesh(leaf.names, leaf.value.shape, mesh, rules))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, abstract_boxed_tree, is_leaf=is_boxed)


def batch_sharding(mesh):
  """Leading (batch) dim split over the batch axes; valid for arrays of any rank."""
  axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
  return NamedSharding(mesh, P(axes))


def batch_shards(mesh):
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(global_batch, mesh, what='batch_size'):
  n = batch_shards(mesh)
  if global_batch % n:
    raise UserError(f'{what}={global_batch} is not divisible by the {n} batch shards of mesh '
                    f'data x fsdp x expert = {dict((a, mesh.shape[a]) for a in BATCH_AXES)}; '
                    f'use a multiple of {n}')
  if global_batch % jax.process_count():
    raise UserError(f'{what}={global_batch} is not divisible by {jax.process_count()} processes')


def global_batch(local_batch, mesh):
  """Assembles each process's rows into global arrays sharded over the batch axes."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh), x),
      local_batch)
