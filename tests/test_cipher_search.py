"""The bigram + search decipherer, the cipher evaluation's classical reference."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.analysis import cipher, cipher_search, lm_eval

LETTERS = np.arange(ord('a'), ord('z') + 1)


def _score_by_hand(key, counts_ab, u, ll):
  return (sum(counts_ab[s, t] * ll[key[s], key[t]] for s in range(26) for t in range(26))
          + sum(u[s, key[s]] for s in range(26)))


def test_swap_gains_match_rescoring_every_swap():
  rng = np.random.default_rng(0)
  counts_ab = rng.poisson(0.5, (26, 26)).astype(np.float64)
  u, ll = rng.normal(size=(26, 26)), np.log(rng.dirichlet(np.ones(26), 26))
  key = rng.permutation(26)
  gains = np.asarray(cipher_search.swap_gains(jnp.asarray(key), jnp.asarray(counts_ab),
                                              jnp.asarray(u), jnp.asarray(ll)))
  base = _score_by_hand(key, counts_ab, u, ll)
  for n, (i, j) in enumerate(cipher_search.SWAPS):
    swapped = key.copy()
    swapped[[i, j]] = key[[j, i]]
    assert gains[n] == pytest.approx(_score_by_hand(swapped, counts_ab, u, ll) - base,
                                     rel=1e-4, abs=1e-3)


def test_key_statistics_score_a_key_by_the_text_it_deciphers_to():
  """The score A . LL[key][:, key] + U[s, key_s] differs from the deciphered prefix's bigram
  log-likelihood by the same constant (the plain-plain bigrams) for every key; counts and first
  occurrences by hand."""
  rng = np.random.default_rng(1)
  text = np.array([ord(c) for c in 'the cat, the hat. a zebra quietly jumps! xyz'])
  key = rng.choice(np.arange(1, 32), 26, replace=False)
  enciphered = cipher.encipher(text, key)
  slots = cipher._symbol_index(enciphered, key)
  log_probs = np.log(rng.dirichlet(np.ones(128), 128))
  end = 30
  counts_ab, u, count, first = cipher_search.key_statistics(
      jnp.asarray(slots), jnp.asarray(enciphered), end, jnp.asarray(log_probs, jnp.float32),
      jnp.asarray(LETTERS))
  seen = slots[:end]
  np.testing.assert_array_equal(count, np.bincount(seen[seen >= 0], minlength=26))
  for s in range(26):
    where = np.flatnonzero(seen == s)
    assert first[s] == (where[0] if len(where) else len(text))
  offsets = []
  for _ in range(3):
    guess = rng.permutation(26)
    decoded = np.where(slots >= 0, LETTERS[guess[np.maximum(slots, 0)]], enciphered)[:end]
    log_lik = sum(log_probs[a, b] for a, b in zip(decoded[:-1], decoded[1:]))
    letter_ll = log_probs[LETTERS][:, LETTERS]
    offsets.append(_score_by_hand(guess, np.asarray(counts_ab), np.asarray(u), letter_ll)
                   - log_lik)
  np.testing.assert_allclose(offsets, offsets[0], atol=1e-3)


def test_search_starts_at_the_frequency_key_and_reads_long_texts(tiny_lm_config):
  """Without swaps it is the frequency decipherer over the text so far; with them it recovers
  most of the key from 2000 characters of held-out text, far more than frequencies do."""
  data = tiny_lm_config().data
  train, test = lm_eval.split_tokens(data, 'train'), lm_eval.split_tokens(data, 'test')
  order = cipher.letter_order(train)
  rng = np.random.default_rng(2)
  plain = lm_eval.windows(test, 2000, 2)
  keys = np.stack([cipher.make_key(rng, cipher.unused_symbols(train, test)) for _ in plain])
  enciphered = np.stack([cipher.encipher(p, k) for p, k in zip(plain, keys)])
  slots = np.stack([cipher._symbol_index(c, k) for c, k in zip(enciphered, keys)])
  log_probs = cipher_search.bigram_log_probs(train)
  ends, window = [1000, 2000], 1000
  starts = [e - window for e in ends]
  for max_swaps in (0, 60):
    guesses = cipher_search.decipher(slots, enciphered, ends, log_probs, order,
                                     max_swaps=max_swaps, batch_size=2)
    for c, k, g in zip(enciphered, keys, guesses):
      searched = cipher.searched_precision(c, k, g, starts, window)
      frequency = cipher.window_precisions(c, {}, k, order, starts, window)['frequency_prefix']
      if max_swaps == 0:
        np.testing.assert_array_equal(searched, frequency)
      else:
        assert searched[-1] >= 0.9 and searched[-1] > frequency[-1] + 0.3, (searched, frequency)
