r"""Does a configs/lexinvariant.py model learn in-context copying at a given budget?

  python scripts/lm_copying.py --embedding=lexinvariant --steps=600 --out=copying_li.json
  python scripts/lm_copying.py --embedding=standard --steps=600 --min_period=64 --max_period=64

Every training sequence is a Shakespeare train window of a random period P (uniform in
[--min_period, --max_period]) tiled to the config's length. After the first period every next
character is a copy of the character P back, so a model with a content-based copying circuit
(an induction head: find the previous occurrence of the current context, read what followed)
drives the loss on the repeats towards 0 whatever P is. A fixed period can also be copied by
position alone (attend exactly P - 1 back); varying it rules that out. The paper's LookUp and
cipher evaluations both need such a circuit, so this isolates the mechanism they rest on.

--shared_table_steps=N gives the lexinvariant model one fixed table for its first N steps
(config.model.shared_table_steps), --shared_table_decay_steps=D then a linearly shrinking
share of rows with it over D more steps; --random_tokens tiles uniformly random tokens instead, so
there are no n-gram statistics to learn. --natural_fraction=F makes a share F of each batch
plain train windows, so the model is also a language model of the text; --lookup_examples=N
scores the trained model on the paper's LookUp task (jaxgen.analysis.reasoning) with 1, 2 and
3 pairs, which asks whether a copying circuit carries over to symbols uniform over the
vocabulary. --set overrides any config field (model.width=512, model.dtype=bfloat16) for sweeps
at other scales. Measured: benchmarks/measured/cpu_lm_copying.json.

The model, its embedding mode and the optimizer (jaxgen.optim) are the config's (demo by
default: AdamW, warmup and cosine decay, gradient clipping); --steps sets the schedule's
length. Prints the mean loss on the first period, on the repeats (and on the plain windows)
every --log_every steps and writes the curve as JSON.
"""
import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import lexinvariant  # noqa: E402
from jaxgen import config_base, optim  # noqa: E402
from jaxgen.analysis import lm_eval, reasoning  # noqa: E402
from jaxgen.errors import UserError  # noqa: E402
from jaxgen.families import lm  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[1])
  p.add_argument('--variant', default='demo')
  p.add_argument('--embedding', default='lexinvariant', choices=lm.MODES)
  p.add_argument('--position', default='t5', choices=('t5', 'rope'))
  p.add_argument('--steps', type=int, default=600)
  p.add_argument('--min_period', type=int, default=16)
  p.add_argument('--max_period', type=int, default=96)
  p.add_argument('--log_every', type=int, default=100)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--shared_table_steps', type=int, default=0,
                 help='lexinvariant: one fixed table for the first N steps (the table warmup)')
  p.add_argument('--shared_table_decay_steps', type=int, default=0,
                 help='lexinvariant: then shrink the share of rows with that table to 0 over D '
                      'more steps')
  p.add_argument('--random_tokens', action='store_true',
                 help='tile uniformly random tokens instead of Shakespeare (no n-gram statistics)')
  p.add_argument('--natural_fraction', type=float, default=0.0,
                 help='share of each batch that is plain (untiled) Shakespeare windows')
  p.add_argument('--lookup_examples', type=int, default=0,
                 help='after training, score LookUp with 1, 2 and 3 pairs on this many examples')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='config override, e.g. model.width=512 or model.dtype=bfloat16 (repeatable)')
  p.add_argument('--data_dir', default=None, help='where the prepared text dataset lives')
  p.add_argument('--out', default=None, help='JSON file for the loss curve')
  args = p.parse_args(argv)
  if not 1 <= args.min_period <= args.max_period:
    p.error(f'need 1 <= --min_period <= --max_period, got {args.min_period} and {args.max_period}')
  if not 0 <= args.natural_fraction < 1:
    p.error(f'--natural_fraction={args.natural_fraction}: need 0 <= f < 1 (some rows must repeat)')
  try:
    make_config(args)
  except UserError as e:
    p.error(str(e))
  return args


def config_arg(args):
  return f'{args.variant},{args.embedding}' + (',rope' if args.position == 'rope' else '')


def make_config(args):
  """The config's model and optimizer, with the table warmup and the --set overrides."""
  config = lexinvariant.get_config(config_arg(args))
  if args.data_dir:
    config.data.data_dir = args.data_dir
  config.model.shared_table_steps = args.shared_table_steps
  config.model.shared_table_decay_steps = args.shared_table_decay_steps
  return config_base.apply_overrides(config, args.set)


def tiled_batch(rng, stream, batch, length, min_period, max_period):
  """tokens [batch, length + 1]: train windows of a random period each, tiled; and periods."""
  periods = rng.integers(min_period, max_period + 1, batch)
  rows = []
  for n in periods:
    start = rng.integers(0, len(stream) - n)
    rows.append(np.tile(stream[start:start + n], (length + 1) // n + 1)[:length + 1])
  return np.stack(rows).astype(np.int32), periods


def lookup_accuracy(family, params, num_examples):
  """The trained model's greedy LookUp accuracy {pairs: accuracy} (jaxgen.analysis.reasoning)."""
  result = reasoning.evaluate({family.mode: (family, params)}, num_examples=num_examples,
                              lookup_pairs=(1, 2), num_shown=0)
  return {n: r['accuracy'][family.mode] for n, r in result['lookup_by_pairs'].items()}


def train(args):
  arg, config = config_arg(args), make_config(args)
  family = lm.Family(config)
  length, batch = config.data.seq_len, config.batch_size
  stream = lm_eval.split_tokens(config.data, 'train')
  if args.random_tokens:
    stream = np.random.default_rng(args.seed).integers(0, config.data.vocab_size, len(stream))
  tx, _ = optim.make_optimizer(config.optim, args.steps)
  params = family.init_params(jax.random.PRNGKey(args.seed))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, tokens, key, i):
    shared = family.shared_rows(key, tokens.shape[0], i)
    def loss_fn(p):
      losses, _ = family.token_losses(p, tokens[:, :-1], tokens[:, 1:], key,
                                      shared_table=shared)
      return losses.mean(), losses
    (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    fresh = jnp.logical_not(jnp.broadcast_to(shared, (tokens.shape[0], 1)))[:, 0]
    return optax.apply_updates(params, updates), opt_state, losses, fresh

  rng, key, t0 = np.random.default_rng(args.seed), jax.random.PRNGKey(args.seed + 1), time.time()
  num_tiled = batch - int(round(args.natural_fraction * batch))
  # With a table warmup, 'repeats_fresh' is the loss on the repeats of the rows that drew fresh
  # tables (the lexinvariant model proper), once the shared table's share falls below 1.
  warmup = args.shared_table_steps or args.shared_table_decay_steps
  curve, logged = [], {'first_period': [], 'repeats': [], 'repeats_fresh': [], 'natural': []}
  for i in range(args.steps):
    tokens, periods = tiled_batch(rng, stream, num_tiled, length, args.min_period,
                                  args.max_period)
    if num_tiled < batch:
      tokens = np.concatenate([tokens, lm_eval.random_windows(rng, stream, length + 1,
                                                              batch - num_tiled)])
    params, opt_state, losses, fresh = step(params, opt_state, tokens,
                                            jax.random.fold_in(key, i), i)
    losses, natural = np.asarray(losses[:num_tiled]), np.asarray(losses[num_tiled:])
    # target t is token t + 1: a copy once t + 1 >= P.
    is_copy = np.arange(length)[None, :] + 1 >= periods[:, None]
    logged['first_period'].append(losses[~is_copy].mean())
    logged['repeats'].append(losses[is_copy].mean())
    fresh_copy = is_copy & np.asarray(fresh)[:num_tiled, None]
    if warmup and fresh_copy.any():
      logged['repeats_fresh'].append(losses[fresh_copy].mean())
    if natural.size:
      logged['natural'].append(natural.mean())
    if (i + 1) % args.log_every == 0 or i + 1 == args.steps:
      row = {'step': i + 1, 'seconds': round(time.time() - t0, 1)}
      row.update({k: round(float(np.mean(v)), 4) for k, v in logged.items() if v})
      logged = {k: [] for k in logged}
      curve.append(row)
      print(f"{arg} step {row['step']:5d}  {row['seconds']:7.1f}s  loss: " +
            '  '.join(f'{k} {row[k]:.3f}' for k in logged if k in row), flush=True)
  lookup = lookup_accuracy(family, params, args.lookup_examples) if args.lookup_examples else {}
  if lookup:
    print(f'{arg} LookUp accuracy by pairs: {lookup}', flush=True)
  return {'config': f'configs/lexinvariant.py:{arg}', 'steps': args.steps,
          'shared_table_steps': args.shared_table_steps,
          'shared_table_decay_steps': args.shared_table_decay_steps,
          'random_tokens': args.random_tokens,
          'overrides': args.set, 'batch_size': batch, 'seq_len': length,
          'model': {k: config.model[k] for k in ('width', 'depth', 'num_heads', 'dtype')},
          'parameters': int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
          'period': [args.min_period, args.max_period], 'natural_fraction': args.natural_fraction,
          'curve': curve, 'lookup_accuracy': lookup}


def main(argv=None):
  args = parse_args(argv)
  result = train(args)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
