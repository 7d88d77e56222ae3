r"""ViT-VQGAN tokenizer training-step throughput and MFU (generator + StyleGAN2 discriminator in
the trainer's one compiled step).

  python benchmarks/vitvqgan.py                           # tiny and demo (Fashion-MNIST 32px)
  python benchmarks/vitvqgan.py --configs SS --batch 32 --dtype bfloat16     # on a GPU

Synthetic batches replace the dataset; the step is the trainer's (train_state.make_train_step
with the family's two optimizers), compiled ahead of time and timed as in
benchmarks/train_step.py. The discriminator is on (step >= loss.disc_start is forced by
setting disc_start=0), so every timed step pays for the adversarial terms; R1 runs on one
step in loss.r1_every, as in training. FLOPs count the generator forward, three
discriminator forwards (real, fake for D, fake for G), x3 for the backward pass; R1's
double backward is not counted. The perceptual loss is off unless --perceptual (it needs the
Fashion-MNIST classifier, or LPIPS weights for the paper sizes).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common, train_step  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--configs', default='tiny,demo', help='configs/vitvqgan.py variants')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='config override, e.g. model.code_dim=8 (repeatable)')
  p.add_argument('--batch', type=int, default=None,
                 help='global batch (default: 64 on an accelerator, 16 on CPU)')
  p.add_argument('--steps', type=int, default=16, help='timed steps after warm-up (one R1 '
                 'step per loss.r1_every)')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--perceptual', action='store_true', help="keep the config's perceptual loss")
  p.add_argument('--out', default=os.path.join(common.REPO, 'benchmarks', 'results',
                                               'vitvqgan.json'))
  args = p.parse_args(argv)
  if args.batch is None:
    args.batch = 64 if common.on_accelerator() else 16
  return args


def main(argv=None):
  args = parse_args(argv)
  ceilings, machine = common.start()
  rows = []
  for variant in common.parse_configs(args.configs):
    overrides = ['loss.disc_start=0'] + ([] if args.perceptual else
                                         ['loss.perceptual_weight=0.0']) + args.set
    config = train_step.make_config(variant, args.batch, args.dtype, args.warmup + args.steps,
                                    'vitvqgan', overrides)
    rows.append(train_step.measure(config, variant, args, ceilings, machine['peak_bf16_flops']))
    print(f"  {variant}: {rows[-1]['step_ms_median']:.1f} ms/step, "
          f"{rows[-1]['images_per_s']:.1f} img/s, MFU {rows[-1]['mfu_measured']:.3f}", flush=True)
  common.finish(args, rows, train_step.COLUMNS, machine)


if __name__ == '__main__':
  main()
