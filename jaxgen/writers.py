"""Metric writers: JSON lines for scripts, TensorBoard event files for people, PNG grids.

The writers follow clu's MetricWriter interface (write_scalars / write_images /
write_hparams / flush / close); clu's own package imports TensorFlow on import,
which jaxgen does not require, so they are implemented here.
"""
import json
import os

import numpy as np
from PIL import Image, ImageDraw


class MultiWriter:
  """Fans every call out to several writers (none on non-primary processes)."""

  def __init__(self, writers):
    self._writers = list(writers)

  def __getattr__(self, name):
    return lambda *a, **k: [getattr(w, name)(*a, **k) for w in self._writers]


class JsonlWriter:
  """Appends one JSON object per step to `path` (the public DIR/metrics.jsonl contract)."""

  def __init__(self, path):
    self._file = open(path, 'a')

  def write_scalars(self, step, scalars):
    row = {'step': int(step)}
    row.update({k: float(v) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + '\n')

  def write_images(self, step, images):
    del step, images  # images go to TensorBoard and PNG files

  def write_texts(self, step, texts):
    del step, texts  # texts go to TensorBoard and .txt files

  def write_hparams(self, hparams):
    del hparams  # saved as config.json

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


class TensorBoardWriter:
  """TensorBoard event files via tensorboardX (clu's own writer needs TensorFlow)."""

  def __init__(self, logdir):
    from tensorboardX import SummaryWriter
    self._writer = SummaryWriter(logdir)

  def write_scalars(self, step, scalars):
    for k, v in scalars.items():
      self._writer.add_scalar(k, float(v), int(step))

  def write_images(self, step, images):
    for k, v in images.items():
      self._writer.add_image(k, np.asarray(v), int(step), dataformats='HWC')

  def write_texts(self, step, texts):
    for k, v in texts.items():
      self._writer.add_text(k, str(v), int(step))

  def write_hparams(self, hparams):
    self._writer.add_text('hparams', json.dumps(hparams, default=str), 0)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def create_writer(workdir, *, is_primary=True):
  if not is_primary:
    return MultiWriter([])
  return MultiWriter([
      JsonlWriter(os.path.join(workdir, 'metrics.jsonl')), TensorBoardWriter(workdir)])


def image_grid(images, rows, *, row_labels=None, upscale=2):
  """[N, H, W, C] in [-1, 1] -> uint8 HxWx3 grid with `rows` rows and optional labels."""
  x = np.asarray(images, np.float32)
  n, h, w, c = x.shape
  cols = -(-n // rows)
  x = np.concatenate([x, np.full((rows * cols - n, h, w, c), -1.0, np.float32)])
  x = ((np.clip(x, -1, 1) + 1) * 127.5).round().astype(np.uint8)
  if c == 1:
    x = np.repeat(x, 3, axis=-1)
  grid = x.reshape(rows, cols, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)
  grid = np.kron(grid, np.ones((upscale, upscale, 1), np.uint8))
  if not row_labels:
    return grid
  margin = 90
  canvas = Image.new('RGB', (grid.shape[1] + margin, grid.shape[0]), 'white')
  canvas.paste(Image.fromarray(grid), (margin, 0))
  draw = ImageDraw.Draw(canvas)
  for r, label in enumerate(row_labels[:rows]):
    draw.text((4, r * h * upscale + h * upscale // 2 - 6), str(label), fill='black')
  return np.asarray(canvas)


def save_png(array, path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)
