r"""Feature-extraction throughput of the evaluation networks (FID Inception, FID-FMNIST net).

  python benchmarks/eval.py                       # CPU: batch 16
  python benchmarks/eval.py --batch 256           # on a GPU

Random weights (throughput does not depend on their values). Each network's jitted
`features(variables, images)` is compiled ahead of time, warmed up and timed on images of the
embedded data's shape (32x32x1, which the Inception resizes to 299x299x3) and, for the
Inception, on 256x256x3 images. FLOPs per image come from XLA's cost analysis of the compiled
program; MFU is against the matmul ceiling measured in the same run.
"""
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from jaxgen.metrics import fmnist_net  # noqa: E402
from jaxgen.models import fmnist_classifier, inception  # noqa: E402

COLUMNS = (('network', 'network'), ('input', 'input'), ('batch', 'batch'),
           ('compile_s', 'compile s'), ('batch_ms', 'batch ms (med)'),
           ('images_per_s', 'img/s'), ('gflops_per_image', 'GFLOP/img'),
           ('mfu_measured', 'MFU (measured)'))


def parse_args(argv=None):
  p = common.arg_parser(__doc__, 'eval')
  p.add_argument('--batch', type=int, default=None, help='default: 256 on GPU, 16 on CPU')
  p.add_argument('--steps', type=int, default=5)
  return common.fill_defaults(p.parse_args(argv), batch=(256, 16))


def networks():
  """(name, random variables, features fn, input shapes)."""
  rng = jax.random.PRNGKey(0)
  inc = inception.InceptionV3().init(rng, np.zeros((1, inception.SIZE, inception.SIZE, 3),
                                                   np.float32))
  fm = fmnist_classifier.FmnistClassifier().init(rng, np.zeros((1, 32, 32, 1), np.float32))
  return [('inception (FID)', inc, inception.inception_features, [(32, 32, 1), (256, 256, 3)]),
          (fmnist_net.FEATURE_NET_NAME, fm, fmnist_net.fmnist_features, [(32, 32, 1)])]


def measure(name, variables, fn, shape, args, ceiling):
  images = np.random.default_rng(0).uniform(-1, 1, (args.batch, *shape)).astype(np.float32)
  jitted = jax.jit(fn)
  compiled, compile_s = common.timed_compile(jitted, variables, images)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  stats = common.time_calls(lambda: compiled(variables, images), args.steps, warmup=1,
                            min_time_s=1.0)
  flops = float(cost.get('flops', 0.0))
  return {'network': name, 'input': 'x'.join(map(str, shape)), 'batch': args.batch,
          'compile_s': compile_s, 'batch_ms': 1e3 * stats['median_s'],
          'images_per_s': args.batch / stats['median_s'],
          'gflops_per_image': flops / args.batch / 1e9,
          'mfu_measured': common.ratio(flops / stats['median_s'], ceiling),
          'times_s': stats['times_s']}


def main(argv=None):
  args = parse_args(argv)
  ceilings, machine = common.start()
  rows = []
  for name, variables, fn, shapes in networks():
    for shape in shapes:
      rows.append(measure(name, variables, fn, shape, args, ceilings['float32']))
      print(f"  {name} {rows[-1]['input']}: {rows[-1]['images_per_s']:.1f} img/s", flush=True)
  common.finish(args, rows, COLUMNS, machine)


if __name__ == '__main__':
  main()
