"""The FID Inception-v3 (`pt_inception-2015-12-05`, as in pytorch-fid / torch-fidelity) in Flax.

torchvision's Inception3 layout with the FID blocks of the original TensorFlow graph:
the average pools of blocks A, C and E_1 leave the zero padding out of their count, and
the last block (E_2) max-pools its pool branch. Module names follow the torch state-dict
keys (`Mixed_5b.branch1x1.conv.weight` is params['Mixed_5b']['branch1x1']['conv']
['kernel']), so loading the weights is a mechanical re-layout.

    variables = load_inception('pt_inception-2015-12-05-6726825d.pth')   # or a converted .npz
    out = jax.jit(inception_features)(variables, images)   # images in [-1, 1], NHWC
    out['pool']     # [B, 2048] features for FID / precision-recall
    out['logits']   # [B, 1008] for the Inception Score
"""
import functools
from typing import Dict, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import torch_weights
from jaxgen.errors import UserError

SIZE = 299  # pytorch-fid resizes every input to 299x299
NUM_LOGITS = 1008
HIGHEST = jax.lax.Precision.HIGHEST  # FID features are compared across papers: no TF32/bf16
WEIGHTS_HINT = ('pass the pt_inception-2015-12-05 state dict or an .npz made by '
                'scripts/convert_torch_weights.py')

IntPair = Union[int, Tuple[int, int]]


def _pair(v: IntPair) -> Tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm(eps 1e-3, running statistics) -> ReLU."""
  features: int
  kernel: IntPair
  stride: int = 1
  padding: IntPair = 0

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel), (self.stride, self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=HIGHEST,
                name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def avg_pool_3x3_exclude_pad(x):
  """3x3 / stride 1 / pad 1 average over the in-image pixels only (count_include_pad=False)."""
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3(x, stride=2, pad=0):
  return nn.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


class FIDInceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, 1, name='branch1x1')(x)
    b5 = BasicConv2d(48, 1, name='branch5x5_1')(x)
    b5 = BasicConv2d(64, 5, padding=2, name='branch5x5_2')(b5)
    b3 = BasicConv2d(64, 1, name='branch3x3dbl_1')(x)
    b3 = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_2')(b3)
    b3 = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_3')(b3)
    bp = BasicConv2d(self.pool_features, 1, name='branch_pool')(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, 3, stride=2, name='branch3x3')(x)
    bd = BasicConv2d(64, 1, name='branch3x3dbl_1')(x)
    bd = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = BasicConv2d(96, 3, stride=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, max_pool_3x3(x)], axis=-1)


class FIDInceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, 1, name='branch1x1')(x)
    b7 = BasicConv2d(c7, 1, name='branch7x7_1')(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv2d(c7, 1, name='branch7x7dbl_1')(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv2d(192, 1, name='branch_pool')(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, 1, name='branch3x3_1')(x)
    b3 = BasicConv2d(320, 3, stride=2, name='branch3x3_2')(b3)
    b7 = BasicConv2d(192, 1, name='branch7x7x3_1')(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv2d(192, 3, stride=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, max_pool_3x3(x)], axis=-1)


class FIDInceptionE(nn.Module):
  """E_1 (`max_pool=False`, Mixed_7b) average-pools without padding; E_2 (Mixed_7c) max-pools."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    def split_1x3_3x1(y, prefix):  # the two asymmetric convs side by side
      return jnp.concatenate([
          BasicConv2d(384, (1, 3), padding=(0, 1), name=prefix + 'a')(y),
          BasicConv2d(384, (3, 1), padding=(1, 0), name=prefix + 'b')(y)], axis=-1)

    b1 = BasicConv2d(320, 1, name='branch1x1')(x)
    b3 = split_1x3_3x1(BasicConv2d(384, 1, name='branch3x3_1')(x), 'branch3x3_2')
    bd = BasicConv2d(448, 1, name='branch3x3dbl_1')(x)
    bd = BasicConv2d(384, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = split_1x3_3x1(bd, 'branch3x3dbl_3')
    pooled = max_pool_3x3(x, 1, 1) if self.max_pool else avg_pool_3x3_exclude_pad(x)
    bp = BasicConv2d(192, 1, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """x: [B, H, W, 3] float32 already scaled to [-1, 1] (H, W >= 75) -> pool and logits."""

  @nn.compact
  def __call__(self, x):
    x = BasicConv2d(32, 3, stride=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv2d(32, 3, name='Conv2d_2a_3x3')(x)
    x = BasicConv2d(64, 3, padding=1, name='Conv2d_2b_3x3')(x)
    x = max_pool_3x3(x)
    x = BasicConv2d(80, 1, name='Conv2d_3b_1x1')(x)
    x = BasicConv2d(192, 3, name='Conv2d_4a_3x3')(x)
    x = max_pool_3x3(x)
    for name, pool_features in (('Mixed_5b', 32), ('Mixed_5c', 64), ('Mixed_5d', 64)):
      x = FIDInceptionA(pool_features, name=name)(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = FIDInceptionC(c7, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = FIDInceptionE(max_pool=False, name='Mixed_7b')(x)
    x = FIDInceptionE(max_pool=True, name='Mixed_7c')(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_LOGITS, precision=HIGHEST, name='fc')(pool)
    return {'pool': pool, 'logits': logits}


# ----------------------------------------------------------------------------
# Input handling (as pytorch-fid)
# ----------------------------------------------------------------------------
def resize_bilinear(images, size: int = SIZE):
  """Bilinear resize of NHWC images to size x size with torch's align_corners=False
  semantics and no antialiasing (F.interpolate(mode='bilinear') in pytorch-fid)."""
  b, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  return jax.image.resize(images, (b, size, size, c), 'bilinear', antialias=False)


def preprocess(images):
  """[B, H, W, 1 or 3] in [-1, 1] -> [B, 299, 299, 3] float32, the network's input."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise UserError(f'inception: need NHWC images with 1 or 3 channels, got shape '
                    f'{images.shape}')
  x = jnp.asarray(images, jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)  # grayscale -> RGB, as converting to an RGB PIL image does
  return resize_bilinear(x)


def inception_features(variables, images) -> Dict[str, jax.Array]:
  """{'pool': [B, 2048], 'logits': [B, 1008]} float32 of images in [-1, 1] NHWC (jittable)."""
  return InceptionV3().apply(variables, preprocess(images))


# ----------------------------------------------------------------------------
# torch state dict <-> Flax variables
# ----------------------------------------------------------------------------
# Flax leaf -> (torch leaf name, collection); conv kernels are HWIO here, OIHW in torch,
# and the fc kernel is the transpose of torch's [out, in] weight.
_LEAVES = {
    ('conv', 'kernel'): ('weight', 'params'),
    ('bn', 'scale'): ('weight', 'params'), ('bn', 'bias'): ('bias', 'params'),
    ('bn', 'mean'): ('running_mean', 'batch_stats'),
    ('bn', 'var'): ('running_var', 'batch_stats'),
    ('fc', 'kernel'): ('weight', 'params'), ('fc', 'bias'): ('bias', 'params'),
}


def _to_torch_layout(flax_path, a):
  if flax_path[-2:] == ('conv', 'kernel'):
    return np.transpose(a, (3, 2, 0, 1))  # HWIO -> OIHW
  return a.T if flax_path[-2:] == ('fc', 'kernel') else a


def _from_torch_layout(flax_path, a):
  if flax_path[-2:] == ('conv', 'kernel'):
    return np.transpose(a, (2, 3, 1, 0))  # OIHW -> HWIO
  return a.T if flax_path[-2:] == ('fc', 'kernel') else a


@functools.lru_cache(maxsize=None)
def _layout() -> Tuple[Tuple[str, str, Tuple[str, ...], Tuple[int, ...]], ...]:
  """(torch key, collection, flax path, torch shape) of every weight, from the module itself."""
  shapes = jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32))
  rows = []
  for collection in ('params', 'batch_stats'):
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes[collection])[0]:
      names = tuple(p.key for p in path)
      torch_leaf, coll = _LEAVES[names[-2:]]
      assert coll == collection, names
      torch_shape = _to_torch_layout(names, np.empty(leaf.shape, np.int8)).shape
      rows.append(('.'.join(names[:-1] + (torch_leaf,)), collection, names, torch_shape))
  return tuple(sorted(rows))


def expected_state_dict_shapes() -> Dict[str, Tuple[int, ...]]:
  """Every torch state-dict key the network needs, with its torch shape (num_batches_tracked
  counters are not needed and ignored)."""
  return {key: shape for key, _, _, shape in _layout()}


def state_dict_to_params(state) -> Tuple[dict, dict]:
  """(params, batch_stats) float32 trees from a torch-layout state dict (already checked)."""
  trees = {'params': {}, 'batch_stats': {}}
  for key, collection, names, _ in _layout():
    node = trees[collection]
    for n in names[:-1]:
      node = node.setdefault(n, {})
    node[names[-1]] = jnp.asarray(_from_torch_layout(names, np.asarray(state[key], np.float32)))
  return trees['params'], trees['batch_stats']


def load_state(path: str) -> Dict[str, np.ndarray]:
  """The torch-key dict of a .pth / .npz, checked against `expected_state_dict_shapes`."""
  state = torch_weights.load_state_dict(path)
  torch_weights.check_state_dict(state, expected_state_dict_shapes(),
                                 f'Inception weights {path}', WEIGHTS_HINT)
  return state


def load_inception(path: str) -> dict:
  """Variables {'params', 'batch_stats'} from a pt_inception-2015-12-05 .pth or converted .npz."""
  params, batch_stats = state_dict_to_params(load_state(path))
  return {'params': params, 'batch_stats': batch_stats}
