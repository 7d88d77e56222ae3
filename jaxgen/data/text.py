"""Text input for language models: a split's documents as one token stream, cut into windows.

'shakespeare' is the local builder in shakespeare.py; any other name is a TFDS text dataset
whose text is in feature `text_key`. A split's documents are joined with '\\n' (load_text), and
token_stream is that text tokenized (one document at a time, with the tokens of '\\n' between).

grain and TFDS are imported on first use, so configs can import text_data_config without them.
"""
import os

import ml_collections
import numpy as np

from jaxgen.data.config import default_data_config
from jaxgen.data import builders
from jaxgen.data.files import file_lock
from jaxgen.errors import UserError


def text_data_config(seq_len=256, tokenizer='char', vocab_size=128) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.name = 'shakespeare'
  cfg.data_dir = default_data_config().data_dir
  cfg.text_key = 'text'
  cfg.seq_len = seq_len
  cfg.tokenizer = tokenizer  # 'char' or 'spm'.
  cfg.vocab_size = vocab_size
  cfg.spm_model = ''  # '': <data_dir>/tokenizers/<name>_spm<vocab_size>.model.
  cfg.train_split = 'train'
  cfg.test_split = 'test'
  cfg.num_threads = 2
  cfg.prefetch = 4
  # A copying curriculum (not in any paper): this share of training windows is replaced by
  # the window's first P tokens tiled, P uniform in tiled_period (see TileSome).
  cfg.tiled_fraction = 0.0
  cfg.tiled_period = (16, 96)
  return cfg


data_dir = builders.data_dir


def cache_name(cfg) -> str:
  """The dataset's name as a file name ('lm1b/subwords32k:1.0.0' -> 'lm1b_subwords32k_1.0.0')."""
  return builders.file_name(cfg.name)


def _shakespeare(data_dir):
  from jaxgen.data import shakespeare
  return shakespeare.JaxgenShakespeare(data_dir=data_dir)


def prepare(cfg):
  """Builds the dataset once (concurrent callers wait for one build); returns its builder."""
  return builders.prepare(cfg, {'shakespeare': _shakespeare}, file_format='array_record')


def documents(cfg, split: str) -> list[str]:
  """The split's documents (feature `text_key`) in stored order."""
  source = prepare(cfg).as_data_source(split=split)
  docs = [e[cfg.text_key] for e in source.__getitems__(range(len(source)))]
  return [d.decode('utf-8') if isinstance(d, bytes) else str(d) for d in docs]


def load_text(data_config, split: str) -> str:
  """The split's raw text: its documents joined with '\\n'."""
  return '\n'.join(documents(data_config, split))


def token_stream(data_config, split: str, tokenizer) -> np.ndarray:
  """int32 [N]: load_text(split) tokenized, cached in <data_dir>/token_cache as .npy.

  The cache is keyed by dataset (and version), split and tokenizer fingerprint; it is written
  once, atomically, under a file lock.
  """
  builder = prepare(data_config)
  key = f'{cache_name(data_config)}-{builder.info.version}-{data_config.text_key}-{split}'
  cache_dir = os.path.join(data_dir(data_config), 'token_cache')
  path = os.path.join(cache_dir, f'{builders.file_name(key)}-{tokenizer.fingerprint}.npy')
  if not os.path.isfile(path):
    os.makedirs(cache_dir, exist_ok=True)
    with file_lock(path + '.lock'):
      if not os.path.isfile(path):
        sep = tokenizer.encode('\n')
        parts = []
        for i, doc in enumerate(documents(data_config, split)):
          parts += [sep, tokenizer.encode(doc)] if i else [tokenizer.encode(doc)]
        tokens = np.concatenate(parts or [np.zeros(0, np.int32)]).astype(np.int32)
        tmp = f'{path}.tmp{os.getpid()}'
        with open(tmp, 'wb') as f:
          np.save(f, tokens)
        os.replace(tmp, path)
  return np.load(path)


class _Windows:
  """Random access to the non-overlapping windows of seq_len + 1 tokens (stride seq_len)."""

  def __init__(self, tokens, seq_len):
    self.tokens, self.seq_len = tokens, seq_len

  def __len__(self):
    return (len(self.tokens) - 1) // self.seq_len

  def __getitem__(self, i):
    if not -len(self) <= i < len(self):
      raise IndexError(i)
    start = (i % len(self)) * self.seq_len
    w = self.tokens[start:start + self.seq_len + 1]
    return {'inputs': w[:-1], 'targets': w[1:]}


class TileSome:
  """grain random_map: with probability `fraction` a window becomes its first P tokens tiled to
  its length, P uniform in [lo, hi], so every token from P on is a copy of the one P back; the
  others pass unchanged. Rich in exact repeats, such windows teach the in-context copying
  circuit (an induction head) that a small model does not find on plain text."""

  def __init__(self, fraction, period):
    self.fraction, (self.lo, self.hi) = fraction, period

  def __call__(self, element, rng):
    if rng.random() >= self.fraction:
      return element
    window = np.concatenate([element['inputs'], element['targets'][-1:]])
    window = np.resize(window[:rng.integers(self.lo, self.hi + 1)], len(window))
    return {'inputs': window[:-1], 'targets': window[1:]}


def check_tiling(data_config):
  """The copying curriculum's settings, or a UserError naming the field to fix."""
  fraction, (lo, hi) = data_config.get('tiled_fraction', 0.0), data_config.get('tiled_period',
                                                                              (16, 96))
  if not 0 <= fraction <= 1:
    raise UserError(f'--config.data.tiled_fraction={fraction}: a share of windows in [0, 1]')
  if fraction and not 1 <= lo <= hi <= data_config.seq_len:
    raise UserError(f'--config.data.tiled_period=({lo}, {hi}): need 1 <= lo <= hi <= '
                    f'seq_len={data_config.seq_len}')
  return fraction, (lo, hi)


def make_text_iterator(data_config, split: str, *, global_batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1, train: bool = True):
  """Returns a grain DatasetIterator of {'inputs', 'targets'}: int32 [B, seq_len].

  Row r is a window w of seq_len + 1 consecutive tokens of token_stream (windows start at
  multiples of seq_len), inputs = w[:-1] and targets = w[1:]. Windows are shuffled with `seed`
  (train) and repeated; B = global_batch_size // process_count, and process p takes batches
  p, p + n, ...: the processes' batches concatenated are the single-process global batch, as in
  pipeline.make_iterator. Training windows are tiled with probability data_config.tiled_fraction
  (TileSome; the same windows for the same seed, on resume too).
  """
  import grain
  from jaxgen.data.tokenizers import make_tokenizer
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} must be positive and divisible by '
                     f'process_count={process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, process_count={process_count})')
  seq_len = data_config.seq_len
  tokens = token_stream(data_config, split, make_tokenizer(data_config))
  if len(tokens) < seq_len + 1:
    raise UserError(f'split {split!r} of {data_config.name!r} has {len(tokens)} tokens, fewer '
                    f'than one window of --config.data.seq_len={seq_len} + 1')
  fraction, period = check_tiling(data_config)
  ds = grain.MapDataset.source(_Windows(tokens, seq_len))
  if train:
    ds = ds.shuffle(seed=seed)  # Followed by repeat(): a fresh permutation every epoch.
  ds = ds.repeat()
  if train and fraction:
    ds = ds.random_map(TileSome(fraction, period), seed=seed)
  ds = ds.batch(global_batch_size // process_count,
                drop_remainder=True)[process_index::process_count]
  read = grain.ReadOptions(num_threads=data_config.get('num_threads', 2),
                           prefetch_buffer_size=data_config.get('prefetch', 4))
  return iter(ds.to_iter_dataset(read))
