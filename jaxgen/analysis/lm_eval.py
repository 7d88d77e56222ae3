"""Shared by the lexinvariant LM evaluations: restoring a trained workdir, held-out windows,
per-example random tables, and writing a result as JSON + PNG."""
import json
import math
import os

import jax
import numpy as np

from jaxgen.errors import UserError

TRAIN_HINT = 'python -m jaxgen.main --config=configs/lexinvariant.py:demo,lexinvariant --workdir='


def load_trained(workdir, data_dir=None):
  """(family, params, config, step) of a trained language-model workdir (see
  trainer.load_trained)."""
  from jaxgen import trainer
  return trainer.load_trained(workdir, 'lm', TRAIN_HINT + 'DIR', data_dir)


def check_same_data(configs):
  """The evaluations compare models on the same windows: one dataset, tokenizer, length."""
  keys = ('name', 'tokenizer', 'vocab_size', 'seq_len')
  seen = {name: tuple(c.data[k] for k in keys) for name, c in configs.items()}
  if len(set(seen.values())) > 1:
    raise UserError('the models were trained on different data settings '
                    f'({", ".join(keys)}): {seen}; compare models trained on the same data')


def split_tokens(data_config, split):
  """The split's token stream (cached on disk by jaxgen.data.text)."""
  from jaxgen.data import text, tokenizers
  return text.token_stream(data_config, split, tokenizers.make_tokenizer(data_config))


def windows(tokens, length, num):
  """`num` non-overlapping windows of `length` tokens, evenly spread over the stream [N, length]
  (fewer when the stream has fewer)."""
  total = len(tokens) // length
  if total == 0:
    raise UserError(f'the token stream ({len(tokens)} tokens) is shorter than one window of '
                    f'{length}')
  idx = np.unique(np.linspace(0, total - 1, min(num, total)).round().astype(int))
  return np.stack([tokens[i * length:(i + 1) * length] for i in idx]).astype(np.int32)


def random_windows(rng, tokens, length, num):
  """`num` windows of `length` tokens at offsets drawn by the NumPy Generator `rng` [num,
  length] (int32): the training-style counterpart of `windows`."""
  starts = rng.integers(0, len(tokens) - length + 1, num)
  return np.stack([tokens[s:s + length] for s in starts]).astype(np.int32)


def example_tables(family, key, ids):
  """Random tables [B, V, d] for examples `ids` [B] (None for learned embeddings); jittable.

  Example i's table comes from fold_in(key, i), so it does not depend on the batching."""
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
  return family.tables_from_keys(keys)


def padded_batches(n, batch_size):
  """Index arrays [batch_size] covering range(n), the last one padded with index 0, and how
  many of each are real: fixed shapes, so a jitted step compiles once."""
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    yield np.pad(idx, (0, batch_size - len(idx))), len(idx)


def jsonable(x):
  """NumPy/JAX values -> JSON types; NaN and infinities -> None (strict JSON)."""
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if hasattr(x, 'tolist') and not isinstance(x, (str, bytes)):
    return jsonable(x.tolist())
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def save_result(out_dir, name, result, image):
  """Writes out_dir/<name>.json and out_dir/<name>.png; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  json_path, png_path = (os.path.join(out_dir, f'{name}.{ext}') for ext in ('json', 'png'))
  with open(json_path, 'w') as f:
    json.dump(jsonable(result), f, indent=1)
  image.save(png_path)
  return json_path, png_path
