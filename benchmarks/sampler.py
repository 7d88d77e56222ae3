r"""Overhead of the compiled sampling loop relative to one guided forward pass.

  python benchmarks/sampler.py                                  # CPU-sized defaults
  python benchmarks/sampler.py --configs tiny,demo,S/2,S/2,ddpm --batch 64 --steps 50   # GPU

For every config and sampler (rectified flow: euler, heun; DDPM: ddim) the whole jitted
`family.sample(params, rng, labels)` with classifier-free guidance is compiled once and timed,
and so is one jitted guided forward pass `family.denoiser(params, labels, cfg_scale)(z, t)`
(conditional and unconditional halves as one doubled batch). The overhead ratio is
(sampler time / network evaluations) / forward time: 1.0 means the loop costs nothing beyond
its network evaluations.
"""
import os
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from jaxgen import trainer  # noqa: E402

MIN_TIME_S = 1.0  # fast calls repeat until this much time is measured, for stable medians
SAMPLERS = {'rectified_flow': ('euler', 'heun'), 'ddpm': ('ddim',)}

COLUMNS = (
    ('config', 'config'), ('sampler', 'sampler'), ('batch', 'batch'), ('steps', 'steps'),
    ('evals', 'evals'), ('compile_s', 'compile s'), ('sample_ms', 'sample ms'),
    ('ms_per_step', 'ms/step'), ('forward_ms', 'fwd ms'), ('overhead', 'overhead'),
    ('overhead_useful_evals', 'overhead (useful)'), ('samples_per_s', 'samples/s'),
)


def parse_args(argv=None):
  p = common.arg_parser(__doc__, 'sampler')
  p.add_argument('--configs', default='tiny,demo,S/2,tiny,ddpm',
                 help="configs/dit.py variants, comma-separated ('S/2,ddpm' for DDPM)")
  p.add_argument('--batch', type=int, default=8, help='samples per call')
  p.add_argument('--steps', type=int, default=None,
                 help='sampler steps N (default: 50 on an accelerator, 4 on CPU)')
  p.add_argument('--cfg-scale', type=float, default=None,
                 help="guidance scale (default: the config's; must not be 1.0, which disables CFG)")
  p.add_argument('--repeats', type=int, default=None,
                 help='timed calls of each sampler after one warm-up call (at least; fast '
                      'ones repeat for 1 s) (default: 5 on an accelerator, 1 on CPU)')
  p.add_argument('--forward-repeats', type=int, default=None,
                 help='timed forward passes (at least; fast ones repeat for 1 s) '
                      '(default: 10 on an accelerator, 3 on CPU)')
  args = common.fill_defaults(p.parse_args(argv), steps=(50, 4), repeats=(5, 1),
                              forward_repeats=(10, 3))
  if args.cfg_scale == 1.0:
    p.error('--cfg-scale 1.0 turns classifier-free guidance off; this benchmark measures it on')
  return args


def model_evals(method, num_steps):
  """(executed, useful) network evaluations per sample call: Heun corrects every step but
  the last, so it runs 2N - 1 evaluations, all useful."""
  if method == 'heun':
    return 2 * num_steps - 1, 2 * num_steps - 1
  return num_steps, num_steps


def make_config(variant, method, args):
  """The variant's config with the benchmark's sampler settings (method None: the config's)."""
  config = common.load_config_module('dit').get_config(variant)
  config.sample.update(method=method or config.sample.method, num_steps=args.steps)
  if args.cfg_scale is not None:
    config.sample.cfg_scale = args.cfg_scale
  return config


def sample_labels(config, batch):
  return jnp.arange(batch, dtype=jnp.int32) % config.data.num_classes


def init_params(exp):
  """EMA parameters in the trainer's sharded layout (the ones the trainer samples with)."""
  state = exp.init_state()
  return state.ema_params


def time_forward(exp, params, labels, scale, repeats):
  family = exp.family
  z = jax.random.normal(jax.random.PRNGKey(1), (labels.shape[0], *family.image_shape))
  t = jnp.full((labels.shape[0],), 0.5, jnp.float32)  # the value does not change the cost
  forward = jax.jit(lambda p, y, z, t: family.denoiser(p, y, scale)(z, t))
  compiled, _ = common.timed_compile(forward, params, labels, z, t)
  return common.time_calls(lambda: compiled(params, labels, z, t), repeats, warmup=1,
                           min_time_s=MIN_TIME_S)


def bench_sampler(variant, method, params, fwd_s, args):
  config = make_config(variant, method, args)
  exp = trainer.Experiment(config, workdir=None)
  labels = sample_labels(config, args.batch)
  rng = jax.random.PRNGKey(config.sample.seed)
  # As Experiment.sample_images jits it: replicated output.
  sample_fn = jax.jit(exp.family.sample, out_shardings=NamedSharding(exp.mesh, P()))
  with exp.context():
    compiled, compile_s = common.timed_compile(sample_fn, params, rng, labels)
    stats = common.time_calls(lambda: compiled(params, rng, labels), args.repeats, warmup=1,
                              min_time_s=MIN_TIME_S)
  executed, useful = model_evals(method, args.steps)
  sample_s = stats['median_s']
  return {
      'config': variant, 'sampler': method, 'batch': args.batch, 'steps': args.steps,
      'cfg_scale': config.sample.cfg_scale, 'evals': executed, 'evals_useful': useful,
      'compile_s': compile_s, 'sample_ms': 1e3 * sample_s, 'sample_ms_mean': 1e3 * stats['mean_s'],
      'ms_per_step': 1e3 * sample_s / args.steps, 'forward_ms': 1e3 * fwd_s,
      'overhead': (sample_s / executed) / fwd_s,
      'overhead_useful_evals': (sample_s / useful) / fwd_s,
      'samples_per_s': args.batch / sample_s,
  }


def bench_config(variant, args):
  """Rows for every sampler of `variant`; parameters and the forward timing are shared."""
  config = make_config(variant, None, args)
  exp = trainer.Experiment(config, workdir=None)
  params = init_params(exp)
  with exp.context():
    fwd = time_forward(exp, params, sample_labels(config, args.batch), config.sample.cfg_scale,
                       args.forward_repeats)
  rows = []
  for method in SAMPLERS[config.objective.name]:
    rows.append(bench_sampler(variant, method, params, fwd['median_s'], args))
    r = rows[-1]
    print(f"  {variant} {method}: {r['sample_ms']:.1f} ms/sample call, "
          f"forward {r['forward_ms']:.1f} ms, overhead {r['overhead']:.3f}", flush=True)
  return rows


def main(argv=None):
  args = parse_args(argv)
  ceilings, machine = common.start()
  rows = []
  for variant in common.parse_configs(args.configs):
    rows.extend(bench_config(variant, args))
  common.finish(args, rows, COLUMNS, machine)


if __name__ == '__main__':
  main()
