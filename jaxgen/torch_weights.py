"""PyTorch state dicts without torch: read `.pth`/`.pt` (and converted `.npz`), write `.pth`.

A torch file is a pickle whose tensors are `torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, ...)` calls and whose storages are pickle "persistent ids". The zip
format (torch >= 1.6) keeps the pickle in `<archive>/data.pkl` and storage `k` in
`<archive>/data/k`; the legacy format (older releases of some weights) appends the raw
storages after the pickles. The unpickler below resolves only those rebuild functions,
storage types and OrderedDict: a file that names anything else is refused, never run.
"""
import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Dict, Mapping, NamedTuple, Tuple

import ml_dtypes
import numpy as np

from jaxgen.errors import UserError

# torch storage class name -> element dtype.
STORAGE_DTYPES = {
    'FloatStorage': np.dtype(np.float32), 'DoubleStorage': np.dtype(np.float64),
    'HalfStorage': np.dtype(np.float16), 'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64), 'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16), 'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8), 'BoolStorage': np.dtype(np.bool_),
}
_STORAGE_NAMES = {v: k for k, v in STORAGE_DTYPES.items()}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class _Corrupt(Exception):
  """Internal: the file is not a readable state dict (turned into one UserError)."""


class _StorageType:
  """Stands in for `torch.FloatStorage` & co. inside the pickle."""

  def __init__(self, dtype):
    self.dtype = dtype


class _Tensor(NamedTuple):
  """A tensor as pickled: materialised by `_strided` once its storage bytes are in."""
  storage: np.ndarray
  offset: int
  size: Tuple[int, ...]
  stride: Tuple[int, ...]


def _rebuild(storage, offset, size, stride, *unused):
  return _Tensor(storage, int(offset), tuple(size), tuple(stride))


def _parameter(data, *unused):
  return data  # nn.Parameter(data): the tensor itself


def _strided(t: _Tensor) -> np.ndarray:
  """NumPy twin of torch's `_rebuild_tensor_v2`: a copy of the strided view of the storage."""
  if not isinstance(t.storage, np.ndarray):
    raise _Corrupt('tensor without storage')
  size, stride = tuple(int(s) for s in t.size), tuple(int(s) for s in t.stride)
  if len(size) != len(stride) or min(size + stride + (t.offset,), default=0) < 0:
    raise _Corrupt(f'bad tensor geometry size={size} stride={stride}')
  if 0 in size:
    return np.zeros(size, t.storage.dtype)
  last = t.offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= t.storage.size:  # as_strided would read out of bounds
    raise _Corrupt(f'tensor reaches element {last} of a storage of {t.storage.size}')
  item = t.storage.itemsize
  return np.array(np.lib.stride_tricks.as_strided(
      t.storage[t.offset:], size, tuple(s * item for s in stride), writeable=False))


_ALLOWED = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild,
    ('torch._utils', '_rebuild_tensor'): _rebuild,
    ('torch._utils', '_rebuild_parameter'): _parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
  """Resolves only torch's tensor-rebuild globals; storages come from `read_storage`."""

  def __init__(self, file, read_storage=None):
    super().__init__(file)
    self._read_storage = read_storage
    self.storages = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == 'torch' and name in STORAGE_DTYPES:
      return _StorageType(STORAGE_DTYPES[name])
    raise _Corrupt(f'it refers to {module}.{name}, which a plain state dict does not')

  def persistent_load(self, pid):
    # ('storage', storage_type, key, location, numel[, view_metadata])
    if not (self._read_storage and isinstance(pid, tuple) and len(pid) >= 5 and
            pid[0] in ('storage', b'storage') and isinstance(pid[1], _StorageType)):
      raise _Corrupt(f'unknown persistent id {str(pid)[:60]}')
    if len(pid) > 5 and pid[5] is not None:
      raise _Corrupt('storage views (torch < 0.4 files) are not supported')
    key = _text(pid[2])
    if key not in self.storages:
      self.storages[key] = self._read_storage(key, pid[1].dtype, int(pid[4]))
    return self.storages[key]


def _text(s):
  return s.decode() if isinstance(s, bytes) else str(s)


def _flat_arrays(obj, prefix=''):
  """{name: array} of a (nested) mapping; non-tensor leaves (e.g. an epoch count) are dropped."""
  out = {}
  for k, v in obj.items():
    name = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(_flat_arrays(v, name + '.'))
    elif isinstance(v, _Tensor):
      out[name] = _strided(v)
    elif isinstance(v, np.ndarray):
      out[name] = v
  return out


def _load_zip(path):
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
    if not pkl and names and all(n.endswith('.npy') for n in names):
      with np.load(path, allow_pickle=False) as f:  # an .npz under another name
        return {k: f[k] for k in f.files}
    if not pkl:
      raise _Corrupt('a zip file without <archive>/data.pkl')
    prefix = pkl[0][:-len('data.pkl')]
    order = '<'
    if prefix + 'byteorder' in names and zf.read(prefix + 'byteorder').strip() == b'big':
      order = '>'

    def read_storage(key, dtype, numel):
      name = f'{prefix}data/{key}'
      if name not in names:
        raise _Corrupt(f'storage {key} is missing')
      raw = zf.read(name)
      if len(raw) < numel * dtype.itemsize:
        raise _Corrupt(f'storage {key} has {len(raw)} bytes, needs {numel * dtype.itemsize}')
      return np.frombuffer(raw, dtype.newbyteorder(order), numel).astype(dtype)

    obj = _Unpickler(io.BytesIO(zf.read(pkl[0])), read_storage).load()
    return _flat_arrays(obj) if isinstance(obj, Mapping) else obj


def _load_legacy(f):
  """torch < 1.6 format: magic, version, sys_info, the object, storage keys, then storages."""
  if _Unpickler(f).load() != _LEGACY_MAGIC or _Unpickler(f).load() != 1001:
    raise _Corrupt('neither a zip nor a legacy torch file')
  if not _Unpickler(f).load().get('little_endian', True):
    raise _Corrupt('big-endian legacy files are not supported')
  # The storage bytes follow the object: hand out empty arrays now and fill them below
  # (tensors keep references and are only materialised by _flat_arrays).
  unpickler = _Unpickler(f, lambda key, dtype, numel: np.empty(numel, dtype))
  obj = unpickler.load()
  for key in _Unpickler(f).load():
    arr = unpickler.storages.get(_text(key))
    numel = struct.unpack('<q', f.read(8))[0]
    if arr is None or numel != arr.size:
      raise _Corrupt(f'storage {_text(key)} does not match the pickle')
    raw = f.read(numel * arr.itemsize)
    if len(raw) != numel * arr.itemsize:
      raise _Corrupt('file is truncated')
    arr[...] = np.frombuffer(raw, arr.dtype.newbyteorder('<'))
  return _flat_arrays(obj) if isinstance(obj, Mapping) else obj


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """{key: array} of a torch `.pth`/`.pt` state dict or an `.npz` of one (no torch needed)."""
  path = os.path.expanduser(str(path))
  if not os.path.isfile(path):
    raise UserError(f'weights file {path} does not exist: pass the path of a local .pth or .npz')
  hint = 'pass a PyTorch state dict (.pth/.pt) or an .npz from scripts/convert_torch_weights.py'
  try:
    if path.endswith('.npz'):
      with np.load(path, allow_pickle=False) as f:
        state = {k: f[k] for k in f.files}
    elif zipfile.is_zipfile(path):
      state = _load_zip(path)
    else:
      with open(path, 'rb') as f:
        state = _load_legacy(f)
  except UserError:
    raise
  except _Corrupt as e:
    raise UserError(f'{path} is not a readable state dict ({e}); {hint}') from e
  except Exception as e:  # noqa: BLE001 — any parse failure is the same user problem
    detail = ' '.join(str(e).split())[:80]
    raise UserError(f'{path} is not a readable state dict ({type(e).__name__}: {detail}); '
                    f'{hint}') from e
  if not isinstance(state, Mapping):
    raise UserError(f'{path} holds a {type(state).__name__}, not a state dict; {hint}')
  arrays = _flat_arrays(state)
  if not arrays:
    raise UserError(f'{path} holds no tensors; {hint}')
  return arrays


def check_state_dict(state: Mapping[str, np.ndarray], expected_shapes: Mapping[str, Tuple],
                     what: str, hint: str = '') -> None:
  """UserError naming (a few of) the missing and mis-shaped keys; extra keys are fine."""
  missing = [k for k in expected_shapes if k not in state]
  bad = [f'{k}: {tuple(np.shape(state[k]))} != {tuple(s)}' for k, s in expected_shapes.items()
         if k in state and tuple(np.shape(state[k])) != tuple(s)]
  if not missing and not bad:
    return

  def few(items):
    return ', '.join(items[:3]) + (', ...' if len(items) > 3 else '')
  parts = []
  if missing:
    parts.append(f'{len(missing)} keys missing ({few(missing)})')
  if bad:
    parts.append(f'{len(bad)} mis-shaped ({few(bad)})')
  raise UserError(f'{what}: {", ".join(parts)}' + (f'; {hint}' if hint else ''))


# ----------------------------------------------------------------------------
# Writer: the zip format, pickle opcodes emitted by hand (no torch to import).
# ----------------------------------------------------------------------------
def _op_int(v):
  if 0 <= v < 256:
    return b'K' + struct.pack('<B', v)  # BININT1
  if -2**31 <= v < 2**31:
    return b'J' + struct.pack('<i', v)  # BININT
  raw = v.to_bytes((v.bit_length() + 8) // 8, 'little', signed=True)
  return b'\x8a' + struct.pack('<B', len(raw)) + raw  # LONG1


def _op_str(s):
  raw = s.encode('utf-8')
  return b'X' + struct.pack('<I', len(raw)) + raw  # BINUNICODE


def _op_tuple(items):
  return b'(' + b''.join(items) + b't' if items else b')'  # MARK ... TUPLE


def _op_global(module, name):
  return b'c' + f'{module}\n{name}\n'.encode()


_EMPTY_ORDERED_DICT = _op_global('collections', 'OrderedDict') + b')R'


def _data_pkl(views):
  """data.pkl of OrderedDict{key: tensor} for views {key: (storage key, dtype, numel,
  offset, shape, stride)}."""
  out = [b'\x80\x02', _EMPTY_ORDERED_DICT]
  for key, (skey, dtype, numel, offset, shape, stride) in views.items():
    pid = _op_tuple([_op_str('storage'), _op_global('torch', _STORAGE_NAMES[dtype]),
                     _op_str(skey), _op_str('cpu'), _op_int(numel)])
    tensor = (_op_global('torch._utils', '_rebuild_tensor_v2') + b'(' + pid + b'Q' +
              _op_int(offset) + _op_tuple([_op_int(n) for n in shape]) +
              _op_tuple([_op_int(s) for s in stride]) + b'\x89' + _EMPTY_ORDERED_DICT +
              b'tR')
    out.append(_op_str(key) + tensor + b's')  # SETITEM on the OrderedDict
  return b''.join(out) + b'.'


def _write_aligned(zf, name, data, align=64):
  """A stored (uncompressed) record whose data starts at a multiple of `align`, as torch's."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  start = zf.fp.tell() + 30 + len(name.encode()) + 4  # local header + name + extra header
  pad = -start % align
  info.extra = struct.pack('<HH', 0x4246, pad) + b'Z' * pad  # 'FB' padding field
  zf.writestr(info, data)


def write_torch_zip(path: str, storages: Mapping[str, np.ndarray],
                    views: Mapping[str, Tuple[str, int, Tuple, Tuple]]) -> None:
  """Low level: 1-D `storages` {storage key: array} and tensors {key: (storage key, offset,
  shape, stride)} (in elements, as torch counts) as a zip-format torch file."""
  meta = {}
  for key, (skey, offset, shape, stride) in views.items():
    st = storages[skey]
    if st.dtype not in _STORAGE_NAMES:
      raise UserError(f'{key}: dtype {st.dtype} has no torch storage type; cast it first')
    meta[str(key)] = (str(skey), st.dtype, st.size, int(offset), tuple(shape), tuple(stride))
  archive = os.path.splitext(os.path.basename(path))[0] or 'archive'
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
    _write_aligned(zf, f'{archive}/data.pkl', _data_pkl(meta))
    _write_aligned(zf, f'{archive}/byteorder', b'little')
    for skey, st in storages.items():
      _write_aligned(zf, f'{archive}/data/{skey}', st.astype(st.dtype.newbyteorder('<')).tobytes())
    _write_aligned(zf, f'{archive}/version', b'3\n')
    _write_aligned(zf, f'{archive}/.data/version', b'3\n')


def save_state_dict_torch_format(state: Mapping[str, np.ndarray], path: str) -> None:
  """Writes {key: array} as a zip-format torch file that `torch.load` reads (no torch needed)."""
  storages, views = {}, {}
  for i, (k, v) in enumerate(state.items()):
    a = np.asarray(v, order='C')  # (ascontiguousarray would make scalars 1-d)
    storages[str(i)] = a.reshape(-1)
    views[k] = (str(i), 0, a.shape, tuple(int(np.prod(a.shape[d + 1:])) for d in range(a.ndim)))
  write_torch_zip(path, storages, views)
