"""The small interface a model family implements to use the shared trainer.

A family owns its model and objective. The trainer owns everything else:
sharding, optimizer, EMA, checkpoints, data order, logging.
"""
import abc

import jax
import numpy as np

from jaxgen import data, optim, sampling, writers


def count_params(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


class FamilyBase(abc.ABC):
  """Subclasses implement init_params, loss, sample and flops_per_example."""

  # True for tokenizers: sample-based eval scores `reconstruct(params, images)` of real
  # images (rFID) instead of `sample` from class labels.
  reconstructs = False

  def __init__(self, config):
    self.config = config

  # -- required ---------------------------------------------------------------
  @abc.abstractmethod
  def init_params(self, rng):
    """Boxed (logically partitioned) parameters; traced under eval_shape / jit."""

  @abc.abstractmethod
  def loss(self, params, batch, rng, train):
    """(scalar loss, dict of scalar metrics) for a global batch."""

  @abc.abstractmethod
  def sample(self, params, rng, inputs):
    """Jittable: samples for `sample_inputs()` (images in [-1, 1] for class labels; tokens
    for prompts)."""

  @abc.abstractmethod
  def flops_per_example(self, train=True):
    """Analytic matmul FLOPs of one example (x3 with train=True)."""

  # -- defaults ---------------------------------------------------------------
  def make_optimizer(self, total_steps):
    """(optax transformation, lr schedule) for the whole parameter tree."""
    return optim.make_optimizer(self.config.optim, total_steps)

  def train_loss(self, params, batch, rng, step):
    """The training objective at `step` (a traced int32): families whose loss changes over
    training (a GAN's discriminator start, lazy regularisers) override this."""
    del step
    return self.loss(params, batch, rng, train=True)

  def after_update(self, params, batch, rng, step):
    """Parameters after the optimizer step, changed by a non-gradient rule if the family has
    one (a VQ tokenizer's dead-code restart); jitted inside the train step."""
    del batch, rng, step
    return params

  def eval_metrics(self, params, batch, rng):
    """Per-batch eval metrics: scalars are averaged over the eval batches; arrays (e.g. a
    code histogram) are summed and handed to `reduce_eval_metrics`."""
    loss, metrics = self.loss(params, batch, rng, train=False)
    return dict(metrics, loss=loss)

  def reduce_eval_metrics(self, totals):
    """Scalars from the eval batches' metrics (scalar means, array sums)."""
    return totals

  def param_breakdown(self, params):
    """{part: parameter count} for --mode=info (e.g. a tokenizer's encoder and decoder)."""
    return {}

  def activated_params(self, total):
    """Parameters touched per token; dense models use all of them."""
    return total

  def sample_labels(self):
    cfg = self.config
    return sampling.class_grid_labels(cfg.data.num_classes, cfg.sample.per_class)

  def row_names(self):
    """Row labels of the sample grid: class names where the dataset has them."""
    if self.config.data.get('name') == 'fashion_mnist':
      from jaxgen.data.fashion_mnist import CLASS_NAMES
      return list(CLASS_NAMES)
    return None

  def sample_inputs(self):
    """What `sample` conditions on for the periodic samples: class labels, or for
    reconstructing families fixed test images."""
    return self.fixed_test_images() if self.reconstructs else self.sample_labels()

  def fixed_test_images(self):
    """The first config.sample.num_images test images (the same every call)."""
    if not hasattr(self, '_fixed_test_images'):
      n = self.config.sample.num_images
      it = self.make_iterator('test', global_batch_size=n, seed=0, train=False)
      self._fixed_test_images = np.asarray(next(it)['image'])
    return self._fixed_test_images

  def grid_layout(self):
    """(rows, row labels, TensorBoard tag) of the sample grid: one row per class."""
    rows = self.config.data.num_classes if self.config.sample.get('per_class') else 1
    return rows, self.row_names(), 'samples'

  def write_samples(self, outputs, stem, writer, step, save=True):
    """Saves sampler outputs (images in [-1, 1]) as a PNG grid laid out by `grid_layout` to
    stem + '.png' and to `writer`; returns the path."""
    rows, row_labels, tag = self.grid_layout()
    grid = writers.image_grid(outputs, rows, row_labels=row_labels)
    if save:
      writers.save_png(grid, stem + '.png')
    if writer is not None:
      writer.write_images(step, {tag: grid})
    return stem + '.png'

  def make_iterator(self, split, *, global_batch_size, seed, train):
    """Per-process iterator of local batches (dicts of NumPy arrays) with get/set_state."""
    return data.make_iterator(self.config.data, split, global_batch_size=global_batch_size,
                              seed=seed, process_index=jax.process_index(),
                              process_count=jax.process_count(), train=train)
