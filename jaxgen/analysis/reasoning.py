"""Synthetic in-context reasoning (the paper's LookUp and Permutation), scored by greedy decoding.

Tasks are built in token space. Separators are the tokenizer's encodings of '->' (ARROW) and
' ' (SPACE). A symbol is one token drawn uniformly from the vocabulary EXCLUDING the tokens of
'-', '>', ' ', '\\n' and '->', so a symbol can never be read as (part of) a separator:
  LookUp       `num_pairs` pairs k->v with distinct keys, joined by ' ', then ' ' and one of
               the keys followed by '->'; the answer is its value:  "A->2 C->4 G->5 C->" -> "4".
  Permutation  `num_demos` demonstrations of one rule, then a query: each is `in_len`
               distinct symbols joined by ' ', '->', and the rule's output joined by ' '; the
               rule picks `out_len` of the `in_len` positions in a random order, drawn per
               example:  "A 2 C->C A 4 1 D->" -> "D 4" (rule: input[2], input[0]).
The answer is the output tokens with their ' ' tokens; a prediction is right when the greedily
generated tokens match it exactly. A lexinvariant model gets a fresh random table per example.
"""
import dataclasses

import jax
import numpy as np

from jaxgen import sampling
from jaxgen.analysis import lm_eval, plots

TASKS = ('lookup', 'permutation')
NAMES = {'lookup': 'LookUp', 'permutation': 'Permutation'}


@dataclasses.dataclass(frozen=True)
class Vocab:
  """A task's separator tokens and the symbol tokens it draws from."""
  arrow: tuple
  space: tuple
  symbols: np.ndarray
  size: int


def task_vocab(tokenizer, vocab_size):
  enc = lambda s: tuple(int(t) for t in tokenizer.encode(s))
  excluded = {t for s in ('-', '>', ' ', '\n', '->') for t in enc(s)}
  symbols = np.array([t for t in range(vocab_size) if t not in excluded], np.int32)
  return Vocab(enc('->'), enc(' '), symbols, vocab_size)


def _join(groups, sep):
  out = list(groups[0])
  for g in groups[1:]:
    out += list(sep) + list(g)
  return out


def lookup_example(rng, vocab, num_pairs=3):
  """(prompt tokens, answer tokens) of one LookUp example."""
  keys = rng.choice(vocab.symbols, num_pairs, replace=False)
  values = rng.choice(vocab.symbols, num_pairs)
  q = rng.integers(num_pairs)
  pairs = [[k, *vocab.arrow, v] for k, v in zip(keys, values)]
  return _join(pairs + [[keys[q], *vocab.arrow]], vocab.space), [int(values[q])]


def permutation_example(rng, vocab, in_len=3, out_len=2, num_demos=1):
  """(prompt tokens, answer tokens) of one Permutation example."""
  rule = rng.choice(in_len, out_len, replace=False)
  parts = []
  for _ in range(num_demos):
    x = rng.choice(vocab.symbols, in_len, replace=False)
    parts.append(_join([[t] for t in x], vocab.space) + list(vocab.arrow) +
                 _join([[t] for t in x[rule]], vocab.space))
  q = rng.choice(vocab.symbols, in_len, replace=False)
  prompt = _join(parts + [_join([[t] for t in q], vocab.space) + list(vocab.arrow)], vocab.space)
  return prompt, _join([[int(t)] for t in q[rule]], vocab.space)


def make_task(task, num_examples, vocab, seed=0, **kwargs):
  """(prompts [N, P], answers [N, A]) int32: every example of a task has the same length."""
  make = {'lookup': lookup_example, 'permutation': permutation_example}[task]
  rng = np.random.default_rng(seed)
  prompts, answers = zip(*[make(rng, vocab, **kwargs) for _ in range(num_examples)])
  return np.array(prompts, np.int32), np.array(answers, np.int32)


# ----------------------------------------------------------------------------- the oracle


def _split(tokens, sep):
  """Splits a token list at every occurrence of the token sequence `sep`."""
  parts, cur, i, n = [], [], 0, len(sep)
  while i < len(tokens):
    if tuple(tokens[i:i + n]) == sep:
      parts.append(cur)
      cur, i = [], i + n
    else:
      cur.append(tokens[i])
      i += 1
  return parts + [cur]


def oracle(task, prompt, vocab):
  """The answer tokens, by parsing the prompt's tokens as the task's format."""
  prompt = [int(t) for t in prompt]
  if task == 'lookup':  # "k->v k->v ... q->"
    *pairs, query = [_split(chunk, vocab.arrow) for chunk in _split(prompt, vocab.space)]
    table = {k[0]: v[0] for k, v in pairs}
    return [table[query[0][0]]]
  # "x x x->y y x x x->y y ... x x x->": segments between arrows, symbols between spaces.
  segs = [[s[0] for s in _split(seg, vocab.space)] for seg in _split(prompt, vocab.arrow)[:-1]]
  demo_in, in_len = segs[0], len(segs[0])
  demo_out = segs[1][:len(segs[1]) - in_len]
  rule = [demo_in.index(t) for t in demo_out]
  query = segs[-1][-in_len:]
  return _join([[query[i]] for i in rule], vocab.space)


# ----------------------------------------------------------------------------- scoring


def score(generate_fn, prompts, answers, batch_size=100):
  """(accuracy, predictions [N, A]) with generate_fn(prompts [B, P], ids [B]) -> [B, P + A]
  (the example ids pick per-example random tables); exact match of all answer tokens."""
  p, a = prompts.shape[1], answers.shape[1]
  preds = []
  for idx, real in lm_eval.padded_batches(len(prompts), min(batch_size, len(prompts))):
    out = np.asarray(generate_fn(prompts[idx], idx))
    preds.append(out[:real, p:p + a])
  preds = np.concatenate(preds)
  return float(np.mean(np.all(preds == answers, axis=1))), preds


def model_generator(family, params, num_new, seed=0):
  """generate_fn for `score`: greedy KV-cache decoding, one compiled sampler per shape."""
  key = jax.random.PRNGKey(seed)

  @jax.jit
  def generate(params, prompts, ids):
    tables = lm_eval.example_tables(family, key, ids)
    return family.generate(params, prompts, num_new, key, tables, temperature=0.0)

  return lambda prompts, ids: generate(params, prompts, ids)


def logits_generator(logits_fn, num_new):
  """generate_fn for `score` from logits_fn(tokens [B, T]) -> [B, T, V] (uncached, greedy)."""
  return lambda prompts, ids: sampling.generate_uncached(
      logits_fn, prompts, num_new, jax.random.PRNGKey(0), temperature=0.0)


def random_generator(vocab_size, num_new, seed=0):
  """generate_fn guessing every answer token uniformly over the vocabulary (chance level)."""
  rng = np.random.default_rng(seed)
  return lambda prompts, ids: np.concatenate(
      [prompts, rng.integers(0, vocab_size, (len(prompts), num_new))], axis=1)


def oracle_generator(task, vocab):
  return lambda prompts, ids: np.array([list(p) + oracle(task, p, vocab) for p in prompts])


# ----------------------------------------------------------------------------- evaluation


def _task_entry(task, models, vocab, tok, seq_len, *, num_examples, batch_size, num_shown,
                seed, settings):
  """Oracle, chance and each model's accuracy (with a few decoded examples) on one task."""
  v = vocab.size
  prompts, answers = make_task(task, num_examples, vocab, seed=seed, **settings)
  a = answers.shape[1]
  entry = {'settings': settings, 'prompt_len': prompts.shape[1], 'answer_len': a,
           'beyond_training_length': prompts.shape[1] + a > seq_len + 1,
           'oracle': score(oracle_generator(task, vocab), prompts, answers)[0],
           'random_guess': score(random_generator(v, a, seed), prompts, answers)[0],
           'accuracy': {}, 'examples': {}}
  for name, (fam, params) in models.items():
    acc, preds = score(model_generator(fam, params, a, seed), prompts, answers, batch_size)
    entry['accuracy'][name] = acc
    entry['examples'][name] = [
        {'prompt': tok.decode(prompts[i]), 'answer': tok.decode(answers[i]),
         'prediction': tok.decode(preds[i]), 'correct': bool((preds[i] == answers[i]).all()),
         'prompt_tokens': prompts[i], 'answer_tokens': answers[i], 'prediction_tokens': preds[i]}
        for i in range(min(num_shown, num_examples))]
  return entry


def evaluate(models, *, num_examples=1000, num_pairs=3, in_len=3, out_len=2, num_demos=1,
             lookup_pairs=(1, 2), batch_size=100, num_shown=3, seed=0):
  """Accuracy of each model {name: (family, params)} on each task; the result dict.

  Besides the paper's two tasks, LookUp is also scored at each of `lookup_pairs` (fewer
  pairs: a shorter, easier prompt), so a small model's accuracy shows where it gives out.
  """
  family = next(iter(models.values()))[0]
  tok, v, seq_len = family.tokenizer(), family.config.data.vocab_size, family.config.data.seq_len
  vocab = task_vocab(tok, v)
  settings = {'lookup': dict(num_pairs=num_pairs),
              'permutation': dict(in_len=in_len, out_len=out_len, num_demos=num_demos)}
  common = dict(num_examples=num_examples, batch_size=batch_size, num_shown=num_shown)
  result = {'num_examples': num_examples, 'seed': seed, 'num_symbols': len(vocab.symbols),
            'excluded_tokens': sorted(set(range(v)) - set(vocab.symbols.tolist())),
            'tasks': {}, 'lookup_by_pairs': {}}
  for t, task in enumerate(TASKS):
    result['tasks'][task] = _task_entry(task, models, vocab, tok, seq_len, seed=seed + t,
                                        settings=settings[task], **common)
  for n in sorted(set(lookup_pairs) | {num_pairs}):
    entry = (result['tasks']['lookup'] if n == num_pairs else
             _task_entry('lookup', models, vocab, tok, seq_len, seed=seed,
                         **dict(common, num_shown=0), settings=dict(num_pairs=n)))
    result['lookup_by_pairs'][str(n)] = dict(accuracy=entry['accuracy'], oracle=entry['oracle'],
                                             random_guess=entry['random_guess'])
  return result


def _pairs_label(n):
  return f"LookUp {n} pair{'s' if int(n) > 1 else ''}"


def _other_pair_counts(result):
  """The LookUp sweep's entries {n: entry} without the main task's (shown as 'LookUp')."""
  main = result['tasks']['lookup']['settings']['num_pairs']
  return {n: e for n, e in result['lookup_by_pairs'].items() if int(n) != main}


def figure(result):
  groups = {NAMES[t]: dict(e['accuracy'], oracle=e['oracle'], chance=e['random_guess'])
            for t, e in result['tasks'].items()}
  groups.update({_pairs_label(n): dict(e['accuracy'], chance=e['random_guess'])
                 for n, e in _other_pair_counts(result).items()})
  return plots.bar_chart(groups, title=f"In-context reasoning accuracy ({result['num_examples']}"
                         ' examples per task, greedy decoding)', ylabel='accuracy', ymax=1.1,
                         colours=plots.COLOURS, size=(max(640, 160 * len(groups) + 160), 400))


def summary_lines(result):
  lines = [f"reasoning: accuracy over {result['num_examples']} examples"]
  for t, e in result['tasks'].items():
    accs = ', '.join(f'{n} {a:.3f}' for n, a in e['accuracy'].items())
    lines.append(f"  {NAMES[t]:<12} {accs} (oracle {e['oracle']:.3f}, chance "
                 f"{e['random_guess']:.3f})")
  for n, e in _other_pair_counts(result).items():
    accs = ', '.join(f'{m} {a:.3f}' for m, a in e['accuracy'].items())
    lines.append(f"  {_pairs_label(n):<15} {accs} (chance {e['random_guess']:.3f})")
  return lines


def run(models, **kwargs):
  result = evaluate(models, **kwargs)
  return result, figure(result)
