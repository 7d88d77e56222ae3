r"""The paper's Table 4 in small: codebook usage and reconstruction of factorized l2 codes against
plain VQ, trained for the same steps on Fashion-MNIST.

  .venv/bin/python scripts/vitvqgan_ablation.py --out=workdirs/vq_ablation [--steps=800]

Arms (all from configs/vitvqgan.py:demo, same seed, data and steps; the discriminator and,
unless --restart, the dead-code restart are off so only the quantizer differs): `l2_dim8` and `l2_dim32` (lookup dims 8 and 32,
l2-normalised, cosine lookup) and `plain` (lookup dim = width, no l2, Euclidean lookup).
Each arm trains in <out>/<arm>/ with the shared trainer, then is evaluated over
--eval_batches test batches: codebook usage and perplexity (one histogram over all eval
codes), PSNR and, with --fid, rFID-FMNIST. Writes <out>/ablation.json and a bar chart
<out>/ablation.png.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxgen.analysis import lm_eval, plots  # noqa: E402

ARMS = {'l2_dim8': dict(code_dim=8, l2_normalize=True),
        'l2_dim32': dict(code_dim=32, l2_normalize=True),
        'plain': dict(code_dim=None, l2_normalize=False)}  # None: the encoder width


def arm_config(arm, args):
  from jaxgen.config_base import load_config
  c = load_config('configs/vitvqgan.py', args.variant)
  fields = dict(ARMS[arm])
  fields['code_dim'] = fields['code_dim'] or c.model.encoder.width
  c.model.update(fields)
  c.loss.disc_start = args.steps + 1  # the ablation is about the quantizer
  if not args.restart:  # the paper's comparison has no restart
    c.loss.restart_every = 0
  c.update(total_steps=args.steps, eval_every=0, sample_every=0, checkpoint_every=0,
           eval_batches=args.eval_batches, progress_bar=False)
  c.eval.metrics = 'loss,fid' if args.fid else 'loss'
  if args.data_dir:
    c.data.data_dir = args.data_dir
  return c


def run_arm(arm, args):
  from jaxgen import trainer
  workdir = os.path.join(args.out, arm)
  config = arm_config(arm, args)
  trainer.train(config, workdir)
  metrics = trainer.evaluate(config, workdir)
  keep = ('codebook_usage', 'codebook_perplexity', 'psnr', 'l2')
  row = {k: metrics[f'eval/{k}'] for k in keep}
  row.update({k[5:]: v for k, v in metrics.items() if k.startswith('eval/rfid')})
  row.update(code_dim=config.model.code_dim, l2_normalize=config.model.l2_normalize,
             codebook_size=config.model.codebook_size)
  print(arm, json.dumps(row), flush=True)
  return row


def figure(result):
  groups = {arm: {'usage %': 100 * r['codebook_usage'],
                  'perplexity / K %': 100 * r['codebook_perplexity'] / r['codebook_size']}
            for arm, r in result['arms'].items()}
  return plots.bar_chart(groups, title=f"codebook after {result['steps']} steps (Fashion-MNIST)",
                         ylabel='% of the codebook', fmt='{:.1f}')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--out', required=True)
  p.add_argument('--variant', default='demo', help='configs/vitvqgan.py variant')
  p.add_argument('--steps', type=int, default=800)
  p.add_argument('--eval_batches', type=int, default=10)
  p.add_argument('--arms', default=','.join(ARMS))
  p.add_argument('--fid', action='store_true', help='also rFID-FMNIST (needs the classifier)')
  p.add_argument('--restart', action='store_true',
                 help="keep the config's dead-code restart in every arm")
  p.add_argument('--data_dir', default='')
  args = p.parse_args(argv)
  unknown = set(a for a in args.arms.split(',') if a) - set(ARMS)
  if unknown:
    p.error(f'unknown arm(s) {sorted(unknown)}: use {",".join(ARMS)}')
  return args


def main(argv=None):
  args = parse_args(argv)
  arms = [a for a in args.arms.split(',') if a]
  result = {'steps': args.steps, 'variant': args.variant, 'restart': args.restart,
            'arms': {arm: run_arm(arm, args) for arm in arms}}
  paths = lm_eval.save_result(args.out, 'ablation', result, figure(result))
  print('wrote', *paths)
  return result


if __name__ == '__main__':
  main()
