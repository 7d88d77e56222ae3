r"""The lexinvariant LM evaluations: perplexity by position, cipher deciphering, reasoning.

  python -m jaxgen.analysis.lexinvariant {perplexity,cipher,reasoning,all} \
      --lexinvariant=workdirs/li [--standard=workdirs/std] [--semi=workdirs/semi] \
      --out=workdirs/li_eval [--num_windows=256] [--probe_steps=500] [--num_examples=1000] \
      [--num_pairs=3] [--lookup_pairs=1,2] [--probe_layers=final]

Each evaluation writes <out>/<name>.json and <out>/<name>.png and prints a short summary:
  perplexity  every given model, and the ratio of each to --standard (lm_perplexity.py);
  cipher      a probe on the frozen --lexinvariant model only (char level; cipher.py);
  reasoning   LookUp and Permutation accuracy of every given model, and LookUp accuracy at
              the --lookup_pairs pair counts too (reasoning.py).
Errors (a missing workdir, a model of the wrong kind) print one line and exit 2.
"""
import argparse
import sys
import time

EVALS = ('perplexity', 'cipher', 'reasoning')
MODES = ('lexinvariant', 'standard', 'semi')


def _name_list(text):
  """'block0,final' -> ['block0', 'final'] (checked against the model later)."""
  return [n.strip() for n in text.split(',') if n.strip()]


def _int_list(text):
  """'1,2' -> [1, 2] ('' -> []): positive integers, else an argparse error."""
  items = _name_list(text)
  if not all(n.isdigit() and int(n) > 0 for n in items):
    raise argparse.ArgumentTypeError(f'{text!r}: give positive integers separated by commas')
  return [int(n) for n in items]


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog='python -m jaxgen.analysis.lexinvariant',
                              description=__doc__.split('\n')[0])
  p.add_argument('eval', choices=EVALS + ('all',))
  p.add_argument('--lexinvariant', required=True, help='workdir of the lexinvariant model')
  p.add_argument('--standard', help='workdir of the identical standard model')
  p.add_argument('--semi', help='workdir of the semi-lexinvariant model')
  p.add_argument('--out', required=True, help='output directory')
  p.add_argument('--data_dir', help="override the workdirs' data_dir")
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--batch_size', type=int, default=16, help='windows per forward pass')
  g = p.add_argument_group('perplexity')
  g.add_argument('--num_windows', type=int, default=256)
  g.add_argument('--smooth', type=int, default=16, help='moving-average window (positions)')
  g = p.add_argument_group('cipher')
  g.add_argument('--probe_steps', type=int, default=500, help='paper: 10000')
  g.add_argument('--probe_batch', type=int, default=8)
  g.add_argument('--probe_hidden', type=int, default=256)
  g.add_argument('--probe_dim', type=int, default=64)
  g.add_argument('--probe_lr', type=float, default=1e-3)
  g.add_argument('--probe_layers', default='final', type=_name_list,
                 help="residual streams the probe reads, side by side: final (the paper's) "
                      'and/or block<i> (block i\'s output), e.g. block0,final')
  g.add_argument('--num_sequences', type=int, default=1000,
                 help='test windows (paper: 1000); at most the split holds')
  g.add_argument('--window', type=int, default=100, help='characters per key-precision window')
  g.add_argument('--stride', type=int, default=10, help='between window starts')
  g = p.add_argument_group('reasoning')
  g.add_argument('--num_examples', type=int, default=1000)
  g.add_argument('--num_pairs', type=int, default=3, help='LookUp pairs')
  g.add_argument('--lookup_pairs', default='1,2', type=_int_list,
                 help='also score LookUp at these pair counts (comma list; empty: none)')
  g.add_argument('--in_len', type=int, default=3, help='Permutation input symbols')
  g.add_argument('--out_len', type=int, default=2, help='Permutation output symbols')
  g.add_argument('--num_demos', type=int, default=1, help='Permutation demonstrations')
  g.add_argument('--gen_batch', type=int, default=100, help='examples per generate call')
  return p.parse_args(argv)


def load_models(args):
  """{mode: (family, params, config, step)} of the given workdirs, each checked for its mode."""
  from jaxgen.analysis import lm_eval
  from jaxgen.errors import UserError
  models = {}
  for mode in MODES:
    workdir = getattr(args, mode)
    if workdir is None:
      continue
    family, params, config, step = lm_eval.load_trained(workdir, args.data_dir)
    if family.mode != mode:
      raise UserError(f'--{mode}={workdir} holds a {family.mode!r} model, not a {mode!r} one')
    models[mode] = (family, params, config, step)
  lm_eval.check_same_data({m: v[2] for m, v in models.items()})
  return models


def run(args):
  from jaxgen.analysis import cipher, lm_eval, lm_perplexity, reasoning
  models = load_models(args)
  pairs = {m: (v[0], v[1]) for m, v in models.items()}
  workdirs = {m: {'workdir': getattr(args, m), 'step': v[3]} for m, v in models.items()}
  todo = EVALS if args.eval == 'all' else (args.eval,)
  if 'cipher' in todo:  # fail before the slower evaluations run
    cipher.check_model(models['lexinvariant'][0])
    cipher.check_layers(models['lexinvariant'][0], args.probe_layers)
  for name in todo:
    start = time.time()
    if name == 'perplexity':
      module, (result, image) = lm_perplexity, lm_perplexity.run(
          pairs, num_windows=args.num_windows, batch_size=args.batch_size, smooth=args.smooth,
          seed=args.seed)
    elif name == 'cipher':
      module, (result, image) = cipher, cipher.run(
          *pairs['lexinvariant'], probe_steps=args.probe_steps,
          num_sequences=args.num_sequences, window=args.window, stride=args.stride,
          probe_batch=args.probe_batch, probe_hidden=args.probe_hidden,
          probe_dim=args.probe_dim, probe_lr=args.probe_lr, batch_size=args.batch_size,
          seed=args.seed, layers=args.probe_layers)
    else:
      module, (result, image) = reasoning, reasoning.run(
          pairs, num_examples=args.num_examples, num_pairs=args.num_pairs, in_len=args.in_len,
          out_len=args.out_len, num_demos=args.num_demos, batch_size=args.gen_batch,
          lookup_pairs=args.lookup_pairs,
          seed=args.seed)
    result['models_evaluated'] = workdirs
    json_path, png_path = lm_eval.save_result(args.out, name, result, image)
    print('\n'.join(module.summary_lines(result)))
    print(f'  wrote {json_path}, {png_path} ({time.time() - start:.0f}s)', flush=True)


def main(argv=None):
  args = parse_args(argv)
  from jaxgen.data import DatasetNotFoundError
  from jaxgen.errors import UserError
  from jaxgen.main import exit_with_error
  try:
    run(args)
  except (UserError, DatasetNotFoundError) as e:
    exit_with_error(str(e).splitlines()[0] if str(e) else type(e).__name__)


if __name__ == '__main__':
  main(sys.argv[1:])
