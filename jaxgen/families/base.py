"""The small interface a model family implements to use the shared trainer.

A family owns its model and objective. The trainer owns everything else:
sharding, optimizer, EMA, checkpoints, data order, logging.
"""
import abc

import jax

from jaxgen import data, sampling


class FamilyBase(abc.ABC):
  """Subclasses implement init_params, loss, sample and flops_per_example."""

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
  def sample(self, params, rng, labels):
    """Jittable: images in [-1, 1] for the given class labels."""

  @abc.abstractmethod
  def flops_per_example(self, train=True):
    """Analytic matmul FLOPs of one example (x3 with train=True)."""

  # -- defaults ---------------------------------------------------------------
  def eval_metrics(self, params, batch, rng):
    loss, metrics = self.loss(params, batch, rng, train=False)
    return dict(metrics, loss=loss)

  def activated_params(self, total):
    """Parameters touched per token; dense models use all of them."""
    return total

  def sample_labels(self):
    cfg = self.config
    return sampling.class_grid_labels(cfg.data.num_classes, cfg.sample.per_class)

  def row_names(self):
    return None

  def make_iterator(self, split, *, global_batch_size, seed, train):
    """Per-process iterator of local batches (dicts of NumPy arrays) with get/set_state."""
    return data.make_iterator(self.config.data, split, global_batch_size=global_batch_size,
                              seed=seed, process_index=jax.process_index(),
                              process_count=jax.process_count(), train=train)
