r"""FlexTok's coarse-to-fine curve: reconstruction quality against the number of kept tokens.

  .venv/bin/python scripts/flextok_k_sweep.py --workdir=workdirs/flextok --out=DIR [--fid]

For k = 1, 2, 4, ..., N (or --ks) the first --num test images are tokenized, decoded from
their first k tokens with the config's sampler (one compiled program for every k) and
scored: pixel MSE and PSNR against the originals and, with --fid, FID-FMNIST of the
reconstructions against the test split (the config's feature network) and class agreement:
the share of reconstructions that network (the FMNIST classifier) puts in the original's
class, next to its accuracy on the originals themselves. Writes
<out>/k_sweep.json, <out>/k_sweep.png (PSNR and MSE against k) and <out>/k_grid.png (the
inputs over their reconstructions from each k).
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxgen import evaluation, trainer, writers  # noqa: E402
from jaxgen.analysis import lm_eval, plots  # noqa: E402
from jaxgen.families.flextok import TRAIN_HINT  # noqa: E402
from jaxgen.metrics import frechet  # noqa: E402
from jaxgen.metrics import image as image_metrics  # noqa: E402


def sweep(exp, params, ks, num, batch_size, fid=False, seed=0):
  """({k: {'mse', 'psnr'[, 'fid', 'class_acc']}}, the originals' class accuracy or None)
  over the first `num` test images."""
  fam, n = exp.family, exp.config.model.num_registers
  tokenize = jax.jit(fam.tokenize)
  decode = jax.jit(fam.decode_tokens)
  extractor = None
  if fid:
    extractor = evaluation.Extractor(
        evaluation.load_feature_net(exp.config.eval, exp.config.data), exp.mesh)
  it = fam.make_iterator('test', global_batch_size=batch_size, seed=0, train=False)
  sq_err = {k: [] for k in ks}
  psnr = {k: [] for k in ks}
  feats = {k: [] for k in ks}
  labels, real_logits = [], []
  for i in range(-(-num // batch_size)):
    batch = next(it)
    images = jnp.asarray(batch['image'])
    labels.append(np.asarray(batch['label']))
    if extractor:
      real_logits.append(extractor(images)['logits'])
    ids = tokenize(params, images)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), i)
    for k in ks:
      if not 1 <= k <= n:
        raise SystemExit(f'--ks: {k} is outside 1..{n} (model.num_registers)')
      recon = decode(params, ids, jnp.full((images.shape[0],), k, jnp.int32), rng)
      sq_err[k].append(np.asarray(jnp.mean((recon - images) ** 2, axis=(1, 2, 3))))
      psnr[k].append(np.asarray(image_metrics.psnr(recon, images)))
      if extractor:
        feats[k].append(extractor(recon))
  rows = {}
  for k in ks:
    rows[k] = dict(mse=float(np.concatenate(sq_err[k])[:num].mean()),
                   psnr=float(np.concatenate(psnr[k])[:num].mean()))
  real_acc = None
  if extractor:
    labels = np.concatenate(labels)[:num]
    accuracy = lambda logits: float(np.mean(np.argmax(logits[:num], -1) == labels))
    real_acc = accuracy(np.concatenate(real_logits))
    mu, sigma = evaluation.real_stats(exp, extractor, 'test', exp.config.eval.num_real,
                                      batch_size)
    for k in ks:
      pool = np.concatenate([f['pool'] for f in feats[k]])[:num]
      rows[k]['fid'] = float(frechet.frechet_distance(*frechet.gaussian_stats(pool), mu, sigma))
      rows[k]['class_acc'] = accuracy(np.concatenate([f['logits'] for f in feats[k]]))
  return rows, real_acc


def figure(result):
  ks = result['ks']
  x = np.log2(ks)
  psnr = plots.line_plot({'PSNR (dB)': (x, [result['by_k'][k]['psnr'] for k in ks])},
                         title=f"FlexTok reconstructions vs kept tokens (step {result['step']})",
                         xlabel='log2 k (tokens kept)', ylabel='PSNR (dB)')
  return psnr


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--workdir', required=True, help='a trained configs/flextok.py workdir')
  p.add_argument('--out', required=True)
  p.add_argument('--ks', default='', help='comma-separated token counts (default 1,2,4,..,N)')
  p.add_argument('--num', type=int, default=1000, help='test images scored per k')
  p.add_argument('--batch_size', type=int, default=100)
  p.add_argument('--fid', action='store_true', help='also FID of the reconstructions')
  p.add_argument('--data_dir', default='')
  args = p.parse_args(argv)
  exp, params, step = trainer.load_experiment(args.workdir, 'flextok', TRAIN_HINT,
                                              args.data_dir or None)
  ks = [int(k) for k in args.ks.split(',') if k] or exp.family.sample_ks()
  rows, real_acc = sweep(exp, params, ks, args.num, args.batch_size, args.fid)
  result = {'workdir': args.workdir, 'step': step, 'num_images': args.num, 'ks': ks,
            'sample': exp.config.sample.to_dict(), 'by_k': rows, 'real_class_acc': real_acc}
  if real_acc is not None:
    print(f'originals: class_acc={real_acc:.4f}')
  for k in ks:
    print(f'k={k:4d} ' + ' '.join(f'{name}={v:.4f}' for name, v in rows[k].items()), flush=True)
  paths = lm_eval.save_result(args.out, 'k_sweep', result, figure(result))
  images = jnp.asarray(exp.family.fixed_test_images())
  ids = jnp.tile(exp.family.tokenize(params, images), (len(ks), 1))
  keep = jnp.repeat(jnp.asarray(ks, jnp.int32), images.shape[0])
  recon = jax.jit(exp.family.decode_tokens)(params, ids, keep)
  grid = writers.image_grid(np.concatenate([images, recon]), 1 + len(ks),
                            row_labels=['input'] + [f'k={k}' for k in ks])
  grid_path = os.path.join(args.out, 'k_grid.png')
  writers.save_png(grid, grid_path)
  print('wrote', *paths, grid_path)
  return result


if __name__ == '__main__':
  main()
