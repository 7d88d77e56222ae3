"""Perplexity against context position: a lexinvariant LM vs its identical standard LM.

Every model reads the same `num_windows` held-out windows (test split, the models' seq_len,
evenly spread over the split); a lexinvariant model gets a fresh random embedding table per
window, window i's from fold_in(PRNGKey(seed), i). Position t is the prediction of token t + 1
from tokens 0..t, so the curve shows how much context a model needs: the paper
finds the lexinvariant model ~9x worse at the first positions and close to the standard model
by position 511 (char-level Pile: 3.38 vs 2.00).

Two references need no training: in-context unigram and bigram counters (`in_context_losses`)
predict from the counts of the window so far and nothing else, so they are lexinvariant by
construction; they show how much a window's own statistics can explain at each position. A
third, with a lexinvariant model, reads such counts through the model's own kind of random
table (`readout_counter_losses`, two numbers fitted per position): at a CPU model's width it
is about where small lexinvariant models level off (d = 128: ~4.1 nats late in the window).

`current_token_swap` asks how much each model reads the current token: at the last position,
the KL between its next-token distributions before and after the current token is replaced by
another symbol of the window, next to the KL when the whole window is replaced by another.
A model that predicts only from how often symbols occur so far scores ~0 on the first.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgen.analysis import heatmaps, lm_eval, plots
from jaxgen.errors import UserError
from jaxgen.metrics import lm as lm_metrics


def _losses(family, params, inputs, targets, ids, key):
  """Next-token losses [B, L] (nats) of one batch of windows."""
  tables = lm_eval.example_tables(family, key, ids)
  logits = family.apply(params, inputs, tables)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


# One trace per family (the last batch is padded to the same shape, see padded_batches).
batch_losses = jax.jit(_losses, static_argnums=0)


def _last_log_probs(family, params, inputs, ids, key):
  """Next-token log-probabilities [B, V] at the last position of inputs [B, L]."""
  tables = lm_eval.example_tables(family, key, ids)
  return jax.nn.log_softmax(family.apply(params, inputs, tables)[:, -1].astype(jnp.float32))


last_log_probs = jax.jit(_last_log_probs, static_argnums=0)


def swapped_current_tokens(windows, seed=0):
  """inputs [N, L] (= windows[:, :-1]) with the last token replaced by another symbol that
  occurs earlier in the same window, drawn by default_rng(seed)."""
  inputs = np.array(windows[:, :-1])
  rng = np.random.default_rng(seed)
  for row in inputs:
    others = np.setdiff1d(row[:-1], row[-1:])
    if not len(others):
      raise UserError('current_token_swap: a window repeats one symbol only; nothing to swap in')
    row[-1] = rng.choice(others)
  return inputs


def current_token_swap(family, params, windows, *, batch_size=16, seed=0):
  """{'swap': mean KL(p || p') when the current (last input) token is swapped for another
  symbol of its window, 'other_window': the same when window i's inputs are window i - 1's};
  p the next-token distribution at the last position, window i's table from
  fold_in(PRNGKey(seed), i) in every case."""
  inputs = np.asarray(windows[:, :-1])
  variants = {'swap': swapped_current_tokens(windows, seed),
              'other_window': np.roll(inputs, 1, axis=0)}
  key, kl = jax.random.PRNGKey(seed), {name: [] for name in variants}
  for idx, real in lm_eval.padded_batches(len(windows), batch_size):
    p = np.asarray(last_log_probs(family, params, inputs[idx], idx, key), np.float64)[:real]
    for name, x in variants.items():
      q = np.asarray(last_log_probs(family, params, x[idx], idx, key), np.float64)[:real]
      kl[name].append((np.exp(p) * (p - q)).sum(-1))
  return {name: float(np.concatenate(v).mean()) for name, v in kl.items()}


def position_loss(family, params, windows, *, batch_size=16, seed=0):
  """PositionLoss over windows [N, L + 1] (inputs = w[:-1], targets = w[1:])."""
  acc, key = lm_metrics.PositionLoss(), jax.random.PRNGKey(seed)
  for idx, real in lm_eval.padded_batches(len(windows), batch_size):
    w = windows[idx]
    losses = batch_losses(family, params, w[:, :-1], w[:, 1:], idx, key)
    mask = (np.arange(batch_size) < real)[:, None] * np.ones(w.shape[1] - 1)
    acc.update(losses, mask)
  return acc


def in_context_losses(windows, vocab_size, order, alphas=(1.0, 2.0)):
  """Losses [N, L] (nats) of an in-context counter over windows [N, L + 1]: token t + 1 is
  predicted from tokens 0..t of its own window only.

  order 1: p1(y) = (c(y) + a1 / V) / (t + 1 + a1), c counting tokens 0..t;
  order 2: p2(y) = (c(x_t, y) + a2 p1(y)) / (c(x_t, .) + a2), c counting the bigrams within
  tokens 0..t (interpolated Dirichlet smoothing, a = `alphas`).
  """
  if order not in (1, 2):
    raise ValueError(f'in-context counters of order 1 or 2, got {order}')
  w = np.asarray(windows, np.int64)
  n, length = w.shape[0], w.shape[1] - 1
  a1, a2 = alphas
  rows = np.arange(n)
  unigram = np.zeros((n, vocab_size))
  bigram = np.zeros((n, vocab_size, vocab_size)) if order == 2 else None
  losses = np.zeros((n, length))
  for t in range(length):
    cur, nxt = w[:, t], w[:, t + 1]
    unigram[rows, cur] += 1
    p = (unigram[rows, nxt] + a1 / vocab_size) / (t + 1 + a1)
    if order == 2:
      if t > 0:
        bigram[rows, w[:, t - 1], cur] += 1
      p = (bigram[rows, cur, nxt] + a2 * p) / (bigram[rows, cur].sum(-1) + a2)
    losses[:, t] = -np.log(p)
  return losses


REFERENCES = {'in-context unigram': 1, 'in-context bigram': 2}
READOUT_REFERENCE = 'in-context counts via the random table'
READOUT_GRID_A = 2.0 ** np.arange(-3, 7.5, 0.5)
READOUT_GRID_B = np.concatenate([[0.0], 2.0 ** np.arange(-7, 3.5, 0.5)])


def _counter_features(windows, vocab_size):
  """(shares, seen) [N, L, V]: each token's share of tokens 0..t, and whether it occurred."""
  w = np.asarray(windows)[:, :-1]
  counts = np.cumsum(np.eye(vocab_size, dtype=np.float32)[w], axis=1)
  shares = counts / np.arange(1, w.shape[1] + 1, dtype=np.float32)[None, :, None]
  return shares, (counts > 0).astype(np.float32)


def _nll(logits, targets):
  logits = logits - logits.max(-1, keepdims=True)
  log_z = np.log(np.exp(logits).sum(-1))
  return log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def readout_counter_losses(windows, tables, max_rounds=10):
  """(losses [N, L], a [L], b [L]): the best in-context counter that a lexinvariant LM's tied
  readout can express, for windows [N, L + 1] and their random tables [N, V, d].

  At position t the counter writes h = sum_u (a_t f_u + b_t s_u) E_u / sqrt(d), f_u token u's
  share of tokens 0..t and s_u whether it occurred, and reads logits_v = h . E_v / sqrt(d) like
  the model; a_t and b_t minimise the mean loss at position t over the windows (a coordinate
  search over the READOUT_GRID_* log grids, all positions at once). With N(0, I_d) rows at
  small d the cross terms E_u . E_v blur this distribution: it is how far counting alone can
  take a lexinvariant model of that width. With orthogonal rows it is a plain counter."""
  e = np.asarray(tables, np.float32)
  gram = np.einsum('nud,nvd->nuv', e, e) / e.shape[-1]
  shares, seen = _counter_features(windows, e.shape[1])
  share_logits, seen_logits = shares @ gram, seen @ gram
  targets = np.asarray(windows)[:, 1:]
  length = targets.shape[1]

  def losses(a, b):  # a, b [L] -> [N, L]
    return _nll(a[:, None] * share_logits + b[:, None] * seen_logits, targets)

  def argmin(grid, loss_of):  # per position, the grid value with the least mean loss
    return grid[np.argmin([loss_of(np.full(length, g)).mean(0) for g in grid], axis=0)]

  a, b = np.ones(length), np.zeros(length)
  for _ in range(max_rounds):  # until no position moves on either grid
    new_a = argmin(READOUT_GRID_A, lambda x: losses(x, b))
    new_b = argmin(READOUT_GRID_B, lambda x: losses(new_a, x))
    if np.array_equal(new_a, a) and np.array_equal(new_b, b):
      break
    a, b = new_a, new_b
  return losses(a, b), a, b


# The bigram and the readout counters hold [N, V, V] arrays: character-level and small subword
# vocabularies only (a 32k vocabulary would need terabytes).
MAX_PAIRWISE_VOCAB = 1024


def reference_curves(windows, vocab_size, smooth, lexinvariant=None, seed=0):
  """{name: curve} of the references that need no training (see the module doc) on windows
  [N, L + 1]; the readout counter with a `lexinvariant` family's tables (window i's from
  fold_in(PRNGKey(seed + 1), i)), and the pairwise ones only up to MAX_PAIRWISE_VOCAB."""
  def curve(losses, **extra):
    loss = losses.mean(0)
    return {'perplexity': np.exp(loss), 'mean_loss': float(loss.mean()),
            'perplexity_smoothed': np.exp(np.asarray(lm_metrics.moving_average(loss, smooth))),
            **extra}

  pairwise = vocab_size <= MAX_PAIRWISE_VOCAB
  out = {name: curve(in_context_losses(windows, vocab_size, order))
         for name, order in REFERENCES.items() if order == 1 or pairwise}
  if lexinvariant is not None and pairwise:
    tables = lm_eval.example_tables(lexinvariant, jax.random.PRNGKey(seed + 1),
                                    np.arange(len(windows)))
    losses, a, b = readout_counter_losses(windows, tables)
    out[READOUT_REFERENCE] = curve(losses, width=lexinvariant.config.model.width,
                                   table=lexinvariant.table, fitted_a=a, fitted_b=b)
  return out


def _mean(x):
  x = np.asarray(x, np.float64)
  return float(np.nanmean(x)) if np.isfinite(x).any() else float('nan')


def ratio_summary(raw, smoothed):
  """Summary numbers of a per-position perplexity ratio (model / standard)."""
  n = len(raw)
  tenth = max(1, int(np.ceil(0.1 * n)))
  first, last = _mean(raw[:tenth]), _mean(raw[-tenth:])
  return {'at_first_position': float(raw[0]), 'at_last_position': float(raw[-1]),
          'smoothed_at_last_position': float(smoothed[-1]),
          'mean_first_10pct': first, 'mean_last_10pct': last,
          'shrinks': bool(last < first), 'positions_per_10pct': tenth}


def evaluate(models, *, num_windows=256, batch_size=16, smooth=16, seed=0):
  """models {name: (family, params)} on one data config -> result dict (see module doc).

  Names 'standard' (the reference for the ratios), 'lexinvariant', 'semi'. Smoothed curves are
  exp(moving average of the per-position loss over `smooth` positions): a running geometric
  mean of the perplexities."""
  family = next(iter(models.values()))[0]
  d = family.config.data
  tokens = lm_eval.split_tokens(d, d.get('test_split', 'test'))
  windows = lm_eval.windows(tokens, d.seq_len + 1, num_windows)
  result = {'split': d.get('test_split', 'test'), 'num_windows': len(windows),
            'seq_len': d.seq_len, 'smooth': smooth, 'seed': seed,
            'positions': np.arange(d.seq_len), 'models': {}, 'ratios': {}, 'summary': {}}
  for name, (fam, params) in models.items():
    acc = position_loss(fam, params, windows, batch_size=batch_size, seed=seed)
    loss = acc.curve()
    result['models'][name] = {
        'perplexity': np.exp(loss),
        'perplexity_smoothed': np.exp(np.asarray(lm_metrics.moving_average(loss, smooth))),
        'mean_loss': acc.mean_loss(), 'bits_per_token': acc.bits_per_character(),
        'num_tokens': acc.num_tokens,
        'current_token_swap_kl': current_token_swap(fam, params, windows,
                                                    batch_size=batch_size, seed=seed)}
  lexinvariant = next((f for f, _ in models.values() if f.mode == 'lexinvariant'), None)
  result['references'] = reference_curves(windows, d.vocab_size, smooth, lexinvariant, seed)
  curves = result['models']
  if 'standard' in curves:
    for name in curves:
      if name != 'standard':
        key = f'{name}/standard'
        raw = curves[name]['perplexity'] / curves['standard']['perplexity']
        smoothed = curves[name]['perplexity_smoothed'] / curves['standard']['perplexity_smoothed']
        result['ratios'][key] = {'raw': raw, 'smoothed': smoothed}
        result['summary'][key] = ratio_summary(raw, smoothed)
  return result


def figure(result):
  """Smoothed perplexity vs position (log y) above the smoothed ratio to the standard model."""
  x = result['positions']
  n, w = result['num_windows'], result['smooth']
  curves = dict(result['models'], **result.get('references', {}))
  panels = [plots.line_plot(
      {name: (x, m['perplexity_smoothed']) for name, m in curves.items()},
      title=f'Perplexity vs context position ({n} test windows, moving average over {w})',
      xlabel='position t (predicting token t + 1 from tokens 0..t)', ylabel='perplexity', logy=True,
      colours=plots.COLOURS)]
  if result['ratios']:
    panels.append(plots.line_plot(
        {k: (x, r['smoothed']) for k, r in result['ratios'].items()},
        colours={f'{m}/standard': c for m, c in plots.COLOURS.items()},
        title='Perplexity ratio to the standard model (smoothed)', xlabel='position',
        ylabel='ratio', hlines={'1x': 1.0}))
  return heatmaps.stack(panels)


def summary_lines(result):
  lines = [f"perplexity on {result['num_windows']} test windows of {result['seq_len']}:"]
  for name, m in result['models'].items():
    lines.append(f"  {name:<18} mean loss {m['mean_loss']:.3f} nats, perplexity at first "
                 f"{m['perplexity'][0]:.2f}, at last (smoothed) {m['perplexity_smoothed'][-1]:.2f}")
  for name, m in result['models'].items():
    kl = m['current_token_swap_kl']
    lines.append(f"  {name:<18} at the last position, swapping the current token moves the "
                 f"prediction by {kl['swap']:.4f} nats (KL), another window by "
                 f"{kl['other_window']:.4f}")
  for name, m in result.get('references', {}).items():
    lines.append(f"  {name:<18} mean loss {m['mean_loss']:.3f} nats (reference: counts of the "
                 f"window so far), at last (smoothed) {m['perplexity_smoothed'][-1]:.2f}")
  for key, s in result['summary'].items():
    trend = 'shrinks' if s['shrinks'] else 'does not shrink'
    lines.append(f"  {key}: ratio first 10% {s['mean_first_10pct']:.2f}x, last 10% "
                 f"{s['mean_last_10pct']:.2f}x ({trend})")
  return lines


def run(models, **kwargs):
  """(result, figure) for models {name: (family, params)}."""
  result = evaluate(models, **kwargs)
  return result, figure(result)

