"""TFDS builders, shared by the image pipeline and text input: jaxgen's own local builders by
name (embedded data), any other name from TFDS's registry, and a build done once per data dir.

tensorflow_datasets is imported on first use, so configs can import the data modules without it.
"""
import os
import re

from jaxgen.data.errors import DatasetNotFoundError
from jaxgen.data.files import file_lock


def data_dir(cfg) -> str:
  return os.path.expanduser(os.fspath(cfg.data_dir))


def file_name(s: str) -> str:
  """`s` with every character a file name should not hold replaced by '_'."""
  return re.sub(r'[^A-Za-z0-9_.-]', '_', s)


def one_line(what, e, hint='') -> str:
  """`what`, the exception's type and the first line of its message, and `hint`."""
  cause = (str(e).strip().splitlines() or [''])[0]
  return f'{what}: {type(e).__name__}: {cause}' + (f' ({hint})' if hint else '')


def get_builder(cfg, local, hint=''):
  """The builder of dataset cfg.name: local[name](data_dir=...) if jaxgen builds it itself,
  else TFDS's; an unknown name is a DatasetNotFoundError saying `hint`."""
  if cfg.name in local:
    return local[cfg.name](data_dir=data_dir(cfg))
  import tensorflow_datasets as tfds
  try:
    return tfds.builder(cfg.name, data_dir=data_dir(cfg))
  except Exception as e:  # Unknown name, or its builder module needs TensorFlow.
    raise DatasetNotFoundError(one_line(f'TFDS dataset {cfg.name!r} is not available', e,
                                        hint)) from e


def prepare(cfg, local, hint='', **download_kwargs):
  """Builds cfg.name into its data dir once and returns its builder. Several processes may
  get here at once: one builds under a file lock, the others wait and reuse its files."""
  builder = get_builder(cfg, local, hint)
  if builder.is_prepared():
    return builder
  os.makedirs(data_dir(cfg), exist_ok=True)
  with file_lock(os.path.join(data_dir(cfg), f'.{file_name(cfg.name)}.prepare.lock')):
    builder = get_builder(cfg, local, hint)  # Fresh, so it sees a build finished meanwhile.
    if not builder.is_prepared():
      try:
        builder.download_and_prepare(**download_kwargs)
      except DatasetNotFoundError:
        raise
      except Exception as e:
        raise DatasetNotFoundError(one_line(f'could not prepare TFDS dataset {cfg.name!r}', e,
                                            hint)) from e
  return builder
