"""Defaults shared by every family's config; `configs/<family>.py` overrides them."""
import ast
import importlib.util
import os

import ml_collections

from jaxgen import sharding
from jaxgen.errors import UserError
from jaxgen.data.config import default_data_config


def base_config():
  c = ml_collections.ConfigDict()
  c.family = ''
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 64            # global, over all processes and devices
  c.grad_accum_steps = 1
  c.log_every = 50
  c.checkpoint_every = 500     # 0 disables periodic checkpoints (the final one is kept)
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.sample_every = 0           # 0: only at the end of training
  c.eval_every = 0
  c.eval_batches = 10           # test batches averaged by the 'loss' metric
  # What --mode=eval and the periodic eval compute (see jaxgen/evaluation.py).
  c.eval = ml_collections.ConfigDict(dict(
      metrics='loss',              # comma-separated: loss, fid, is, pr
      feature_net='fmnist_classifier',  # or 'inception' (needs inception_path)
      inception_path='',           # pt_inception-2015-12-05 .pth, or its converted .npz
      num_samples=1000,            # generated images per sample-based evaluation
      num_real=10000,              # real images of real_split (statistics cached)
      real_split='test',
      reference_stats='',          # a .npz with 'mu', 'sigma' to use instead of real_split's
      batch_size=0,                # 0: batch_size
      seed=0,
      is_splits=10,
      pr_k=3))
  c.progress_bar = True
  c.data = default_data_config()
  c.optim = ml_collections.ConfigDict(dict(
      name='adamw', lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      schedule='constant', warmup_steps=0, end_lr_ratio=0.0, grad_clip=1.0,
      ema_decay=0.9999, ema_warmup=True))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  c.axis_rules = sharding.DEFAULT_RULES
  return c


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path, arg):
  """get_config(arg) of a config file (e.g. 'configs/vitvqgan.py', relative to the repo),
  imported by path as --config does (configs/ is not a package)."""
  full = path if os.path.isabs(path) else os.path.join(REPO, path)
  name = 'jaxgen_configs_' + os.path.splitext(os.path.basename(full))[0]
  spec = importlib.util.spec_from_file_location(name, full)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def apply_overrides(config, items):
  """Sets each 'a.b.c=value' of `items` in `config`, the value parsed as the current value's
  type (see _parse_like); a key the config lacks, or a value that does not parse, is a
  UserError (one line naming the override)."""
  for item in items:
    key, sep, value = item.partition('=')
    *path, leaf = key.split('.')
    parent = config
    try:
      for name in path:
        parent = parent[name]
      old = parent[leaf]
    except (KeyError, TypeError):
      raise UserError(f'config override {item!r}: the config has no {key!r}; '
                      'write KEY=VALUE with a dotted key it has, e.g. model.width=512') from None
    if not sep:
      raise UserError(f'config override {item!r}: write KEY=VALUE, e.g. {key}={old}')
    parent[leaf] = _parse_like(old, value, item)
  return config


def _parse_like(old, value, item):
  """`value` (a string) as the type of `old`: bool from true/false/1/0/yes/no, a tuple or list
  from its Python literal, a number by its type; a string, or anything when `old` is None."""
  try:
    if isinstance(old, bool):
      return {'1': True, 'true': True, 'yes': True,
              '0': False, 'false': False, 'no': False}[value.lower()]
    if isinstance(old, (tuple, list)):
      return type(old)(ast.literal_eval(value))
    return value if old is None else type(old)(value)
  except (KeyError, ValueError, SyntaxError, TypeError):
    raise UserError(f'config override {item!r}: {value!r} is not a {type(old).__name__} '
                    f'like the current value {old!r}') from None
