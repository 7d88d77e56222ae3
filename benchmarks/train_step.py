r"""Training-step throughput and MFU of DiT configs, built exactly as the trainer builds them.

  python benchmarks/train_step.py                       # tiny and S/2 on 32x32x1 Fashion-MNIST
  python benchmarks/train_step.py --configs S/2,B/2 --batch 256 --dtype bfloat16   # on a GPU
  python benchmarks/train_step.py --family dit_moe --configs B/2-8E2A --batch 256 --dtype bfloat16

Synthetic global batches (images uniform in [-1, 1], random labels) replace the dataset.
The step is compiled ahead of time (reported separately), warmed up, then timed with
jax.block_until_ready. MFU is reported against the matmul ceiling measured in the same run
and, on a known GPU, against its dense bf16 peak.
"""
import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from jaxgen import sharding, train_state, trainer  # noqa: E402

COLUMNS = (
    ('config', 'config'), ('dtype', 'dtype'), ('batch', 'batch'), ('params', 'params'),
    ('compile_s', 'compile s'), ('step_ms_median', 'step ms (med)'),
    ('step_ms_mean', 'step ms (mean)'), ('images_per_s', 'img/s'),
    ('train_gflops_per_step', 'GFLOP/step'), ('achieved_tflops', 'TFLOP/s'),
    ('mfu_measured', 'MFU (measured)'), ('mfu_peak', 'MFU (bf16 peak)'),
    ('peak_memory_mib', 'peak mem MiB'),
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--family', default='dit', help='configs/<family>.py (dit, dit_moe)')
  p.add_argument('--configs', default='tiny,S/2',
                 help="configs/<family>.py variants, comma-separated ('S/2,ddpm' for DDPM)")
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='config override, e.g. model.moe.dispatch=capacity (repeatable)')
  p.add_argument('--batch', type=int, default=None,
                 help='global batch (default: 32 on an accelerator, 8 on CPU)')
  p.add_argument('--steps', type=int, default=10, help='timed steps after warm-up')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after compilation')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='config.model.dtype (compute dtype; parameters stay float32)')
  p.add_argument('--out', default=os.path.join(common.REPO, 'benchmarks', 'results',
                                               'train_step.json'))
  args = p.parse_args(argv)
  if args.batch is None:
    args.batch = 32 if common.on_accelerator() else 8
  return args


def make_config(variant, batch, dtype, steps, family='dit', overrides=()):
  config = common.load_config_module(family).get_config(variant)
  for item in overrides:
    key, value = item.split('=', 1)
    parent = config
    *path, leaf = key.split('.')
    for name in path:
      parent = parent[name]
    old = parent[leaf]
    if isinstance(old, bool):
      value = value.lower() in ('1', 'true', 'yes')
    elif old is not None:
      value = type(old)(value)
    parent[leaf] = value
  config.batch_size = batch
  config.model.dtype = dtype
  config.total_steps = max(config.total_steps, steps)  # only shapes the lr schedule
  return config


def synthetic_batches(config, mesh, count, seed=0):
  """`count` global batches of the dataset's shape, assembled like the trainer's."""
  rng = np.random.default_rng(seed)
  d = config.data
  local = config.batch_size // jax.process_count()
  out = []
  for _ in range(count):
    local_batch = {
        'image': rng.uniform(-1, 1, (local, d.image_size, d.image_size, d.channels)
                             ).astype(np.float32),
        'label': rng.integers(0, d.num_classes, (local,)).astype(np.int32),
    }
    out.append(sharding.global_batch(local_batch, mesh))
  return out


def bench_config(variant, args, ceilings, peak):
  config = make_config(variant, args.batch, args.dtype, args.warmup + args.steps,
                       args.family, args.set)
  label = ' '.join([variant] + args.set)
  return measure(config, label, args, ceilings, peak)


def measure(config, label, args, ceilings, peak):
  """Compiles and times the trainer's step for `config`; one result row labelled `label`."""
  exp = trainer.Experiment(config, workdir=None)
  state = exp.init_state()
  step_fn = train_state.make_train_step(exp.family, exp.tx, exp.schedule, config, exp.mesh,
                                        exp.shardings, sharding.batch_sharding(exp.mesh))
  batches = synthetic_batches(config, exp.mesh, count=2)
  with exp.context():
    compiled, compile_s = common.timed_compile(step_fn, state, batches[0])
    holder = {'state': state, 'i': 0}

    def one_step():  # the state is donated, so each step consumes the previous one
      holder['state'], metrics = compiled(holder['state'], batches[holder['i'] % 2])
      holder['i'] += 1
      return metrics

    stats = common.time_calls(one_step, args.steps, warmup=args.warmup)
    loss = float(jax.device_get(one_step()['loss']))
  flops = exp.family.flops_per_example(train=True) * config.batch_size
  achieved = flops / stats['median_s']
  ceiling = ceilings.get(args.dtype, ceilings['float32'])
  mem, mem_source = common.peak_memory()
  return {
      'config': label, 'dtype': args.dtype, 'batch': config.batch_size,
      'params': common.param_count(holder['state'].params),
      'compile_s': compile_s,
      'step_ms_median': 1e3 * stats['median_s'], 'step_ms_mean': 1e3 * stats['mean_s'],
      'step_ms_min': 1e3 * stats['min_s'],
      'images_per_s': config.batch_size / stats['median_s'],
      'train_gflops_per_step': flops / 1e9, 'achieved_tflops': achieved / 1e12,
      'mfu_measured': common.ratio(achieved, ceiling),
      'mfu_measured_ceiling_dtype': args.dtype if args.dtype in ceilings else 'float32',
      'mfu_peak': common.ratio(achieved, peak),
      'peak_memory_mib': mem / 2 ** 20, 'peak_memory_source': mem_source,
      'final_loss': loss, 'steps_timed': args.steps, 'step_times_s': stats['times_s'],
  }


def main(argv=None):
  args = parse_args(argv)
  ceilings, machine = common.start()
  rows = []
  for variant in common.parse_configs(args.configs):
    rows.append(bench_config(variant, args, ceilings, machine['peak_bf16_flops']))
    print(f"  {variant}: {rows[-1]['step_ms_median']:.1f} ms/step", flush=True)
  common.finish(args, rows, COLUMNS, machine)


if __name__ == '__main__':
  main()
