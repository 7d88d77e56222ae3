"""A classical reference for the cipher evaluation: bigram language model + hill-climbing search.

It deciphers from the text alone, as cryptanalysts do: a character bigram model of the train
split scores a candidate key by the log-likelihood of the text it deciphers to, and the search
starts from the frequency decipherer's key (cipher symbols ranked by count -> letters ranked by
train frequency) and applies the best swap of two letters while one raises the score. It reads
the text up to each window's end, like the LM there, and is scored on the window's symbols.

Only bigrams touching a cipher symbol depend on the key, so with slots s = 0..25 for the cipher
symbols and a key pi (slot -> letter), the score is
    sum_{s,s'} A[s, s'] LL[pi_s, pi_s'] + sum_s U[s, pi_s]  (+ a constant),
A the slot-slot bigram counts, LL the letter-letter log-probabilities and U[s, l] the
log-probabilities of slot s's plain neighbours were it letter l: every candidate is scored on
26 x 26 arrays, all swaps of all sequences at once.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np

NUM_LETTERS = 26
VOCAB = 128
SWAPS = np.array(list(itertools.combinations(range(NUM_LETTERS), 2)), np.int32)  # [325, 2]


def bigram_log_probs(tokens, smoothing=0.5):
  """log P(b | a) [128, 128] of a character stream, add-`smoothing` estimates."""
  tokens = np.asarray(tokens)
  counts = np.full((VOCAB, VOCAB), smoothing)
  np.add.at(counts, (tokens[:-1], tokens[1:]), 1)
  return np.log(counts / counts.sum(1, keepdims=True))


def key_statistics(slots, text, end, log_probs, letters):
  """(A [26, 26], U [26, 26], slot counts [26], first occurrence [26]) of one text's first
  `end` characters; text [L] holds the characters (cipher symbols among them) and slots [L]
  each one's cipher slot (-1 for plain characters). Jittable."""
  length = slots.shape[0]
  slots = jnp.where(slots >= 0, slots, NUM_LETTERS)  # plain: an index the scatters drop
  t = jnp.arange(length - 1)
  pair = (t + 1 < end).astype(jnp.float32)  # bigram (t, t + 1) lies in the text
  a, b = slots[:-1], slots[1:]
  a_slot, b_slot = a < NUM_LETTERS, b < NUM_LETTERS
  both = pair * a_slot * b_slot
  counts_ab = jnp.zeros((NUM_LETTERS, NUM_LETTERS)).at[a, b].add(both, mode='drop')
  # slot followed by a plain character c: log P(c | l); plain c then slot: log P(l | c)
  after = (pair * a_slot * ~b_slot)[:, None] * log_probs[letters][:, text[1:]].T
  before = (pair * ~a_slot * b_slot)[:, None] * log_probs[text[:-1]][:, letters]
  u = (jnp.zeros((NUM_LETTERS, NUM_LETTERS)).at[a].add(after, mode='drop')
       .at[b].add(before, mode='drop'))
  seen = (slots < NUM_LETTERS) & (jnp.arange(length) < end)
  count = jnp.zeros(NUM_LETTERS).at[slots].add(seen.astype(jnp.float32), mode='drop')
  first = jnp.full(NUM_LETTERS, length).at[slots].min(
      jnp.where(seen, jnp.arange(length), length), mode='drop')
  return counts_ab, u, count, first


def frequency_key(count, first, order):
  """Slots ranked by count (ties: first occurrence) take the letters in `order` (letter
  indices, most frequent first): the frequency decipherer's key [26]."""
  ranked = jnp.lexsort((first, -count))
  return jnp.zeros(NUM_LETTERS, jnp.int32).at[ranked].set(order)


def swap_gains(key, counts_ab, u, letter_log_probs):
  """The score (module docstring) of key [26] with slots i and j's letters swapped, minus that
  of key, for every pair (SWAPS) [325], in O(26) each: a swap changes rows and columns i and j of LL[key][:, key] only."""
  i, j = SWAPS[:, 0], SWAPS[:, 1]
  ki, kj = key[i], key[j]
  ll = letter_log_probs
  rows = counts_ab @ ll[:, key].T  # [s, l]: row s's terms were slot s letter l
  cols = counts_ab.T @ ll[key, :]  # [s, l]: column s's terms were slot s letter l
  gain = (u[i, kj] + u[j, ki] - u[i, ki] - u[j, kj]
          + rows[i, kj] + rows[j, ki] - rows[i, ki] - rows[j, kj]
          + cols[i, kj] + cols[j, ki] - cols[i, ki] - cols[j, kj])
  # The four entries (s, s') with s, s' in {i, j} were changed on one side at a time above.
  old, new = jnp.stack([ki, kj], -1), jnp.stack([kj, ki], -1)  # [325, 2] letters of (i, j)
  pair = jnp.stack([i, j], -1)
  for x in range(2):
    for y in range(2):
      a = counts_ab[pair[:, x], pair[:, y]]
      gain += a * (ll[new[:, x], new[:, y]] - ll[new[:, x], old[:, y]]
                   - ll[old[:, x], new[:, y]] + ll[old[:, x], old[:, y]])
  return gain


def hill_climb(key, counts_ab, u, letter_log_probs, max_swaps):
  """Applies the best swap of two slots' letters while one raises the score (at most
  `max_swaps` times)."""

  def improve(state):
    key, _, n = state
    gain = swap_gains(key, counts_ab, u, letter_log_probs)
    best = jnp.argmax(gain)
    i, j = jnp.asarray(SWAPS)[best]
    swapped = key.at[i].set(key[j]).at[j].set(key[i])
    better = gain[best] > 1e-4
    return jnp.where(better, swapped, key), better, n + 1

  key, _, _ = jax.lax.while_loop(lambda s: s[1] & (s[2] < max_swaps), improve,
                                 (key, jnp.array(True), 0))
  return key


def decipher(slots, texts, ends, log_probs, order, *, max_swaps=60, batch_size=64):
  """The searched key [N, E, 26] (slot -> letter index) for each ciphertext texts [N, L]
  (slots [N, L] as in key_statistics) read up to each of `ends` [E]; `order`: the 26 letters'
  code points, most frequent in train first."""
  letters = jnp.arange(ord('a'), ord('a') + NUM_LETTERS)
  log_probs = jnp.asarray(log_probs, jnp.float32)
  letter_ll = log_probs[letters][:, letters]
  order = jnp.asarray(np.asarray(order) - ord('a'), jnp.int32)

  @jax.jit
  def batch(slots, texts, end):
    def one(slots, text):
      counts_ab, u, count, first = key_statistics(slots, text, end, log_probs, letters)
      start = frequency_key(count, first, order)
      return hill_climb(start, counts_ab, u, letter_ll, max_swaps)
    return jax.vmap(one)(slots, texts)

  out = np.zeros((len(slots), len(ends), NUM_LETTERS), np.int32)
  for lo in range(0, len(slots), batch_size):
    idx = np.arange(lo, min(lo + batch_size, len(slots)))
    idx = np.pad(idx, (0, batch_size - len(idx)), mode='edge')  # one shape: one compile
    for e, end in enumerate(ends):
      keys = np.asarray(batch(jnp.asarray(slots[idx]), jnp.asarray(texts[idx]), end))
      out[idx, e] = keys
  return out
