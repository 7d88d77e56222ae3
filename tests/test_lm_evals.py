"""Lexinvariant LM evaluations: cipher scoring, reasoning tasks, perplexity curves and the CLI."""
import copy
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, cli_env, load_config, load_script
from jaxgen import trainer
from jaxgen.analysis import cipher, lexinvariant, lm_eval, lm_perplexity, plots, reasoning
from jaxgen.data import tokenizers
from jaxgen.errors import UserError

CHAR = tokenizers.CharTokenizer()


@pytest.fixture(scope='module')
def workdirs(text_data_dir, tmp_path_factory):
  """Workdirs of a tiny lexinvariant and a tiny standard model as trainer.train leaves them
  (config.json, an orbax checkpoint), holding initial parameters: training steps would only
  add compile time, and no test here depends on what the models learned."""
  root = tmp_path_factory.mktemp('lm_evals')
  out = {}
  for mode in ('lexinvariant', 'standard'):
    cfg = load_config('configs/lexinvariant.py', f'tiny,{mode}')
    cfg.data.data_dir = text_data_dir
    out[mode] = str(root / mode)
    exp = trainer.Experiment(cfg, out[mode])
    os.makedirs(out[mode])
    with open(os.path.join(out[mode], 'config.json'), 'w') as f:
      f.write(cfg.to_json_best_effort(indent=2))
    with exp.checkpointer() as ckpt:
      ckpt.save(0, exp.init_state(), {}, cfg)
  return out


@pytest.fixture(scope='module')
def models(workdirs):
  return {m: lm_eval.load_trained(w) for m, w in workdirs.items()}


# ----------------------------------------------------------------------------- cipher


def test_majority_vote_key_precision_on_a_hand_computed_example():
  key = np.arange(26) + 1  # 'a' -> 1, 'b' -> 2, 'c' -> 3, ...
  #               a  b  a  ' '  a  c  b      (plaintext)
  cipher_tokens = [1, 2, 1, 32, 1, 3, 2]
  predictions = [ord(c) for c in 'axb acy']
  # a: votes a, b, a -> 'a' right; b: votes x, y, a tie -> the smaller code point 'x', wrong;
  # c: 'c' right. The plain space is no cipher symbol and does not count.
  assert cipher.key_precision(cipher_tokens, predictions, key) == pytest.approx(2 / 3)
  # Windows [0:3] (a: a/b tie -> 'a' right, b wrong) and [4:7] (a, c right, b wrong).
  out = cipher.window_precisions(np.array(cipher_tokens), {'probe': np.array(predictions)},
                                 key, cipher.LETTERS, [0, 4], 3)
  np.testing.assert_allclose(out['probe'], [1 / 2, 2 / 3])
  assert np.isnan(cipher.key_precision([32, 33], [97, 98], key))  # no cipher symbol


def test_enciphering_is_a_bijection_of_lowercase_letters_to_unused_symbols(models):
  family = models['lexinvariant'][0]
  d = family.config.data
  train, test = (lm_eval.split_tokens(d, s) for s in ('train', 'test'))
  unused = cipher.unused_symbols(train, test)
  assert len(unused) >= 26 and not np.isin(unused, np.concatenate([train, test])).any()
  assert not np.isin(np.arange(ord('a'), ord('z') + 1), unused).any()
  key = cipher.make_key(np.random.default_rng(0), unused)
  assert len(set(key.tolist())) == 26 and np.isin(key, unused).all()
  plain = test[:5000]
  enciphered = cipher.encipher(plain, key)
  lower = np.isin(plain, cipher.LETTERS)
  assert lower.sum() > 1000
  np.testing.assert_array_equal(enciphered[~lower], plain[~lower])
  np.testing.assert_array_equal(enciphered[lower], key[plain[lower] - ord('a')])
  assert not np.isin(enciphered[lower], np.concatenate([train, test])).any()
  inverse = dict(zip(key.tolist(), cipher.LETTERS.tolist()))
  np.testing.assert_array_equal([inverse.get(t, t) for t in enciphered.tolist()], plain)
  assert not np.array_equal(key, cipher.make_key(np.random.default_rng(1), unused))
  with pytest.raises(UserError, match='needs 26'):
    cipher.make_key(np.random.default_rng(0), unused[:25])


def test_frequency_decipherer_is_perfect_when_letter_ranks_match():
  rng = np.random.default_rng(0)
  order = rng.permutation(cipher.LETTERS)
  # Letter of rank r occurs 30 - r times: distinct counts, so the ranks are unambiguous.
  text = np.concatenate([np.full(30 - r, c) for r, c in enumerate(order)] + [np.full(80, 32)])
  text = rng.permutation(text)
  np.testing.assert_array_equal(cipher.letter_order(text), order)
  key = cipher.make_key(rng, np.arange(26) + 1)
  enc = cipher.encipher(text, key)
  assert cipher.frequency_precision(enc, key, order) == 1.0
  swapped = order.copy()
  swapped[[3, 4]] = swapped[[4, 3]]
  assert cipher.frequency_precision(enc, key, swapped) == pytest.approx(24 / 26)


def test_frequency_decipherer_over_the_text_so_far_sees_more_than_the_window():
  key = np.arange(26) + 1
  order = cipher.LETTERS  # 'a' the most frequent letter, then 'b', ...
  #                  a  a  a  b  b  a  (plaintext)
  enc = np.array([1, 1, 1, 2, 2, 1])
  # The window [3:5] = 'bb' alone: one cipher symbol, ranked first, so guessed 'a': wrong.
  # Counting [0:5]: a x3 -> 'a', b x2 -> 'b', and only b occurs in the window: right.
  assert cipher.frequency_precision(enc[3:5], key, order) == 0.0
  assert cipher.frequency_precision(enc[:5], key, order, enc[3:5]) == 1.0
  # Window [4:6] = 'ba': a count tie that first occurrence breaks the wrong way; the text so far
  # (a x4, b x2) gets both right.
  out = cipher.window_precisions(enc, {}, key, order, [3, 4], 2)
  assert set(out) == {'frequency', 'frequency_prefix'}
  np.testing.assert_allclose(out['frequency'], [0.0, 0.0])
  np.testing.assert_allclose(out['frequency_prefix'], [1.0, 1.0])
  assert np.isnan(cipher.frequency_precision(enc, key, order, np.array([32, 33])))


def test_rise_is_the_change_from_first_to_last_window_paired_by_sequence():
  curves = np.array([[0.0, 0.5, 1.0], [0.5, np.nan, 0.5], [np.nan, 0.2, 0.4], [0.25, 0.0, 1.0]])
  r = cipher.rise(curves)  # changes 1, 0, 0.75; the row without a first window is left out
  assert r['n'] == 3
  assert r['mean'] == pytest.approx(0.583333, abs=1e-6)
  assert r['stderr'] == pytest.approx(0.300463, abs=1e-6)  # sqrt(0.541667 / 2) / sqrt(3)


def test_unigram_loss_is_the_cross_entropy_under_train_frequencies():
  train = [1, 1, 2, 3] * 8  # 32 characters; add-one over the 128 code points: p(1) = 17 / 160
  p = {1: 17 / 160, 2: 9 / 160, 3: 9 / 160, 4: 1 / 160}
  assert cipher.unigram_loss(train, [1, 2]) == pytest.approx(-np.log(p[1] * p[2]) / 2)
  assert cipher.unigram_loss(train, np.array([[4, 1], [3, 3]])) == pytest.approx(
      -np.log(p[4] * p[1] * p[3] * p[3]) / 4)


def test_counting_stand_in_holds_the_current_symbols_counts(models):
  config = models['lexinvariant'][0].config
  tokens = np.array([[5, 7, 5, 5, 9, 7], [1, 1, 2, 3, 3, 3]])
  _, h = cipher.CountingStandIn(config).apply({}, jnp.asarray(tokens))
  h = np.asarray(h)
  assert h.shape == (2, 6, config.model.width) and not h[..., 3:].any()
  for b, row in enumerate(tokens.tolist()):
    for t in range(6):
      seen = row[:t + 1]
      count = seen.count(row[t])
      rank = sum(seen.count(u) > count for u in set(seen))
      np.testing.assert_allclose(h[b, t, :3], [count / (t + 1), rank / 10, np.log(count)],
                                 rtol=1e-6, atol=1e-7)


class _BlindStandIn(cipher.CountingStandIn):
  """A hidden state that carries nothing."""

  def apply(self, params, tokens, tables=None, return_hidden=True):
    return None, jnp.zeros(tokens.shape + (self.config.model.width,))


def test_probe_deciphers_where_the_hidden_state_carries_counts(models):
  """The whole cipher evaluation with a blind stand-in as the LM: the probe on it deciphers
  nothing, while the reference probe on counts deciphers part of the key in every window
  (the full-size run: 0.07 rising to 0.11)."""
  config = copy.deepcopy(models['lexinvariant'][0].config)
  config.data.seq_len = 256
  result = cipher.evaluate(_BlindStandIn(config), {}, probe_steps=200, num_sequences=128,
                           window=100, stride=50)
  prec = result['precision']
  assert result['window_starts'] == [0, 50, 100, 150]
  assert prec['probe'].max() == 0.0  # one character everywhere: the space
  assert result['probe']['accuracy_enciphered'] == 0.0
  assert prec['counting_stand_in'].min() > 0.03, prec['counting_stand_in']
  counting = result['counting_stand_in']
  assert counting['accuracy_enciphered'] > 0.05
  assert counting['train_loss'][-1][1] < result['probe']['train_loss'][-1][1] - 0.3
  # Held out, the blind probe is no better than the character frequencies (its loss comes
  # near theirs from above); the counting probe gains more than 0.3 nats.
  assert -0.1 < result['probe']['information'] <= 0.005
  assert counting['information'] > 0.3


def test_probe_layers_are_the_residual_streams_side_by_side(models):
  """Block i's standardised output, put through the final norm's scale and bias, is the final
  hidden state when i is the last block; several layers come concatenated in the given order."""
  family, params, config, _ = models['lexinvariant']
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 12)), jnp.int32)
  tables = family.tables(jax.random.PRNGKey(0), 2)
  last = f'block{config.model.depth - 1}'
  final = cipher.hidden_states(family, params, tokens, tables)
  both = cipher.hidden_states(family, params, tokens, tables, ('block0', last, 'final'))
  d = config.model.width
  assert both.shape == (2, 12, 3 * d)
  np.testing.assert_array_equal(both[..., 2 * d:], final)
  norm = params['final_norm']['LayerNorm_0']
  np.testing.assert_allclose(both[..., d:2 * d] * norm['scale'] + norm['bias'], final,
                             rtol=1e-4, atol=1e-4)
  assert not np.allclose(both[..., :d], both[..., d:2 * d], atol=1e-2)
  for bad in ([], ['final', 'final'], [f'block{config.model.depth}'], ['embedding']):
    with pytest.raises(UserError, match='probe layers'):
      cipher.check_layers(family, bad)


def test_cipher_refuses_standard_models(models):
  with pytest.raises(UserError, match='lexinvariant'):
    cipher.check_model(models['standard'][0])


# ----------------------------------------------------------------------------- reasoning


def test_paper_examples_are_solved_by_the_oracle():
  vocab = reasoning.task_vocab(CHAR, 128)
  for task, prompt, answer in (('lookup', 'A->2 C->4 G->5 C->', '4'),
                               ('permutation', 'A 2 C->C A 4 1 D->', 'D 4')):
    assert CHAR.decode(reasoning.oracle(task, CHAR.encode(prompt), vocab)) == answer


@pytest.mark.parametrize('task', reasoning.TASKS)
def test_reasoning_prompts_oracle_and_scoring(task):
  vocab = reasoning.task_vocab(CHAR, 128)
  excluded = [ord(c) for c in '-> \n']
  assert len(vocab.symbols) == 124 and not np.isin(excluded, vocab.symbols).any()
  prompts, answers = reasoning.make_task(task, 200, vocab, seed=1)
  n, p = prompts.shape
  a = answers.shape[1]
  text = [CHAR.decode(row) for row in prompts]
  if task == 'lookup':  # "k->v k->v k->v q->": the query is a key, the answer its value
    assert p == 18 and a == 1
    for row, ans in zip(prompts, answers):
      keys, values = row[0:15:5], row[3:15:5]
      assert len(set(keys.tolist())) == 3 and row[15] in keys
      assert ans[0] == values[keys.tolist().index(row[15])]
      np.testing.assert_array_equal(row[[1, 2, 4, 6, 7, 9, 11, 12, 14, 16, 17]],
                                    [ord(c) for c in '-> -> -> ->'])
    symbols = prompts[:, [0, 3, 5, 8, 10, 13, 15]]
  else:  # "x y z->z x u v w->" -> "w u": one rule maps demo and query
    assert p == 18 and a == 3
    assert all(t[1] == t[3] == ' ' and t[5:7] == '->' for t in text)
    for row, ans in zip(prompts, answers):
      demo_in, demo_out, query = row[0:5:2], row[7:10:2], row[11:16:2]
      rule = [demo_in.tolist().index(t) for t in demo_out]
      np.testing.assert_array_equal(ans, [query[rule[0]], 32, query[rule[1]]])
    symbols = prompts[:, [0, 2, 4, 7, 9, 11, 13, 15]]
  assert np.isin(symbols, vocab.symbols).all() and len(np.unique(symbols)) > 100
  assert len({t for t in text}) == n  # examples differ

  assert reasoning.score(reasoning.oracle_generator(task, vocab), prompts, answers)[0] == 1.0
  # A perfect model stub: logits that put the oracle's answer token at each answer slot. One
  # batch of all examples, so the stub can close over their answers.
  oracle = np.array([reasoning.oracle(task, row, vocab) for row in prompts])

  def perfect(tokens):
    logits = np.zeros((n, tokens.shape[1], 128), np.float32)
    logits[np.arange(n)[:, None], p - 1 + np.arange(a), oracle] = 10.0
    return logits

  constant = lambda tokens: np.zeros((n, tokens.shape[1], 128), np.float32) + (
      np.arange(128) == ord('a'))
  acc, preds = reasoning.score(reasoning.logits_generator(perfect, a), prompts, answers, n)
  assert acc == 1.0 and preds.shape == answers.shape
  assert reasoning.score(reasoning.logits_generator(constant, a), prompts, answers, n)[0] < 0.05
  chance = reasoning.score(reasoning.random_generator(128, a), prompts, answers)[0]
  assert chance < 0.03


def test_uniform_guesser_scores_about_one_over_the_vocabulary():
  vocab = reasoning.task_vocab(CHAR, 128)
  prompts, answers = reasoning.make_task('lookup', 4000, vocab)
  acc = reasoning.score(reasoning.random_generator(128, 1, seed=3), prompts, answers)[0]
  assert abs(acc - 1 / 128) < 0.004


def test_models_are_scored_with_the_kv_cache_sampler(models):
  family, params, _, _ = models['lexinvariant']
  vocab = reasoning.task_vocab(family.tokenizer(), 128)
  prompts, answers = reasoning.make_task('lookup', 6, vocab)
  gen = reasoning.model_generator(family, params, 1)
  acc, preds = reasoning.score(gen, prompts, answers, batch_size=4)  # padded last batch
  # The same greedy tokens as the uncached reference with the same per-example tables.
  tables = lm_eval.example_tables(family, jax.random.PRNGKey(0), np.arange(6))
  ref = family.generate(params, prompts, 1, jax.random.PRNGKey(0), tables, temperature=0.0,
                        cached=False)
  np.testing.assert_array_equal(preds, np.asarray(ref)[:, -1:])
  assert acc == np.mean(preds[:, 0] == answers[:, 0])


# ----------------------------------------------------------------------------- perplexity


def _log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_perplexity_curve_matches_a_float64_recomputation(models, monkeypatch):
  pairs = {m: (v[0], v[1]) for m, v in models.items()}
  # Three windows in batches of two: the padded last batch must not trace again.
  traced = jax.jit(chex.assert_max_traces(lm_perplexity._losses, n=len(pairs)),
                   static_argnums=0)
  monkeypatch.setattr(lm_perplexity, 'batch_losses', traced)
  result = lm_perplexity.evaluate(pairs, num_windows=3, batch_size=2, smooth=4, seed=5)
  family = pairs['standard'][0]
  d = family.config.data
  windows = lm_eval.windows(lm_eval.split_tokens(d, 'test'), d.seq_len + 1, 3)
  assert result['num_windows'] == 3 and len(result['positions']) == d.seq_len
  for name, (fam, params) in pairs.items():
    tables = lm_eval.example_tables(fam, jax.random.PRNGKey(5), np.arange(3))
    logp = _log_softmax64(fam.apply(params, windows[:, :-1], tables))
    nll = -np.take_along_axis(logp, windows[:, 1:, None], -1)[..., 0]
    m = result['models'][name]
    np.testing.assert_allclose(m['perplexity'], np.exp(nll.mean(0)), rtol=1e-4)
    np.testing.assert_allclose(m['mean_loss'], nll.mean(), rtol=1e-5)
    trailing = [nll.mean(0)[max(0, t - 3):t + 1].mean() for t in range(d.seq_len)]
    np.testing.assert_allclose(m['perplexity_smoothed'], np.exp(trailing), rtol=1e-4)
  ratio = result['ratios']['lexinvariant/standard']
  np.testing.assert_allclose(ratio['raw'], result['models']['lexinvariant']['perplexity'] /
                             result['models']['standard']['perplexity'])
  s = result['summary']['lexinvariant/standard']
  assert s['positions_per_10pct'] == 4
  np.testing.assert_allclose(s['mean_first_10pct'], ratio['raw'][:4].mean())
  assert s['shrinks'] == (s['mean_last_10pct'] < s['mean_first_10pct'])
  # The lexinvariant curve depends on its random tables, the standard one does not.
  other = lm_perplexity.evaluate(pairs, num_windows=3, batch_size=2, smooth=4, seed=6)
  assert not np.allclose(other['models']['lexinvariant']['perplexity'],
                         result['models']['lexinvariant']['perplexity'])
  np.testing.assert_allclose(other['models']['standard']['perplexity'],
                             result['models']['standard']['perplexity'])

  np.testing.assert_allclose(result['references']['in-context bigram']['perplexity'],
                             np.exp(lm_perplexity.in_context_losses(windows, d.vocab_size, 2)
                                    .mean(0)))
  readout = result['references'][lm_perplexity.READOUT_REFERENCE]
  lexinvariant_family = pairs['lexinvariant'][0]
  assert readout['width'] == lexinvariant_family.config.model.width
  tables = lm_eval.example_tables(lexinvariant_family, jax.random.PRNGKey(6), np.arange(3))
  losses, a, b = lm_perplexity.readout_counter_losses(windows, tables)
  np.testing.assert_array_equal(a, readout['fitted_a'])
  np.testing.assert_array_equal(b, readout['fitted_b'])
  np.testing.assert_allclose(readout['perplexity'], np.exp(losses.mean(0)), rtol=1e-5)


def test_current_token_swap_matches_a_float64_recomputation(models, monkeypatch):
  traced = jax.jit(chex.assert_max_traces(lm_perplexity._last_log_probs, n=2), static_argnums=0)
  monkeypatch.setattr(lm_perplexity, 'last_log_probs', traced)
  family = models['standard'][0]
  d = family.config.data
  windows = lm_eval.windows(lm_eval.split_tokens(d, 'test'), d.seq_len + 1, 3)
  swapped = lm_perplexity.swapped_current_tokens(windows, seed=5)
  np.testing.assert_array_equal(swapped[:, :-1], windows[:, :-2])
  for row, new in zip(windows[:, :-1], swapped[:, -1]):
    assert new != row[-1] and new in row[:-1]
  np.testing.assert_array_equal(swapped, lm_perplexity.swapped_current_tokens(windows, seed=5))

  def kl64(fam, params, a, b, tables):
    p, q = (_log_softmax64(fam.apply(params, x, tables)[:, -1]) for x in (a, b))
    return (np.exp(p) * (p - q)).sum(-1).mean()

  for name, (fam, params, _, _) in models.items():  # batches of 2: the padded one reuses a trace
    got = lm_perplexity.current_token_swap(fam, params, windows, batch_size=2, seed=5)
    tables = lm_eval.example_tables(fam, jax.random.PRNGKey(5), np.arange(3))
    inputs = windows[:, :-1]
    np.testing.assert_allclose(got['swap'], kl64(fam, params, inputs, swapped, tables),
                               rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(got['other_window'],
                               kl64(fam, params, inputs, np.roll(inputs, 1, 0), tables),
                               rtol=1e-3, atol=1e-6)
    assert got['swap'] > 1e-4, (name, got)  # the untrained models do read the current token
  with pytest.raises(UserError, match='one symbol only'):
    lm_perplexity.swapped_current_tokens(np.full((1, 6), 7))


def test_pairwise_references_are_left_out_for_large_vocabularies():
  windows = np.random.default_rng(0).integers(0, 1000, (2, 9))
  big = lm_perplexity.reference_curves(windows, 2048, smooth=2)
  assert set(big) == {'in-context unigram'}
  np.testing.assert_allclose(big['in-context unigram']['mean_loss'],
                             lm_perplexity.in_context_losses(windows, 2048, 1).mean())
  assert set(lm_perplexity.reference_curves(windows, 1024, smooth=2)) == {
      'in-context unigram', 'in-context bigram'}


def _readout_counter_by_hand(window, table, a, b):
  """Losses of the random-table readout counter, one position at a time (float64); a, b [L]."""
  table = np.asarray(table, np.float64)
  d, out = table.shape[1], []
  for t in range(len(window) - 1):
    seen = list(window[:t + 1])
    h = sum((a[t] * seen.count(u) / (t + 1) + b[t]) * table[u] for u in set(seen)) / np.sqrt(d)
    logits = table @ h / np.sqrt(d)
    logits -= logits.max()
    out.append(np.log(np.exp(logits).sum()) - logits[window[t + 1]])
  return np.array(out)


def test_readout_counter_matches_a_hand_count_and_blurs_with_small_tables():
  rng = np.random.default_rng(0)
  windows = rng.integers(0, 6, (3, 30))
  gaussian = rng.standard_normal((3, 8, 4))  # d = 4 < V = 8: strong cross terms
  losses, a, b = lm_perplexity.readout_counter_losses(windows, gaussian)
  by_hand = lambda a, b: np.stack([_readout_counter_by_hand(list(w), e, a, b)
                                   for w, e in zip(windows, gaussian)])
  np.testing.assert_allclose(losses, by_hand(a, b), rtol=1e-4)
  # At every position the fitted pair is no worse than its neighbours on the grids.
  grid_a, grid_b = list(lm_perplexity.READOUT_GRID_A), list(lm_perplexity.READOUT_GRID_B)
  for step in (-1, 1):
    ia = np.clip([grid_a.index(x) + step for x in a], 0, len(grid_a) - 1)
    ib = np.clip([grid_b.index(x) + step for x in b], 0, len(grid_b) - 1)
    for other in (by_hand(np.take(grid_a, ia), b), by_hand(a, np.take(grid_b, ib))):
      assert (losses.mean(0) <= other.mean(0) + 1e-6).all()
  assert len(set(a.tolist())) > 1  # positions differ: early ones want a softer readout
  # Orthonormal rows (E E^T = d I) read the counts out exactly: lower loss than the blur.
  exact = np.tile(np.eye(8) * np.sqrt(8), (3, 1, 1))
  assert lm_perplexity.readout_counter_losses(windows, exact)[0].mean() < losses.mean() - 0.1


def _counter_by_hand(window, vocab, order, a1=1.0, a2=2.0):
  """The in-context counters, one position at a time with Python dicts (float64)."""
  out = []
  for t in range(len(window) - 1):
    seen, y = list(window[:t + 1]), window[t + 1]
    p = (seen.count(y) + a1 / vocab) / (t + 1 + a1)
    if order == 2:
      follows = [b for a, b in zip(seen[:-1], seen[1:]) if a == seen[-1]]
      p = (follows.count(y) + a2 * p) / (len(follows) + a2)
    out.append(-np.log(p))
  return np.array(out)


@pytest.mark.parametrize('order', [1, 2])
def test_in_context_counters_match_a_hand_count_and_are_lexinvariant(order):
  rng = np.random.default_rng(order)
  windows = rng.integers(0, 6, (4, 40))  # few symbols: many repeats
  losses = lm_perplexity.in_context_losses(windows, 8, order)
  expected = np.stack([_counter_by_hand(list(w), 8, order) for w in windows])
  np.testing.assert_allclose(losses, expected, rtol=1e-12)
  # First position by hand: one token seen, p(y) = (1[y == x0] + 1/8) / 2 (then backed off).
  p1 = ((windows[:, 1] == windows[:, 0]) + 1 / 8) / 2
  np.testing.assert_allclose(losses[:, 0], -np.log(p1), rtol=1e-12)
  # Renaming the symbols (a permutation of the vocabulary) changes nothing.
  perm = rng.permutation(8)
  np.testing.assert_allclose(lm_perplexity.in_context_losses(perm[windows], 8, order), losses)
  # Repeating the first half makes the repeat predictable for the bigram counter only.
  rep = np.concatenate([windows[:, :20], windows[:, :20]], 1)
  gain = lm_perplexity.in_context_losses(rep, 8, order)[:, 20:].mean()
  assert (gain < 1.5) == (order == 2), gain


# ----------------------------------------------------------------------------- loading, CLI


def test_load_trained_restores_the_workdir(workdirs, models):
  family, params, config, step = models['lexinvariant']
  assert family.mode == 'lexinvariant' and step == 0 and config.data.seq_len == 32
  assert all(isinstance(r, tuple) for r in config.axis_rules)
  with pytest.raises(UserError, match='does not exist'):
    lm_eval.load_trained(workdirs['lexinvariant'] + '_missing')
  args = lexinvariant.parse_args(['cipher', f'--lexinvariant={workdirs["standard"]}',
                                  '--out=unused'])
  with pytest.raises(UserError, match="holds a 'standard' model"):
    lexinvariant.load_models(args)


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'jaxgen.analysis.lexinvariant', *args], cwd=REPO,
                        env=cli_env(), capture_output=True, text=True, timeout=300)


def _strict(value):
  raise ValueError(f'non-standard JSON constant {value}')


def test_cli_writes_all_three_evaluations(workdirs, tmp_path):
  out = tmp_path / 'eval'
  proc = _cli('all', f'--lexinvariant={workdirs["lexinvariant"]}',
              f'--standard={workdirs["standard"]}', f'--out={out}', '--num_windows=4',
              '--smooth=4', '--probe_steps=4', '--num_sequences=4', '--window=16', '--stride=8',
              '--probe_layers=block0,final', '--num_examples=8', '--gen_batch=8')
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  for name in lexinvariant.EVALS:
    with open(out / f'{name}.json') as f:
      result = json.load(f, parse_constant=_strict)
    assert set(result['models_evaluated']) == {'lexinvariant', 'standard'}
    assert Image.open(out / f'{name}.png').size[0] >= 600
    assert f'{name}.json' in proc.stdout
  with open(out / 'perplexity.json') as f:
    ppl = json.load(f)
  assert {m: set(v['current_token_swap_kl']) for m, v in ppl['models'].items()} == {
      m: {'swap', 'other_window'} for m in ('lexinvariant', 'standard')}
  assert 'swapping the current token' in proc.stdout
  with open(out / 'cipher.json') as f:
    c = json.load(f)
  assert c['window_starts'] == [0, 8, 16]
  assert {k: len(v) for k, v in c['precision'].items()} == {
      'probe': 3, 'counting_stand_in': 3, 'frequency': 3, 'frequency_prefix': 3,
      'bigram_search': 3}
  assert c['probe']['layers'] == ['block0', 'final']
  assert set(c['rise']) == set(c['precision']) and c['rise']['frequency']['n'] == 4
  assert c['probe']['information'] == pytest.approx(c['unigram_loss'] - c['probe']['test_loss'])
  assert 'probe held-out loss' in proc.stdout
  with open(out / 'reasoning.json') as f:
    r = json.load(f)
  assert {t: e['oracle'] for t, e in r['tasks'].items()} == {'lookup': 1.0, 'permutation': 1.0}
  assert set(r['tasks']['lookup']['accuracy']) == {'lexinvariant', 'standard'}
  # The LookUp pair sweep (default 1, 2) includes the main task's 3 pairs, scored identically.
  sweep = r['lookup_by_pairs']
  assert set(sweep) == {'1', '2', '3'} and all(e['oracle'] == 1.0 for e in sweep.values())
  assert sweep['3']['accuracy'] == r['tasks']['lookup']['accuracy']


def test_cli_missing_workdir_is_one_line_exit_2(tmp_path):
  proc = _cli('perplexity', f'--lexinvariant={tmp_path / "nope"}', f'--out={tmp_path}')
  assert proc.returncode == 2
  assert proc.stderr.startswith('jaxgen: error: workdir') and proc.stderr.count('\n') == 1


def test_plots_draw_every_series_in_its_own_colour():
  x = np.arange(50.0)
  y = np.exp(-x / 10) + 1
  y[20:25] = np.nan
  img = plots.line_plot({'a': (x, y), 'b': (x, 2 * y)}, title='t', xlabel='x', ylabel='y',
                        logy=True, hlines={'one': 1.0})
  assert img.size == (640, 400)
  pixels = {tuple(p) for p in np.asarray(img).reshape(-1, 3)}
  assert plots.PALETTE[0] in pixels and plots.PALETTE[1] in pixels
  bars = plots.bar_chart({'g1': {'a': 0.5, 'b': 1.0}, 'g2': {'a': float('nan'), 'b': 0.2}},
                         title='t', ylabel='acc')
  pixels = {tuple(p) for p in np.asarray(bars).reshape(-1, 3)}
  assert plots.PALETTE[0] in pixels and plots.PALETTE[1] in pixels
  assert plots.nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
  assert plots.log_ticks(1.0, 100.0) == [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
  assert plots.log_ticks(1.0, 1e4) == [1.0, 10.0, 100.0, 1000.0, 10000.0]


def test_tick_labels_stay_distinct():
  from jaxgen.analysis import plots
  assert plots.tick_labels([0.0, 0.5, 1.0]) == ['0', '0.5', '1']
  assert plots.tick_labels([15.3, 15.35, 15.4]) == ['15.30', '15.35', '15.40']
  ticks = plots.nice_ticks(15.277, 15.566)  # the k-sweep PSNR axis that read 15.4 twice
  labels = plots.tick_labels(ticks)
  assert len(ticks) == 6 and len(set(labels)) == len(labels)
  assert all(abs(float(t) - v) < 1e-9 for t, v in zip(labels, ticks))


# ----------------------------------------------------------------------------- copying


def test_copying_batches_repeat_with_their_period_and_the_loop_runs(text_data_dir, tmp_path):
  copying = load_script('lm_copying')
  stream = np.arange(1000) % 97  # no period shorter than 97: a copy can only be P back
  tokens, periods = copying.tiled_batch(np.random.default_rng(0), stream, 16, 64, 3, 20)
  assert tokens.shape == (16, 65) and len(set(periods.tolist())) > 3
  for row, p in zip(tokens, periods):
    np.testing.assert_array_equal(row[p:], row[:-p])  # each row repeats with its period
    assert len(set(row[:p].tolist())) == p  # ...and not sooner
  # The plain rows of --natural_fraction: lm_eval.random_windows, as the cipher probe's.
  plain = lm_eval.random_windows(np.random.default_rng(1), stream, 65, 4)
  assert plain.shape == (4, 65) and plain.dtype == np.int32
  assert np.all(np.diff(plain, axis=1) % 97 == 1)  # contiguous text
  for bad in (['--min_period=9', '--max_period=8'], ['--set=model.no_such=1'],
              ['--natural_fraction=1']):
    with pytest.raises(SystemExit):  # argparse's one-line error
      copying.parse_args(bad)
  out = tmp_path / 'copying.json'
  copying.main(['--variant=tiny', '--steps=2', '--log_every=1', f'--data_dir={text_data_dir}',
                '--min_period=4', '--max_period=8', '--shared_table_steps=1',
                '--shared_table_decay_steps=2', '--random_tokens',
                '--set=model.width=16', '--natural_fraction=0.25', '--lookup_examples=4',
                f'--out={out}'])
  with open(out) as f:
    result = json.load(f)
  assert [r['step'] for r in result['curve']] == [1, 2]
  assert result['shared_table_steps'] == 1 and result['random_tokens']
  assert result['shared_table_decay_steps'] == 2
  assert 'repeats_fresh' not in result['curve'][0]  # step 1: every row has the shared table
  assert result['overrides'] == ['model.width=16'] and result['model']['width'] == 16
  # Two steps from init: both losses are near uniform over 128 characters.
  for r in result['curve']:
    for k in ('first_period', 'repeats', 'natural'):  # natural: the 2 plain rows of 8
      assert abs(r[k] - np.log(128)) < 1.5, r
  # 4 examples: each accuracy is a multiple of 1/4, at 1, 2 and 3 (the paper's) pairs.
  assert set(result['lookup_accuracy']) == {'1', '2', '3'}
  assert all(a * 4 == int(a * 4) and 0 <= a <= 1 for a in result['lookup_accuracy'].values())
