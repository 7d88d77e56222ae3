"""Substitution-cipher deciphering with a frozen character-level lexinvariant LM.

Cipher: a random bijection from the 26 lowercase letters to 26 distinct ASCII code points that
never occur in the corpus (train + test); every other character is kept. Each sequence gets a
fresh key. A lexinvariant LM cannot tell a cipher symbol from the letter it replaces by its
embedding (every sequence has a fresh random table anyway), only by its use in context.

Probe: a 2-layer GELU MLP on the frozen LM's final hidden state at each position, its output
decoded with its own learned embedding table [128, probe_dim], trained with Adam to predict
the true plaintext character at that position, on enciphered train windows (fresh key and
random tables per window). Only the probe's parameters are optimised. `layers` (not in the
paper) probes other residual streams instead, or several side by side: 'block<i>' is block i's
output, standardised per position as the final norm would (without its scale and bias).

Score (the paper's): over a `window`-character window, each cipher symbol's predicted letter is
the majority vote of the probe's predictions at its occurrences (ties: the smallest code
point); key precision is the fraction of the window's cipher symbols whose vote is the right
letter, averaged over test sequences and plotted against the window start. The classical
reference decipherer ranks cipher symbols by count (ties: first occurrence) and maps them to the
lowercase letters ranked by train-split frequency (ties: alphabetical). It is scored twice:
counting the window alone, and counting all the text up to the window's end, which is what the
LM has seen there; the second rises with the window start and is what a model that only counts
symbols in context could reach. A second classical reference, cipher_search, starts from that
key and searches for the key under which a train-split bigram model finds the text so far most
likely: how much of the key the text itself gives away.

Information: the probe's held-out cross entropy on the plaintext, subtracted from the same
text's cross entropy under the train split's character frequencies (what a probe that reads
nothing from the state reaches), says how much the probed state tells about the current
character, in nats per character. Zero explains a zero key precision: the probe then predicts
the most frequent character, the space.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgen.analysis import cipher_search, lm_eval, plots
from jaxgen.errors import UserError

VOCAB = 128  # the char tokenizer's ids are the ASCII code points
LETTERS = np.arange(ord('a'), ord('z') + 1)


def check_model(family):
  """The probe needs a char-level lexinvariant model."""
  if family.config.data.tokenizer != 'char':
    raise UserError('the cipher evaluation needs a character-level model (--config.data.'
                    f'tokenizer=char), got tokenizer {family.config.data.tokenizer!r}')
  if family.mode != 'lexinvariant':
    raise UserError(f'the cipher evaluation probes a lexinvariant model, got a {family.mode!r} '
                    'one (pass a workdir trained with configs/lexinvariant.py:<variant>,'
                    'lexinvariant)')


# ----------------------------------------------------------------------------- the cipher


def unused_symbols(*streams):
  """Code points in [0, 128) that occur in none of the token streams."""
  used = np.zeros(VOCAB, bool)
  for s in streams:
    used[np.unique(s)] = True
  return np.flatnonzero(~used)


def make_key(rng, symbols):
  """key [26]: letter chr(97 + i) is enciphered as key[i], distinct symbols from `symbols`."""
  if len(symbols) < len(LETTERS):
    raise UserError(f'only {len(symbols)} ASCII code points never occur in the corpus; a '
                    f'substitution cipher of the 26 lowercase letters needs 26')
  return rng.choice(np.asarray(symbols), len(LETTERS), replace=False).astype(np.int32)


def encipher(tokens, key):
  """tokens [..] with each lowercase letter replaced by its cipher symbol."""
  table = np.arange(VOCAB)
  table[LETTERS] = key
  return table[np.asarray(tokens)].astype(np.int32)


def letter_order(tokens):
  """The 26 lowercase letters, most frequent in `tokens` first (ties alphabetical)."""
  counts = np.bincount(np.asarray(tokens), minlength=VOCAB)[LETTERS]
  return LETTERS[np.argsort(-counts, kind='stable')]


# ----------------------------------------------------------------------------- scoring


def _symbol_index(cipher, key):
  """For each position, the index of its cipher symbol in `key` (-1 for plain characters)."""
  index = np.full(VOCAB, -1)
  index[key] = np.arange(len(key))
  return index[np.asarray(cipher)]


def key_precision(cipher, predictions, key):
  """Majority-vote key precision over one window: cipher and predicted characters [W]."""
  sym = _symbol_index(cipher, key)
  at = sym >= 0
  votes = np.zeros((len(key), VOCAB), int)
  np.add.at(votes, (sym[at], np.asarray(predictions)[at]), 1)
  present = votes.sum(1) > 0
  if not present.any():
    return float('nan')
  return float(np.mean(votes.argmax(1)[present] == LETTERS[present]))


def frequency_precision(counted, key, order, scored=None):
  """Key precision of the frequency decipherer (order: letter_order). It ranks the cipher
  symbols by their count in `counted` and scores those that occur in `scored` (default: all of
  `counted`): the window itself, or everything up to the window's end."""
  sym = _symbol_index(counted, key)
  sym = sym[sym >= 0]
  in_scored = np.unique(_symbol_index(counted if scored is None else scored, key))
  in_scored = in_scored[in_scored >= 0]
  if not len(in_scored):
    return float('nan')
  present, first, counts = np.unique(sym, return_index=True, return_counts=True)
  ranked = present[np.lexsort((first, -counts))]  # by count, then by first occurrence
  guess = dict(zip(ranked.tolist(), np.asarray(order)[:len(ranked)].tolist()))
  return float(np.mean([guess[s] == LETTERS[s] for s in in_scored]))


def searched_precision(cipher, key, guesses, starts, window):
  """Key precision [S] of keys found by a search (cipher_search.decipher) for one sequence:
  guesses [S, 26] give each cipher slot's letter index at each window start, scored on the
  window's symbols."""
  slots = _symbol_index(cipher, key)
  out = []
  for guess, s in zip(guesses, starts):
    present = np.unique(slots[s:s + window])
    present = present[present >= 0]
    out.append(np.mean(guess[present] == present) if len(present) else float('nan'))
  return np.array(out)


def window_starts(seq_len, window, stride):
  return list(range(0, seq_len - window + 1, stride))


def window_precisions(cipher, predictions, key, order, starts, window):
  """Key precision [S] at each window start of one sequence: {name: majority-vote precision}
  for each of `predictions` {name: characters [L]}, plus 'frequency' (the frequency decipherer
  counting the window) and 'frequency_prefix' (counting everything up to the window's end)."""
  out = {name: np.array([key_precision(cipher[s:s + window], p[s:s + window], key)
                         for s in starts]) for name, p in predictions.items()}
  out['frequency'] = np.array([frequency_precision(cipher[s:s + window], key, order)
                               for s in starts])
  out['frequency_prefix'] = np.array([
      frequency_precision(cipher[:s + window], key, order, cipher[s:s + window])
      for s in starts])
  return out


def rise(curves):
  """How much a curve rises from the first window to the last, paired by sequence: curves
  [N, S] (NaN where a window holds no cipher symbol) -> {mean, stderr, n} of last - first."""
  curves = np.asarray(curves, np.float64)
  change = curves[:, -1] - curves[:, 0]
  change = change[np.isfinite(change)]
  n = len(change)
  stderr = float(change.std(ddof=1) / np.sqrt(n)) if n > 1 else float('nan')
  return {'mean': float(change.mean()) if n else float('nan'), 'stderr': stderr, 'n': n}


# ----------------------------------------------------------------------------- the probe


class Probe(nn.Module):
  """Hidden states [.., d] -> logits [.., vocab] through a 2-layer GELU MLP and its own
  learned (non-random) embedding table."""
  hidden: int
  dim: int
  vocab: int = VOCAB

  @nn.compact
  def __call__(self, h):
    x = nn.Dense(self.dim)(nn.gelu(nn.Dense(self.hidden)(h)))
    table = self.param('embedding', nn.initializers.normal(self.dim ** -0.5),
                       (self.vocab, self.dim))
    return x @ table.T


class CountingStandIn:
  """Stands in for a lexinvariant LM that only counts: its final hidden state at position t
  holds how often the current symbol occurs in tokens 0..t (its share, its rank among the
  symbols so far / 10, its log count; zero-padded to the model's width) and nothing else.

  The probe trained on it is a reference: what counting alone lets the probe decipher, and a
  check that probe and scoring read a symbol's identity wherever a hidden state carries it."""
  mode = 'lexinvariant'

  def __init__(self, config):
    self.config = config

  def tables(self, rng, batch_size):
    return None

  def tables_from_keys(self, keys):
    return None

  def apply(self, params, tokens, tables=None, return_hidden=True):
    del params, tables, return_hidden
    counts = jnp.cumsum(jax.nn.one_hot(tokens, VOCAB), axis=1)
    own = jnp.take_along_axis(counts, tokens[..., None], -1)
    share = own / jnp.arange(1, tokens.shape[1] + 1)[None, :, None]
    rank = (counts > own).sum(-1, keepdims=True) / 10.0
    features = jnp.concatenate([share, rank, jnp.log(own)], -1)
    return None, jnp.pad(features, ((0, 0), (0, 0), (0, self.config.model.width - 3)))


FINAL = ('final',)


def check_layers(family, layers):
  """`layers`: 'final' and/or 'block<i>' names of the LM's residual streams, each once."""
  names = FINAL + tuple(f'block{i}' for i in range(family.config.model.depth))
  if not layers or len(set(layers)) != len(layers) or not set(layers) <= set(names):
    raise UserError(f'probe layers {list(layers)}: give distinct names among {list(names)}')


def _standardise(x, eps=1e-6):
  return (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + eps)


def hidden_states(family, lm_params, tokens, tables, layers=FINAL):
  """The frozen LM's hidden states [B, L, d * len(layers)] at `layers` (check_layers)."""
  lm_params = jax.lax.stop_gradient(lm_params)
  if tuple(layers) == FINAL:
    _, h = family.apply(lm_params, tokens, tables, return_hidden=True)
    return jax.lax.stop_gradient(h)
  (_, h), state = family.apply(lm_params, tokens, tables, return_hidden=True,
                               capture_intermediates=lambda m, _: m.name in layers,
                               mutable=['intermediates'])
  blocks = state['intermediates']
  parts = [h if n == 'final' else _standardise(blocks[n]['__call__'][0]) for n in layers]
  return jax.lax.stop_gradient(jnp.concatenate(parts, -1))


def _enciphered_batch(rng, stream, length, batch, symbols):
  """Random train windows of `length`: (plaintext, ciphertext) [B, L], a fresh key each."""
  plain = lm_eval.random_windows(rng, stream, length, batch)
  cipher = np.stack([encipher(p, make_key(rng, symbols)) for p in plain])
  return plain, cipher


def train_probe(family, lm_params, train_stream, symbols, *, steps, batch_size=8, hidden=256,
                dim=64, lr=1e-3, seed=0, num_points=10, layers=FINAL):
  """(probe, probe params, loss curve [(step, mean loss)] at ~num_points points)."""
  length = family.config.data.seq_len
  probe = Probe(hidden, dim)
  tx = optax.adam(lr)
  h0 = jnp.zeros((1, 1, family.config.model.width * len(layers)))
  probe_params = jax.jit(lambda k: probe.init(k, h0)['params'])(jax.random.PRNGKey(seed))
  rng, base = np.random.default_rng(seed), jax.random.PRNGKey(seed + 1)

  @jax.jit
  def step(probe_params, opt_state, lm_params, plain, cipher, i):
    table_key = jax.random.fold_in(base, i)  # in the step: an eager fold_in costs ~10 ms
    h = hidden_states(family, lm_params, cipher, family.tables(table_key, cipher.shape[0]),
                      layers)

    def loss_fn(p):
      logits = probe.apply({'params': p}, h)
      return optax.softmax_cross_entropy_with_integer_labels(logits, plain).mean()

    loss, grads = jax.value_and_grad(loss_fn)(probe_params)
    updates, opt_state = tx.update(grads, opt_state, probe_params)
    return optax.apply_updates(probe_params, updates), opt_state, loss

  opt_state, losses = jax.jit(tx.init)(probe_params), []
  for i in range(steps):
    plain, cipher = _enciphered_batch(rng, train_stream, length, batch_size, symbols)
    probe_params, opt_state, loss = step(probe_params, opt_state, lm_params, plain, cipher, i)
    losses.append(loss)
  losses = np.asarray(jax.device_get(losses), np.float64)
  chunks = np.array_split(np.arange(steps), min(num_points, steps)) if steps else []
  curve = [(int(c[-1]) + 1, float(losses[c].mean())) for c in chunks]
  return probe, probe_params, curve


def predict(family, lm_params, probe, probe_params, cipher, plain, *, batch_size=16, seed=0,
            layers=FINAL):
  """For ciphertexts [N, L]: the probe's argmax character [N, L] and its cross entropy [N, L]
  (nats) on the true plaintext; row i's random table from fold_in(PRNGKey(seed), i)."""

  @jax.jit  # parameters as arguments, not constants baked into the executable
  def batch(lm_params, probe_params, ids, tokens, targets):
    tables = lm_eval.example_tables(family, jax.random.PRNGKey(seed), ids)
    h = hidden_states(family, lm_params, tokens, tables, layers)
    logits = probe.apply({'params': probe_params}, h)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.argmax(logits, -1), nll

  chars, nlls = [], []
  for idx, real in lm_eval.padded_batches(len(cipher), batch_size):
    c, n = jax.device_get(batch(lm_params, probe_params, idx, cipher[idx], plain[idx]))
    chars.append(c[:real])
    nlls.append(n[:real])
  return np.concatenate(chars), np.concatenate(nlls)


def unigram_loss(train, plain):
  """Cross entropy (nats per character) of `plain` under the character frequencies of `train`
  (add-one smoothed): the held-out loss of a probe that learns only how often each character
  occurs, i.e. of a hidden state that tells it nothing about the current character."""
  p = (np.bincount(np.asarray(train).ravel(), minlength=VOCAB) + 1.0) / (np.size(train) + VOCAB)
  return float(-np.log(p[np.asarray(plain)]).mean())


# ----------------------------------------------------------------------------- evaluation


def _probe_predictions(family, lm_params, train, cipher, plain, symbols, *, probe_steps,
                       probe_batch, probe_hidden, probe_dim, probe_lr, batch_size, seed,
                       layers=FINAL):
  """Trains a probe on `family`'s hidden states; (its characters [N, L] for `cipher`, its
  cross entropy [N, L] on `plain`, train loss curve)."""
  probe, probe_params, curve = train_probe(
      family, lm_params, train, symbols, steps=probe_steps, batch_size=probe_batch,
      hidden=probe_hidden, dim=probe_dim, lr=probe_lr, seed=seed, layers=layers)
  pred, nll = predict(family, lm_params, probe, probe_params, cipher, plain,
                      batch_size=batch_size, seed=seed + 2, layers=layers)
  return pred, nll, curve


def _accuracies(pred, nll, plain, blind):
  """Accuracies, and the probe's held-out cross entropy against `blind` (unigram_loss):
  their difference is what the hidden state tells the probe about the current character."""
  letter, correct, loss = np.isin(plain, LETTERS), pred == plain, float(nll.mean())
  return {'test_loss': loss, 'information': blind - loss,
          'accuracy_enciphered': float(correct[letter].mean()) if letter.any() else None,
          'accuracy_plain': float(correct[~letter].mean()) if (~letter).any() else None,
          'accuracy_all': float(correct.mean())}


def evaluate(family, lm_params, *, probe_steps=500, num_sequences=1000, window=100, stride=10,
             probe_batch=8, probe_hidden=256, probe_dim=64, probe_lr=1e-3, batch_size=16,
             seed=0, layers=FINAL):
  """Trains the probe on the LM's `layers` (check_layers), deciphers `num_sequences`
  enciphered test windows; the result dict. The same probe is trained on the CountingStandIn's
  final hidden state too, as a reference.

  The window is clipped to the model's seq_len (the paper: 100 characters of 512)."""
  check_model(family)
  layers = tuple(layers)
  check_layers(family, layers)
  d = family.config.data
  train = lm_eval.split_tokens(d, d.get('train_split', 'train'))
  test = lm_eval.split_tokens(d, d.get('test_split', 'test'))
  symbols = unused_symbols(train, test)
  order = letter_order(train)
  window = min(window, d.seq_len)
  starts = window_starts(d.seq_len, window, stride)

  plain = lm_eval.windows(test, d.seq_len, num_sequences)
  rng = np.random.default_rng(seed + 1)  # test keys, unlike any training key sequence
  keys = np.stack([make_key(rng, symbols) for _ in plain])
  cipher = np.stack([encipher(p, k) for p, k in zip(plain, keys)])
  settings = dict(probe_steps=probe_steps, probe_batch=probe_batch, probe_hidden=probe_hidden,
                  probe_dim=probe_dim, probe_lr=probe_lr, batch_size=batch_size, seed=seed)
  pred, nll, curve = _probe_predictions(family, lm_params, train, cipher, plain, symbols,
                                        layers=layers, **settings)
  counting, counting_nll, counting_curve = _probe_predictions(
      CountingStandIn(family.config), {}, train, cipher, plain, symbols, **settings)
  blind = unigram_loss(train, plain)
  per_sequence = [window_precisions(c, {'probe': p, 'counting_stand_in': q}, k, order, starts,
                                    window)
                  for c, p, q, k in zip(cipher, pred, counting, keys)]
  slots = np.stack([_symbol_index(c, k) for c, k in zip(cipher, keys)])
  searched = cipher_search.decipher(slots, cipher, [s + window for s in starts],
                                    cipher_search.bigram_log_probs(train), order)
  for seq, c, k, g in zip(per_sequence, cipher, keys, searched):
    seq['bigram_search'] = searched_precision(c, k, g, starts, window)
  curves = {name: np.stack([seq[name] for seq in per_sequence]) for name in per_sequence[0]}
  precision = {name: np.nanmean(c, 0) for name, c in curves.items()}
  return {
      'num_sequences': len(plain), 'seq_len': d.seq_len, 'window': window, 'stride': stride,
      'seed': seed, 'num_unused_symbols': len(symbols), 'cipher_symbols': symbols,
      'letter_order': ''.join(map(chr, order)),
      'window_starts': starts,
      'precision': precision,
      'first_window': {name: p[0] for name, p in precision.items()},
      'last_window': {name: p[-1] for name, p in precision.items()},
      'rise': {name: rise(c) for name, c in curves.items()},
      'unigram_loss': blind,
      'probe': {'steps': probe_steps, 'batch_size': probe_batch, 'hidden': probe_hidden,
                'dim': probe_dim, 'lr': probe_lr, 'layers': list(layers), 'train_loss': curve,
                **_accuracies(pred, nll, plain, blind)},
      'counting_stand_in': {'train_loss': counting_curve,
                            **_accuracies(counting, counting_nll, plain, blind)},
  }


CURVES = {'probe': 'probe on the LM (majority vote)',
          'counting_stand_in': 'probe on a model that only counts',
          'frequency': 'frequency ranks (window)',
          'frequency_prefix': 'frequency ranks (text so far)',
          'bigram_search': 'bigram model + search (text so far)'}


def figure(result):
  x = result['window_starts']
  p = result['probe']
  layers = p.get('layers', list(FINAL))
  labels = dict(CURVES)
  if layers != list(FINAL):
    labels['probe'] = f"probe on the LM's {'+'.join(layers)} (majority vote)"
  title = (f"Cipher key precision ({result['num_sequences']} test sequences, "
           f"{result['window']}-char windows, probe {p['steps']} steps)")
  prec = result['precision']
  return plots.line_plot({label: (x, prec[name]) for name, label in labels.items()},
                         title=title, xlabel='window start (characters)',
                         ylabel='key precision', ylim=(0.0, 1.0))


def summary_lines(result):
  f, l, p = result['first_window'], result['last_window'], result['probe']
  acc = p['accuracy_enciphered']
  loss = p['train_loss'][-1][1] if p['train_loss'] else float('nan')
  lines = ['cipher: key precision in the first / last window (rise, paired by sequence, '
           '+- its standard error)']
  for name, label in CURVES.items():
    r = result['rise'][name]
    lines.append(f"  {label:<36} {f[name]:.3f} / {l[name]:.3f} "
                 f"({r['mean']:+.4f} +- {r['stderr']:.4f})")
  lines.append(f"  probe accuracy on enciphered letters {acc if acc is None else round(acc, 3)}, "
               f"final train loss {loss:.3f}")
  c = result['counting_stand_in']
  lines.append(f"  probe held-out loss {p['test_loss']:.4f} nats against "
               f"{result['unigram_loss']:.4f} from character frequencies alone: the state tells "
               f"it {p['information']:+.4f} nats per character (counting stand-in "
               f"{c['information']:+.4f})")
  return lines


def run(family, lm_params, **kwargs):
  result = evaluate(family, lm_params, **kwargs)
  return result, figure(result)
