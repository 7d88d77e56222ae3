"""One interface for perceptual distances (tokenizer losses) and the feature maps behind them.

    perceptual = make_perceptual('fmnist_classifier')                 # offline default
    perceptual = make_perceptual('lpips_vgg16', vgg_path=..., lin_path=...)
    d = perceptual.distance(x, y)      # [B], images in [-1, 1] NHWC
    maps = perceptual.features(x)      # list of [B, H, W, C] activations (e.g. a REPA target)

`Perceptual` is a pytree whose only leaves are the network's variables, so it can be passed
into a jitted loss as an argument (its functions are static).
"""
import inspect
import os
from typing import Any, Callable, Dict, Optional

import flax.struct
import jax
import jax.numpy as jnp

from jaxgen.errors import UserError


@flax.struct.dataclass
class Perceptual:
  """`distance_fn(variables, x, y) -> [B]`, `features_fn(variables, images) -> [maps]`."""
  name: str = flax.struct.field(pytree_node=False)
  variables: Any
  distance_fn: Callable = flax.struct.field(pytree_node=False)
  features_fn: Optional[Callable] = flax.struct.field(pytree_node=False, default=None)

  def distance(self, x, y) -> jax.Array:
    if x.shape != y.shape:
      raise UserError(f'perceptual {self.name!r}: need two image batches of one shape, got '
                      f'{tuple(x.shape)} and {tuple(y.shape)}')
    return _distance(self, x, y)

  def features(self, images):
    if self.features_fn is None:
      raise UserError(f'perceptual {self.name!r} exposes no feature maps; use '
                      "make_perceptual('fmnist_classifier') or 'lpips_vgg16'")
    return _features(self, images)


# Jitted (also when called eagerly, where op-by-op dispatch of a whole network is slow); inside
# an outer jit they simply inline. The functions are static fields: one compile per network.
@jax.jit
def _distance(perceptual, x, y):
  return perceptual.distance_fn(perceptual.variables, x, y)


@jax.jit
def _features(perceptual, images):
  return perceptual.features_fn(perceptual.variables, images)


def unit_channels(f, eps=1e-10):
  """Each pixel's feature vector divided by its L2 norm (LPIPS's normalisation)."""
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


def tap_distance(taps_x, taps_y) -> jax.Array:
  """[B] mean over taps of mean_{h,w,c} (n(fx) - n(fy))^2: LPIPS with uniform heads."""
  per_tap = [jnp.mean((unit_channels(fx) - unit_channels(fy)) ** 2, axis=(1, 2, 3))
             for fx, fy in zip(taps_x, taps_y)]
  return sum(per_tap) / len(per_tap)


# ----------------------------------------------------------------------------
# 'fmnist_classifier': the offline default
# ----------------------------------------------------------------------------
def fmnist_distance(variables, x, y) -> jax.Array:
  from jaxgen.metrics.fmnist_net import fmnist_taps
  # Two passes (not one over concat([x, y])): bitwise d(x, x) == 0 and d(x, y) == d(y, x).
  return tap_distance(fmnist_taps(variables, x), fmnist_taps(variables, y))


def _fmnist_features(variables, images):
  from jaxgen.metrics.fmnist_net import fmnist_taps
  return fmnist_taps(variables, images)


def _make_fmnist(path=None, data_dir=None, variables=None):
  """Weights from `variables`, a .msgpack `path`, or the cache in `data_dir` (default: the
  data config's, i.e. $JAXGEN_DATA_DIR or ~/.cache/jaxgen/tfds)."""
  from jaxgen.metrics import fmnist_net
  if variables is None:
    if path is None:
      from jaxgen.data.config import default_data_config
      cfg = default_data_config()
      if data_dir is not None:
        cfg.data_dir = os.path.expanduser(os.fspath(data_dir))
      path = fmnist_net.classifier_path(cfg)
    variables = fmnist_net.read_classifier_file(os.fspath(path))[0]
  return Perceptual('fmnist_classifier', variables, fmnist_distance, _fmnist_features)


# ----------------------------------------------------------------------------
# 'lpips_vgg16': LPIPS with torch weights (jaxgen/models/lpips.py)
# ----------------------------------------------------------------------------
def _lpips_distance(variables, x, y):
  from jaxgen.models import lpips
  return lpips.lpips_distance(variables, x, y)


def _lpips_features(variables, images):
  from jaxgen.models import lpips
  return lpips.VGG16Taps().apply({'params': variables['vgg']}, lpips._prepare(images))


def _make_lpips(vgg_path=None, lin_path=None):
  if not vgg_path:
    raise UserError("perceptual 'lpips_vgg16' needs weights: pass vgg_path= (torchvision vgg16 "
                    ".pth) and lin_path= (lpips v0.1 vgg.pth), or vgg_path= one .npz from "
                    'scripts/convert_torch_weights.py lpips')
  from jaxgen.models import lpips  # Lazy: the torch-weights stack loads only when asked for.
  return Perceptual('lpips_vgg16', lpips.load_lpips(vgg_path, lin_path), _lpips_distance,
                    _lpips_features)


_REGISTRY: Dict[str, Callable[..., Perceptual]] = {
    'fmnist_classifier': _make_fmnist,
    'lpips_vgg16': _make_lpips,
}


def register_perceptual(name: str, factory: Callable[..., Perceptual]) -> None:
  """Adds a named factory (keyword arguments only, e.g. weight paths) to `make_perceptual`."""
  _REGISTRY[name] = factory


def perceptual_names():
  return sorted(_REGISTRY)


def make_perceptual(name: str = 'fmnist_classifier', **paths) -> Perceptual:
  """The perceptual distance `name`, its weights loaded from `paths` (factory keywords)."""
  if name not in _REGISTRY:
    raise UserError(f'unknown perceptual distance {name!r}; known: '
                    f'{", ".join(perceptual_names())}')
  factory = _REGISTRY[name]
  try:
    inspect.signature(factory).bind(**paths)
  except TypeError:
    known = ', '.join(inspect.signature(factory).parameters) or 'none'
    raise UserError(f'perceptual {name!r} takes the arguments {known}; got '
                    f'{", ".join(sorted(paths))}') from None
  return factory(**paths)


def perceptual_from_config(name: str, paths, data_dir: str) -> Perceptual:
  """make_perceptual from a config's net name and path fields: empty paths are dropped, and
  the FMNIST classifier with none given trains on (or loads from) the data dir's cache."""
  paths = {k: v for k, v in (paths or {}).items() if v}
  if name == 'fmnist_classifier' and not paths:
    paths = {'data_dir': data_dir}
  return make_perceptual(name, **paths)
