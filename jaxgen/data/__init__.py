"""Data input: TFDS-prepared datasets read with grain.

The input stack (grain, TFDS) is imported on first use, so configs, `--mode=info` and the
benchmarks run where it is not installed.
"""
import importlib

from jaxgen.data.config import default_data_config
from jaxgen.data.errors import DatasetNotFoundError

_PIPELINE = ('load_split', 'make_iterator', 'num_examples', 'prepare_dataset')
__all__ = ['DatasetNotFoundError', 'default_data_config', *_PIPELINE]


def __getattr__(name):
  if name in _PIPELINE:
    return getattr(importlib.import_module('jaxgen.data.pipeline'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
