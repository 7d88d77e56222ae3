"""The torch-format reader/writer without torch: dtypes, strided/offset storages, both file
formats, refusal of corrupt or foreign pickles, and the key/shape check's message."""
import collections
import io
import os
import pickle
import struct
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest

from jaxgen import torch_weights as tw
from jaxgen.errors import UserError


def _arrays():
  rng = np.random.default_rng(0)
  return {
      'conv.weight': rng.normal(size=(4, 3, 2, 2)).astype(np.float32),
      'half': rng.normal(size=(3, 5)).astype(np.float16),
      'bf16': rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
      'double': rng.normal(size=(2, 2)),
      'long': rng.integers(-2**62, 2**62, size=(6,)),
      'bn.num_batches_tracked': np.array(12345678901, np.int64),  # a 0-d int64, as torch's
      'int32': np.arange(-3, 3, dtype=np.int32),
      'mask': np.array([True, False, True]),
      'empty': np.zeros((0, 4), np.float32),
  }


def test_round_trip_all_dtypes(tmp_path):
  state = _arrays()
  path = str(tmp_path / 'w.pth')
  tw.save_state_dict_torch_format(state, path)
  assert zipfile.is_zipfile(path)
  got = tw.load_state_dict(path)
  assert list(got) == list(state)  # order kept
  for k, v in state.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_writer_aligns_records_like_torch(tmp_path):
  path = str(tmp_path / 'w.pth')
  tw.save_state_dict_torch_format(_arrays(), path)
  with zipfile.ZipFile(path) as zf, open(path, 'rb') as f:
    names = zf.namelist()
    assert names[0] == 'w/data.pkl' and 'w/version' in names and 'w/byteorder' in names
    for info in zf.infolist():  # data offset = header offset + 30 + name + extra
      f.seek(info.header_offset + 26)
      n, e = struct.unpack('<HH', f.read(4))
      assert (info.header_offset + 30 + n + e) % 64 == 0, info.filename


def test_hand_written_views_share_storage(tmp_path):
  st = np.arange(30, dtype=np.float32)
  path = str(tmp_path / 'views.pth')
  tw.write_torch_zip(path, {'0': st, '1': np.arange(4, dtype=np.int64)}, {
      'transposed': ('0', 0, (4, 3), (1, 4)),     # a .t() of a 3x4 matrix
      'offset': ('0', 7, (2, 3), (10, 1)),        # a slice into the middle
      'expanded': ('0', 2, (3, 2), (0, 1)),       # stride 0, as .expand() saves
      'ints': ('1', 1, (3,), (1,)),
  })
  got = tw.load_state_dict(path)
  np.testing.assert_array_equal(got['transposed'], st[:12].reshape(3, 4).T)
  np.testing.assert_array_equal(got['offset'], [[7, 8, 9], [17, 18, 19]])
  np.testing.assert_array_equal(got['expanded'], [[2, 3]] * 3)
  np.testing.assert_array_equal(got['ints'], [1, 2, 3])
  assert got['ints'].dtype == np.int64


# ----------------------------------------------------------------------------
# Files pickled the way torch pickles them (Python's own Pickler, a stand-in torch module):
# independent of jaxgen's hand-emitted opcodes.
# ----------------------------------------------------------------------------
class _Storage:
  def __init__(self, key, array):
    self.key, self.array = key, array


class _Tensor:
  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return sys.modules['torch._utils']._rebuild_tensor_v2, self.args


@pytest.fixture
def fake_torch(monkeypatch):
  """Registers `torch`, `torch._utils` stand-ins so pickle can name torch's globals."""
  torch = types.ModuleType('torch')
  utils = types.ModuleType('torch._utils')

  def _rebuild_tensor_v2(*args):
    raise AssertionError('never called')
  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = 'torch._utils', \
      '_rebuild_tensor_v2'
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  types_by_dtype = {}
  for name, dtype in tw.STORAGE_DTYPES.items():
    cls = type(name, (), {'__module__': 'torch'})
    setattr(torch, name, cls)
    types_by_dtype[dtype] = cls
  torch._utils = utils
  monkeypatch.setitem(sys.modules, 'torch', torch)
  monkeypatch.setitem(sys.modules, 'torch._utils', utils)
  return types_by_dtype


def _pickle(obj, types_by_dtype, legacy, f):
  class P(pickle.Pickler):
    def persistent_id(self, o):
      if isinstance(o, _Storage):
        pid = ('storage', types_by_dtype[o.array.dtype], o.key, 'cpu', o.array.size)
        return pid + (None,) if legacy else pid
      return None
  P(f, protocol=2).dump(obj)


def _tensors():
  a = _Storage('11', np.arange(12, dtype=np.float32) / 4)
  b = _Storage('3', np.array([5, -6], np.int64))
  state = collections.OrderedDict(w=_Tensor(a, 0, (3, 4), (4, 1)),
                                  wt=_Tensor(a, 0, (4, 3), (1, 4)),
                                  tail=_Tensor(a, 10, (2,), (1,)),
                                  n=_Tensor(b, 1, (), ()))
  expected = {'w': np.arange(12).reshape(3, 4) / 4, 'wt': np.arange(12).reshape(3, 4).T / 4,
              'tail': np.array([2.5, 2.75]), 'n': np.array(-6)}
  return state, (a, b), expected


def test_reads_zip_pickled_like_torch(tmp_path, fake_torch):
  state, storages, expected = _tensors()
  buf = io.BytesIO()
  _pickle(state, fake_torch, False, buf)
  path = str(tmp_path / 'model.pt')
  with zipfile.ZipFile(path, 'w') as zf:  # default (unaligned) records are fine for reading
    zf.writestr('model/data.pkl', buf.getvalue())
    for s in storages:
      zf.writestr(f'model/data/{s.key}', s.array.tobytes())
    zf.writestr('model/version', '3\n')
  got = tw.load_state_dict(path)
  for k, v in expected.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_reads_legacy_format(tmp_path, fake_torch):
  state, storages, expected = _tensors()
  path = str(tmp_path / 'old.pth')
  with open(path, 'wb') as f:
    for header in (0x1950a86a20f9469cfc6c, 1001, {'protocol_version': 1001,
                                                  'little_endian': True}):
      pickle.dump(header, f, protocol=2)
    _pickle(state, fake_torch, True, f)
    pickle.dump([s.key for s in storages], f, protocol=2)
    for s in storages:
      f.write(struct.pack('<q', s.array.size) + s.array.tobytes())
  got = tw.load_state_dict(path)
  for k, v in expected.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)


# ----------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------
def _one_line_error(path, *fragments):
  with pytest.raises(UserError) as e:
    tw.load_state_dict(path)
  msg = str(e.value)
  assert '\n' not in msg and str(path) in msg, msg
  for frag in fragments:
    assert frag in msg, msg
  return msg


def test_rejects_corrupt_files(tmp_path):
  good = str(tmp_path / 'good.pth')
  tw.save_state_dict_torch_format(_arrays(), good)
  raw = open(good, 'rb').read()
  truncated = tmp_path / 'truncated.pth'
  truncated.write_bytes(raw[:len(raw) // 2])
  _one_line_error(truncated, 'not a readable state dict', 'convert_torch_weights.py')
  garbage = tmp_path / 'garbage.pth'
  garbage.write_bytes(np.random.default_rng(0).bytes(1000))
  _one_line_error(garbage, 'not a readable state dict')
  (tmp_path / 'bad.npz').write_bytes(b'PK not really')
  _one_line_error(tmp_path / 'bad.npz', 'not a readable state dict')
  _one_line_error(tmp_path / 'absent.pth', 'does not exist')


def test_rejects_storage_too_small(tmp_path):
  path = str(tmp_path / 'short.pth')
  tw.write_torch_zip(path, {'0': np.zeros(5, np.float32)}, {'w': ('0', 2, (2, 2), (2, 1))})
  _one_line_error(path, 'reaches element 5 of a storage of 5')


def test_refuses_foreign_globals_without_running_them(tmp_path):
  marker = tmp_path / 'pwned'
  payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
  path = str(tmp_path / 'evil.pth')
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('evil/data.pkl', payload)
  _one_line_error(path, 'os.system')
  assert not marker.exists()


def test_rejects_non_state_dicts(tmp_path):
  path = str(tmp_path / 'list.pth')
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('list/data.pkl', pickle.dumps([1, 2, 3], protocol=2))
  _one_line_error(path, 'holds a list, not a state dict')
  path = str(tmp_path / 'notensors.pth')
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('notensors/data.pkl', pickle.dumps({'epoch': 3}, protocol=2))
  _one_line_error(path, 'holds no tensors')


def test_npz(tmp_path):
  state = {'a.weight': np.ones((2, 3), np.float32), 'b': np.arange(3)}
  np.savez(tmp_path / 'w.npz', **state)
  got = tw.load_state_dict(str(tmp_path / 'w.npz'))
  assert set(got) == set(state)
  np.testing.assert_array_equal(got['a.weight'], state['a.weight'])
  os.rename(tmp_path / 'w.npz', tmp_path / 'w.pth')  # also under a torch-like name
  assert set(tw.load_state_dict(str(tmp_path / 'w.pth'))) == set(state)


def test_nested_checkpoint_is_flattened(tmp_path, fake_torch):
  state, storages, expected = _tensors()
  buf = io.BytesIO()
  _pickle({'model': state, 'epoch': 3}, fake_torch, False, buf)
  path = str(tmp_path / 'ckpt.pth')
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('ckpt/data.pkl', buf.getvalue())
    for s in storages:
      zf.writestr(f'ckpt/data/{s.key}', s.array.tobytes())
  got = tw.load_state_dict(path)
  assert sorted(got) == sorted(f'model.{k}' for k in expected)  # the epoch count is dropped


def test_check_state_dict_message():
  expected = {f'k{i}.weight': (2, 3) for i in range(5)}
  expected['fc.weight'] = (1008, 2048)
  state = {'k0.weight': np.zeros((2, 3)), 'fc.weight': np.zeros((1000, 2048)),
           'extra': np.zeros(1)}  # extra keys are fine
  with pytest.raises(UserError) as e:
    tw.check_state_dict(state, expected, 'Inception weights /x.pth', 'pass the right file')
  assert str(e.value) == (
      'Inception weights /x.pth: 4 keys missing (k1.weight, k2.weight, k3.weight, ...), '
      '1 mis-shaped (fc.weight: (1000, 2048) != (1008, 2048)); pass the right file')
  tw.check_state_dict({k: np.zeros(s) for k, s in expected.items()}, expected, 'ok')
