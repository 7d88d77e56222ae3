r"""Training-step throughput and MFU of DiT configs, built exactly as the trainer builds them.

  python benchmarks/train_step.py                       # tiny and S/2 on 32x32x1 Fashion-MNIST
  python benchmarks/train_step.py --configs S/2,B/2 --batch 256 --dtype bfloat16   # on a GPU
  python benchmarks/train_step.py --family dit_moe --configs B/2-8E2A --batch 256 --dtype bfloat16

Synthetic global batches (images uniform in [-1, 1], random labels) replace the dataset.
The step is compiled ahead of time (reported separately), warmed up, then timed with
jax.block_until_ready. MFU is reported against the matmul ceiling measured in the same run
and, on a known GPU, against its dense bf16 peak.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from jaxgen import config_base, trainer  # noqa: E402

COLUMNS = (
    ('config', 'config'), ('dtype', 'dtype'), ('batch', 'batch'), ('params', 'params'),
    ('compile_s', 'compile s'), ('step_ms_median', 'step ms (med)'),
    ('step_ms_mean', 'step ms (mean)'), ('images_per_s', 'img/s'),
    ('train_gflops_per_step', 'GFLOP/step'), ('achieved_tflops', 'TFLOP/s'),
    ('mfu_measured', 'MFU (measured)'), ('mfu_peak', 'MFU (bf16 peak)'),
    ('peak_memory_mib', 'peak mem MiB'),
)


def parse_args(argv=None):
  p = common.arg_parser(__doc__, 'train_step')
  p.add_argument('--family', default='dit', help='configs/<family>.py (dit, dit_moe)')
  common.add_train_args(p, 'tiny,S/2', "configs/<family>.py variants, comma-separated "
                        "('S/2,ddpm' for DDPM)", 'model.moe.dispatch=capacity')
  return common.fill_defaults(p.parse_args(argv), batch=(32, 8), warmup=(2, 2))


def make_config(variant, batch, dtype, steps, family='dit', overrides=()):
  config = config_base.apply_overrides(common.load_config_module(family).get_config(variant),
                                       overrides)
  config.batch_size = batch
  config.model.dtype = dtype
  config.total_steps = max(config.total_steps, steps)  # only shapes the lr schedule
  return config


def bench_config(variant, args, ceilings, peak):
  config = make_config(variant, args.batch, args.dtype, args.warmup + args.steps,
                       args.family, args.set)
  label = ' '.join([variant] + args.set)
  return measure(config, label, args, ceilings, peak)


def measure(config, label, args, ceilings, peak, state=None):
  """Compiles and times the trainer's step for `config` (from `state`, else a fresh one; it is
  donated); one result row labelled `label`."""
  exp = trainer.Experiment(config, workdir=None)
  state = exp.init_state() if state is None else state
  stats, compile_s, metrics, state = common.time_train_step(exp, state, args.steps,
                                                             warmup=args.warmup)
  loss = float(metrics['loss'])  # the last timed step's
  flops = exp.family.flops_per_example(train=True) * config.batch_size
  achieved = flops / stats['median_s']
  ceiling = ceilings.get(args.dtype, ceilings['float32'])
  mem, mem_source = common.peak_memory()
  return {
      'config': label, 'dtype': args.dtype, 'batch': config.batch_size,
      'params': common.param_count(state.params),
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
      # MoE routing of the last timed step (did dropless windows fit, how balanced).
      **{k: float(metrics[k]) for k in ('moe_max_load', 'moe_window_spill', 'moe_window_overflow')
         if k in metrics},
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
