"""LPIPS (Zhang et al. 2018) with the VGG16 backbone, in Flax, from local torch weights.

distance(x, y) = sum over five VGG taps k of mean_hw( w_k . (n(f_k(x)) - n(f_k(y)))^2 ),
where n() unit-normalises each pixel's feature vector and w_k >= 0 are the learned
1x1 "lin" heads. Inputs are images in [-1, 1] (what jaxgen produces), NHWC, >= 16x16.

    variables = load_lpips('vgg16-397923af.pth', 'lpips/weights/v0.1/vgg.pth')  # or one .npz
    d = jax.jit(lpips_distance)(variables, x, y)   # [B]
"""
from typing import Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import torch_weights
from jaxgen.errors import UserError

HIGHEST = jax.lax.Precision.HIGHEST
# torchvision vgg16 `features` indices of the convs, grouped by tap (relu1_2 ... relu5_3);
# a 2x2 max pool sits between the groups.
VGG_BLOCKS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS's ScalingLayer: the [-1, 1] input re-standardised like ImageNet inputs.
SHIFT = np.array([-.030, -.088, -.188], np.float32)
SCALE = np.array([.458, .448, .450], np.float32)
MIN_SIZE = 16  # four 2x2 pools before the last tap
WEIGHTS_HINT = ('pass the torchvision vgg16 state dict and the lpips v0.1 vgg.pth lin '
                'weights, or one .npz made by scripts/convert_torch_weights.py lpips')


class VGG16Taps(nn.Module):
  """The five ReLU outputs LPIPS compares; conv modules are named by torch index."""

  @nn.compact
  def __call__(self, x):
    taps = []
    for block, (indices, channels) in enumerate(zip(VGG_BLOCKS, VGG_CHANNELS)):
      if block:
        x = nn.max_pool(x, (2, 2), (2, 2))
      for i in indices:
        x = nn.relu(nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), precision=HIGHEST,
                            name=f'features_{i}')(x))
      taps.append(x)
    return taps


def normalize_channels(f, eps=1e-10):
  """Each pixel's feature vector divided by its L2 norm (+ eps, as LPIPS does)."""
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


def lpips_head(feats_x: Sequence[jax.Array], feats_y: Sequence[jax.Array],
               lin: Sequence[jax.Array]) -> jax.Array:
  """[B] distance from per-tap NHWC features and the lin head weights (each [C])."""
  total = 0.
  for fx, fy, w in zip(feats_x, feats_y, lin):
    diff = (normalize_channels(fx) - normalize_channels(fy)) ** 2
    total = total + jnp.mean(jnp.einsum('bhwc,c->bhw', diff, w, precision=HIGHEST), axis=(1, 2))
  return total


def preprocess(images):
  """[B, H, W, 1 or 3] in [-1, 1] -> LPIPS's scaled float32 RGB input."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise UserError(f'lpips: need NHWC images with 1 or 3 channels, got shape {images.shape}')
  if min(images.shape[1:3]) < MIN_SIZE:
    raise UserError(f'lpips: images of {images.shape[1]}x{images.shape[2]} are too small for '
                    f'VGG16\'s five taps: resize them to at least {MIN_SIZE}x{MIN_SIZE}')
  x = jnp.asarray(images, jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return (x - SHIFT) / SCALE


def lpips_distance(variables, x, y) -> jax.Array:
  """[B] LPIPS distances between image batches x and y in [-1, 1] NHWC (jittable)."""
  if x.shape != y.shape:
    raise UserError(f'lpips: need two batches of one shape, got {x.shape} and {y.shape}')
  n = x.shape[0]
  # One backbone pass over both batches.
  taps = VGG16Taps().apply({'params': variables['vgg']}, preprocess(jnp.concatenate([x, y])))
  return lpips_head([t[:n] for t in taps], [t[n:] for t in taps], variables['lin'])


# ----------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------
def expected_state_dict_shapes() -> Dict[str, Tuple[int, ...]]:
  """torch keys and shapes of the vgg16 `features` convs and the LPIPS lin heads."""
  shapes, cin = {}, 3
  for indices, channels in zip(VGG_BLOCKS, VGG_CHANNELS):
    for i in indices:
      shapes[f'features.{i}.weight'] = (channels, cin, 3, 3)
      shapes[f'features.{i}.bias'] = (channels,)
      cin = channels
  for k, channels in enumerate(VGG_CHANNELS):
    shapes[f'lin{k}.model.1.weight'] = (1, channels, 1, 1)
  return shapes


def state_dict_to_variables(state) -> dict:
  """{'vgg': Flax params of VGG16Taps, 'lin': five [C] head weights} from torch keys."""
  vgg = {}
  for indices in VGG_BLOCKS:
    for i in indices:
      w = np.asarray(state[f'features.{i}.weight'], np.float32)
      vgg[f'features_{i}'] = {'kernel': jnp.asarray(np.transpose(w, (2, 3, 1, 0))),  # OIHW->HWIO
                              'bias': jnp.asarray(np.asarray(state[f'features.{i}.bias'],
                                                             np.float32))}
  lin = [jnp.asarray(np.asarray(state[f'lin{k}.model.1.weight'], np.float32).reshape(-1))
         for k in range(len(VGG_CHANNELS))]
  return {'vgg': vgg, 'lin': lin}


def load_state(vgg_path: str, lin_path: Optional[str] = None) -> Dict[str, np.ndarray]:
  """The checked torch-key dict of the backbone and heads (from two files or one)."""
  state = dict(torch_weights.load_state_dict(vgg_path))
  what = f'LPIPS weights {vgg_path}'
  if lin_path:
    state.update(torch_weights.load_state_dict(lin_path))
    what += f' + {lin_path}'
  torch_weights.check_state_dict(state, expected_state_dict_shapes(), what, WEIGHTS_HINT)
  return state


def load_lpips(vgg_path: str, lin_path: Optional[str] = None) -> dict:
  """Variables for `lpips_distance` from torchvision's vgg16 .pth and lpips' vgg.pth
  (or a single .npz holding both)."""
  return state_dict_to_variables(load_state(vgg_path, lin_path))
