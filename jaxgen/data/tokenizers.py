"""Tokenizers for the language models: ASCII characters, or a SentencePiece model.

Both have `encode(text) -> int32 [N]`, `decode(ids) -> str`, `vocab_size`, `name` and a
`fingerprint` that changes whenever the ids would (it keys the token caches).

Train the default SentencePiece model of a data config (printed path):
  python -m jaxgen.data.tokenizers --vocab_size=1024 [--data_dir=DIR] [--dataset=shakespeare]
"""
import argparse
import functools
import hashlib
import io
import os
import sys
import time
import unicodedata

import numpy as np

from jaxgen.data import text as text_lib
from jaxgen.data.errors import DatasetNotFoundError
from jaxgen.errors import UserError


@functools.lru_cache(maxsize=4096)
def _to_ascii(char: str) -> str:
  """NFKD-decomposes and drops combining marks ('é' -> 'e', 'ﬁ' -> 'fi'); otherwise '?'."""
  parts = unicodedata.normalize('NFKD', char)
  if all(c.isascii() or unicodedata.combining(c) for c in parts):
    out = ''.join(c for c in parts if c.isascii())
    if out:
      return out
  return '?'


class CharTokenizer:
  """The 128 ASCII code points: id = ord(c). Other characters are mapped to ASCII first."""

  vocab_size = 128
  name = 'char'
  fingerprint = 'char128-nfkd-v1'

  def encode(self, text: str) -> np.ndarray:
    if not text.isascii():
      text = ''.join(c if c.isascii() else _to_ascii(c) for c in text)
    return np.frombuffer(text.encode('ascii'), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= 128):
      raise ValueError(f'char ids must be in [0, 128), got [{ids.min()}, {ids.max()}]')
    return ids.astype(np.uint8).tobytes().decode('ascii')


class SentencePieceTokenizer:
  """A trained SentencePiece model file (see train_sentencepiece)."""

  def __init__(self, model_path):
    import sentencepiece
    with open(model_path, 'rb') as f:
      proto = f.read()
    self.model_path = os.fspath(model_path)
    self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    self.vocab_size = self._sp.get_piece_size()
    self.name = f'spm{self.vocab_size}'
    self.fingerprint = f'spm{self.vocab_size}-{hashlib.sha256(proto).hexdigest()[:16]}'

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode(np.asarray(ids).tolist())


def default_spm_path(data_config) -> str:
  return os.path.join(text_lib.data_dir(data_config), 'tokenizers',
                      f'{text_lib.cache_name(data_config)}_spm{data_config.vocab_size}.model')


def train_command(data_config) -> str:
  return (f'python -m jaxgen.data.tokenizers --vocab_size={data_config.vocab_size} '
          f'--data_dir={text_lib.data_dir(data_config)} --dataset={data_config.name}')


def train_sentencepiece(data_config, vocab_size: int, out_path, *, input_sentence_size: int = 0,
                        seed: int = 0) -> str:
  """Trains a unigram SentencePiece model on the lines of the train split; returns out_path.

  Exact round trips (decode(encode(x)) == x): no normalisation, whitespace kept as is, '\\n' a
  piece of its own, and byte fallback for characters outside the vocabulary. With
  input_sentence_size > 0, trains on that many lines sampled with `seed` (faster).
  """
  import sentencepiece
  text = text_lib.load_text(data_config, data_config.get('train_split', 'train'))
  lines = [line for line in text.split('\n') if line.strip()]
  model = io.BytesIO()
  sentencepiece.set_random_generator_seed(seed)
  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type='unigram', byte_fallback=True, character_coverage=1.0,
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        add_dummy_prefix=False, user_defined_symbols=['\n'], allow_whitespace_only_pieces=True,
        bos_id=-1, eos_id=-1, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True, num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:  # E.g. a vocab_size too small for the 256 byte pieces.
    cause = (str(e).strip().splitlines() or [''])[-1]
    raise UserError(f'SentencePiece training with vocab_size={vocab_size} failed: {cause}') from e
  out_path = os.fspath(out_path)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  tmp = f'{out_path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(model.getvalue())
  os.replace(tmp, out_path)
  return out_path


def make_tokenizer(data_config):
  """The tokenizer of `data_config.tokenizer` ('char' or 'spm'), checked against vocab_size."""
  kind = data_config.tokenizer
  if kind == 'char':
    tokenizer = CharTokenizer()
  elif kind == 'spm':
    path = data_config.get('spm_model', '') or default_spm_path(data_config)
    if not os.path.isfile(path):
      raise DatasetNotFoundError(f'SentencePiece model {path} not found: train it with '
                                 f"'{train_command(data_config)}'")
    tokenizer = SentencePieceTokenizer(path)
  else:
    raise UserError(f"unknown tokenizer {kind!r} in --config.data.tokenizer: use 'char' or 'spm'")
  if data_config.vocab_size != tokenizer.vocab_size:
    raise UserError(f'--config.data.vocab_size={data_config.vocab_size} does not match the '
                    f'{tokenizer.name} tokenizer\'s vocabulary of {tokenizer.vocab_size}')
  return tokenizer


def main(argv=None):
  parser = argparse.ArgumentParser(description='Trains the default SentencePiece model.')
  parser.add_argument('--vocab_size', type=int, required=True)
  parser.add_argument('--data_dir', default=None, help='default: $JAXGEN_DATA_DIR or '
                      '~/.cache/jaxgen/tfds')
  parser.add_argument('--dataset', default='shakespeare')
  parser.add_argument('--input_sentence_size', type=int, default=0,
                      help='train on this many sampled lines (0: all)')
  args = parser.parse_args(argv)
  cfg = text_lib.text_data_config(tokenizer='spm', vocab_size=args.vocab_size)
  cfg.name = args.dataset
  if args.data_dir:
    cfg.data_dir = args.data_dir
  start = time.time()
  try:
    path = train_sentencepiece(cfg, args.vocab_size, default_spm_path(cfg),
                               input_sentence_size=args.input_sentence_size)
  except (UserError, DatasetNotFoundError) as e:
    sys.exit(f'error: {e}')
  print(f'trained in {time.time() - start:.1f}s', file=sys.stderr)
  print(path)


if __name__ == '__main__':
  main()
