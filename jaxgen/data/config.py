"""The data config's defaults, importable without the input stack (grain, TFDS)."""
import os

import ml_collections

# Where Debian's dataset-fashion-mnist package puts the raw files.
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'


def default_data_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.name = 'fashion_mnist'
  cfg.data_dir = os.path.expanduser(os.environ.get('JAXGEN_DATA_DIR', '~/.cache/jaxgen/tfds'))
  cfg.manual_dir = FASHION_MNIST_DIR
  cfg.image_size = 32
  cfg.channels = 1
  cfg.num_classes = 10
  cfg.flip = False
  cfg.num_threads = 2
  cfg.prefetch = 4
  return cfg
