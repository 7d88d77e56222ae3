"""Input pipeline: TFDS builds ArrayRecord files once; grain reads them deterministically."""
import functools

import grain
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from jaxgen.data import builders, fashion_mnist
from jaxgen.data.config import default_data_config
from jaxgen.data.errors import DatasetNotFoundError

__all__ = ['DatasetNotFoundError', 'default_data_config', 'prepare_dataset', 'num_examples',
           'load_split', 'make_iterator']


_TFDS_HINT = ("datasets other than fashion_mnist need TensorFlow for image decoding "
              "('pip install tensorflow') and their raw data")
_LOCAL = {'fashion_mnist': fashion_mnist.JaxgenFashionMnist}


def _builder(cfg):
  return builders.get_builder(cfg, _LOCAL, _TFDS_HINT)


def prepare_dataset(data_config) -> None:
  """Builds the dataset into data_config.data_dir once; a no-op when it is already there."""
  manual_dir = data_config.get('manual_dir') or None
  if data_config.name == 'fashion_mnist':  # from the Debian package's files
    kwargs = dict(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir or fashion_mnist.DEFAULT_MANUAL_DIR))
  else:
    kwargs = dict(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
                  file_format='array_record')
  builders.prepare(data_config, _LOCAL, _TFDS_HINT, **kwargs)


def num_examples(data_config, split: str) -> int:
  prepare_dataset(data_config)
  return _builder(data_config).info.splits[split].num_examples


def _flip(example, rng):
  if rng.random() < 0.5:
    example = dict(example, image=np.asarray(example['image'])[:, ::-1])
  return example


def _resize(image, size):
  """Center-crops to a square and resizes (uint8 HWC in, uint8 HWC out)."""
  h, w, c = image.shape
  s = min(h, w)
  image = image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
  if s == size:
    return image
  pil = Image.fromarray(image[..., 0] if c == 1 else image)
  out = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
  return out.reshape(size, size, c)


def _to_model_range(images, *, size, channels, pad):
  """uint8 [..., S', S', C] (already size x size unless `pad`) -> float32 [..., S, S, channels]
  in [-1, 1]; works on one image or a stack of them."""
  images = images.astype(np.float32) / 127.5 - 1.0
  if pad:
    # Pad with the background value (-1, i.e. black) rather than stretching the 28x28 digits.
    dh, dw = size - images.shape[-3], size - images.shape[-2]
    widths = [(0, 0)] * (images.ndim - 3) + [(dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2),
                                             (0, 0)]
    images = np.pad(images, widths, constant_values=-1.0)
  if images.shape[-1] != channels:
    images = np.repeat(images, channels, axis=-1)  # Grayscale -> RGB; other cases rejected earlier.
  return images


def _uint8_image(example, size, pad):
  image = np.asarray(example['image'])
  if image.ndim == 2:
    image = image[..., None]
  return image if pad else _resize(image, size)


def _preprocess(example, *, size, channels, pad):
  image = _to_model_range(_uint8_image(example, size, pad), size=size, channels=channels, pad=pad)
  return {'image': image, 'label': np.int32(example['label'])}


def _pad_for(data_config):
  return data_config.name == 'fashion_mnist' and data_config.image_size == 32


def load_split(data_config, split: str, limit=None):
  """A whole split (or its first `limit` examples) in stored order as arrays, preprocessed as
  make_iterator's (no shuffle, no flip): {'image': f32 [N, S, S, C], 'label': i32 [N]}.

  For small datasets that fit in memory; one bulk read is ~4x faster than reading examples
  one by one.
  """
  prepare_dataset(data_config)
  source = _builder(data_config).as_data_source(split=split)
  n = len(source) if limit is None else min(limit, len(source))
  size, pad = data_config.image_size, _pad_for(data_config)
  examples = source.__getitems__(range(n))
  # One vectorised conversion of the whole stack: per-example float conversion took as long
  # as reading the split.
  images = np.stack([_uint8_image(e, size, pad) for e in examples])
  return {'image': _to_model_range(images, size=size, channels=data_config.channels, pad=pad),
          'label': np.asarray([e['label'] for e in examples], np.int32)}


def make_iterator(data_config, split: str, *, global_batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1, train: bool = True):
  """Returns a grain DatasetIterator of {'image': f32 [B, S, S, C] in [-1, 1], 'label': i32 [B]}.

  B = global_batch_size // process_count. The (shuffled, repeated) stream is cut into batches of
  B and process p takes batches p, p + n, p + 2n, ...: at every step, the processes' batches
  concatenated in process order are exactly the single-process global batch, row for row, so a
  multi-process run computes the same function as a single-process one.
  """
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} must be positive and divisible by '
                     f'process_count={process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, process_count={process_count})')
  local_batch = global_batch_size // process_count
  size, channels = data_config.image_size, data_config.channels

  prepare_dataset(data_config)
  builder = _builder(data_config)
  in_channels = builder.info.features['image'].shape[-1]
  if in_channels not in (channels, 1):
    raise ValueError(f'cannot turn {in_channels}-channel images of {data_config.name!r} into '
                     f'{channels} channels')
  pad = _pad_for(data_config)

  ds = grain.MapDataset.source(builder.as_data_source(split=split))
  if train:
    ds = ds.shuffle(seed=seed)  # Followed by repeat(): a fresh permutation every epoch.
  ds = ds.repeat()
  if train and data_config.get('flip', False):
    # Before sharding, so each flip depends on the global element index: resumed runs and any
    # process count see the same flips.
    ds = ds.random_map(_flip, seed=seed)
  ds = ds.map(functools.partial(_preprocess, size=size, channels=channels, pad=pad))
  ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count]
  read = grain.ReadOptions(num_threads=data_config.get('num_threads', 2),
                           prefetch_buffer_size=data_config.get('prefetch', 4))
  return iter(ds.to_iter_dataset(read))
