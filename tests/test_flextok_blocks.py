"""FlexTok building blocks against hand-computed values and independent NumPy references:
FSQ, register masks / nested dropout, adaptive projected guidance, the bias-free and
no-affine Transformer block options."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import sampling
from jaxgen.errors import UserError
from jaxgen.models import layers
from jaxgen.models.fsq import FSQ
from jaxgen.objectives import repa
from jaxgen.models.registers import (causal_last_mask, nested_dropout, null_condition,
                                     sample_keep_k)


# ----------------------------------------------------------------------------- FSQ
def _grid(level):
  return np.linspace(-1.0, 1.0, level)  # the documented convention: 2k/(L-1) - 1


def test_fsq_sizes_and_grid():
  fsq = FSQ((8, 8, 8, 5, 5, 5))
  assert fsq.num_codes == 64000 and fsq.dim == 6
  z = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (4000, 6))
  codes = np.asarray(jax.jit(fsq.quantize)(z))
  for i, level in enumerate(fsq.levels):
    dist = np.abs(codes[:, i, None] - _grid(level)[None]).min(axis=1)
    assert dist.max() < 1e-6  # every value on the grid ...
    hit = np.abs(codes[:, i, None] - _grid(level)[None]).argmin(axis=1)
    assert set(hit) == set(range(level))  # ... and all L values reachable
  np.testing.assert_allclose(np.unique(np.round(codes[:, 3], 6)), [-1, -.5, 0, .5, 1])
  np.testing.assert_allclose(np.unique(np.round(codes[:, 0], 6)),
                             np.array([-7, -5, -3, -1, 1, 3, 5, 7]) / 7, atol=1e-6)


def test_fsq_hand_computed_levels_8_5_3():
  fsq = FSQ([8, 5, 3])
  z = jnp.array([[0.3, -0.6, 0.9], [0.0, 0.0, 0.0], [10.0, 10.0, 10.0], [-10.0, -10.0, -10.0]])
  codes, indices = jax.jit(fsq.__call__)(z)
  # L=8: shift = atanh(0.5 / (0.999 * 3.5)) = 0.144; 0.999 tanh(0.444) = 0.4166;
  #      digit round(1.4166 * 3.5) = round(4.96) = 5 -> 2*5/7 - 1 = 3/7.
  # L=5: 0.999 tanh(-0.6) = -0.5365; digit round(0.4635 * 2) = 1 -> -0.5.
  # L=3: 0.999 tanh(0.9) = 0.7156; digit round(1.7156) = 2 -> 1.
  # index = 5 + 1*8 + 2*(8*5) = 93. z = 0 sits on digit L//2: (4, 2, 1) -> 4 + 16 + 40 = 60.
  expect = np.array([[3 / 7, -0.5, 1.0], [1 / 7, 0.0, 0.0], [1, 1, 1], [-1, -1, -1]])
  np.testing.assert_allclose(codes, expect, atol=1e-6)
  np.testing.assert_array_equal(indices, [93, 60, 119, 0])
  assert indices.dtype == jnp.int32 and codes.dtype == jnp.float32
  # Mixed radix, first channel least significant.
  np.testing.assert_allclose(fsq.indices_to_codes(jnp.array([1, 8, 40])),
                             [[-5 / 7, -1, -1], [-1, -0.5, -1], [-1, -1, 0]], atol=1e-6)


def test_fsq_indices_roundtrip_all_codes():
  fsq = FSQ((8, 8, 8, 5, 5, 5))
  all_idx = jnp.arange(fsq.num_codes, dtype=jnp.int32)
  codes = fsq.indices_to_codes(all_idx)
  assert codes.shape == (64000, 6)
  to_indices = jax.jit(fsq.codes_to_indices)
  np.testing.assert_array_equal(to_indices(codes), all_idx)
  # The full grid built independently (itertools product) maps one-to-one onto 0..N-1.
  grid = np.array(list(itertools.product(*[_grid(l) for l in fsq.levels])), np.float32)
  idx = np.asarray(to_indices(jnp.asarray(grid)))
  np.testing.assert_array_equal(np.sort(idx), np.arange(64000))
  assert np.unique(np.asarray(codes).round(5), axis=0).shape == (64000, 6)  # all distinct


def test_fsq_straight_through_gradient():
  fsq = FSQ((8, 8, 8, 5, 5, 5))
  z = 1.5 * jax.random.normal(jax.random.PRNGKey(1), (4, 6))
  w = jax.random.normal(jax.random.PRNGKey(2), (4, 6))
  grad, dbound = jax.jit(lambda z: (
      jax.grad(lambda z: jnp.sum(fsq.quantize(z) * w))(z),
      jax.grad(lambda z: jnp.sum(fsq.bound(z)))(z)))(z)  # bound is elementwise: its diagonal
  np.testing.assert_allclose(grad, w * dbound, rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(dbound).min()) > 0


# ----------------------------------------------------------------------- registers
def test_causal_last_mask_matches_loop():
  p, r = 4, 3
  ref = np.zeros((p + r, p + r), bool)
  for i in range(p + r):
    for j in range(p + r):
      if i < p:
        ref[i, j] = j < p
      else:
        ref[i, j] = j < p or j <= i
  mask = np.asarray(causal_last_mask(p, r))
  np.testing.assert_array_equal(mask, ref)
  assert mask[0, 3] and not mask[0, 4]  # patch sees patches, no register
  assert mask[4, 0] and mask[4, 4] and not mask[4, 5]  # first register: patches + itself
  assert mask[6, 4] and mask[6, 5] and mask[6, 6]  # last register sees every register


@pytest.mark.parametrize('n', [8, 6, 1])
def test_sample_keep_k_modes(n):
  draws = 4000
  allowed = {'uniform': set(range(1, n + 1)),
             'pow2': {1, 2, 4, 8} if n == 8 else ({1, 2, 4, 6} if n == 6 else {1}),
             'pow2_ceil': {1, 2, 4, 8} if n == 8 else ({1, 2, 4, 6} if n == 6 else {1})}
  for mode, values in allowed.items():
    k = sample_keep_k(jax.random.PRNGKey(3), draws, n, mode)
    assert k.shape == (draws,) and k.dtype == jnp.int32
    assert set(np.asarray(k).tolist()) == values, mode  # in range and every value drawn
  if n == 8:  # pow2_ceil: ceil of uniform 1..8 -> 1, 2, 4, 8 with 1/8, 1/8, 2/8, 4/8
    k = np.asarray(sample_keep_k(jax.random.PRNGKey(4), draws, n, 'pow2_ceil'))
    freq = np.array([np.mean(k == v) for v in (1, 2, 4, 8)])
    np.testing.assert_allclose(freq, [1 / 8, 1 / 8, 2 / 8, 4 / 8], atol=0.03)
  with pytest.raises(ValueError, match='uniform, pow2, pow2_ceil'):
    sample_keep_k(jax.random.PRNGKey(0), 2, n, 'pow3')


def test_nested_dropout_and_null_condition():
  rng = np.random.default_rng(0)
  b, r, d = 3, 5, 4
  regs = rng.normal(size=(b, r, d)).astype(np.float32)
  token = rng.normal(size=(d,)).astype(np.float32)
  keep_k = np.array([1, 5, 3], np.int32)
  ref = regs.copy()
  for i in range(b):
    for j in range(r):
      if j >= keep_k[i]:
        ref[i, j] = token
  np.testing.assert_array_equal(nested_dropout(jnp.asarray(regs), jnp.asarray(keep_k),
                                               jnp.asarray(token)), ref)
  drop = np.array([False, True, False])
  out = np.asarray(null_condition(jnp.asarray(regs), jnp.asarray(drop), jnp.asarray(token)))
  np.testing.assert_array_equal(out[1], np.broadcast_to(token, (r, d)))
  np.testing.assert_array_equal(out[[0, 2]], regs[[0, 2]])


# ----------------------------------------------------------------------------- APG
def _apg_numpy(cond, uncond, scale, buf, momentum, threshold, eta):
  """Independent float64 reference, one example at a time."""
  guided, new_buf, clipped = np.zeros_like(cond), np.zeros_like(cond), []
  for i in range(cond.shape[0]):
    c, u = cond[i].ravel(), uncond[i].ravel()
    avg = (c - u) + momentum * buf[i].ravel()
    diff = avg.copy()
    norm = np.linalg.norm(diff)
    clipped.append(threshold > 0 and norm > threshold)
    if clipped[-1]:
      diff = diff * threshold / norm
    unit = c / np.linalg.norm(c)
    par = np.dot(diff, unit) * unit
    guided[i] = (c + (scale - 1) * ((diff - par) + eta * par)).reshape(cond[i].shape)
    new_buf[i] = avg.reshape(cond[i].shape)
  return guided, new_buf, clipped


@pytest.mark.parametrize('diff_scale,expect_clip', [(1.0, True), (0.05, False)])
@pytest.mark.parametrize('eta', [0.0, 0.3])
def test_apg_matches_numpy_three_steps(diff_scale, expect_clip, eta):
  rng = np.random.default_rng(5)
  shape = (2, 4, 4, 3)
  buf, buf_ref = jnp.zeros(shape, jnp.float32), np.zeros(shape)
  step = jax.jit(lambda c, u, b: sampling.apg_update(c, u, 7.5, b, eta=eta))
  for _ in range(3):
    cond = rng.normal(size=shape)
    uncond = cond + diff_scale * rng.normal(size=shape)
    guided, buf = step(jnp.asarray(cond, jnp.float32), jnp.asarray(uncond, jnp.float32), buf)
    ref, buf_ref, clipped = _apg_numpy(cond, uncond, 7.5, buf_ref, -0.5, 2.5, eta)
    assert all(c == expect_clip for c in clipped)
    np.testing.assert_allclose(guided, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(buf, buf_ref, rtol=1e-5, atol=1e-5)
    assert buf.dtype == jnp.float32


def test_apg_reduces_to_cfg():
  rng = np.random.default_rng(6)
  cond, uncond = (jnp.asarray(rng.normal(size=(3, 8, 2)), jnp.float32) for _ in range(2))
  guided, buf = sampling.apg_update(cond, uncond, 4.0, None, momentum=0.0, norm_threshold=0.0,
                                    eta=1.0)
  # cond + (s - 1)(cond - uncond) = uncond + s (cond - uncond)
  np.testing.assert_allclose(guided, uncond + 4.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(buf, cond - uncond, rtol=1e-6)


# --------------------------------------------------------------- layer options
def _param_names(params):
  return sorted('/'.join(k.key for k in path)
                for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def test_block_default_param_tree_unchanged():
  x = jnp.zeros((1, 3, 8))
  params = jax.eval_shape(layers.TransformerBlock(2, 16).init, jax.random.PRNGKey(0), x)
  params = nn.meta.unbox(params['params'])
  attn = [f'attn/{n}_{w}' for n in ('key', 'out', 'query', 'value') for w in ('bias', 'kernel')]
  norms = [f'norm{i}/LayerNorm_0/{w}' for i in (1, 2) for w in ('bias', 'scale')]
  assert _param_names(params) == sorted(
      attn + ['mlp/fc1/bias', 'mlp/fc1/kernel', 'mlp/fc2/bias', 'mlp/fc2/kernel'] + norms)


@pytest.mark.parametrize('mlp_kind', ['gelu', 'swiglu'])
def test_block_without_bias_has_no_bias_or_scale(mlp_kind):
  block = layers.TransformerBlock(2, 16, mlp_kind, qk_norm=True, use_bias=False,
                                  norm_affine=False)
  params = jax.eval_shape(block.init, jax.random.PRNGKey(0), jnp.zeros((1, 3, 8)))
  mlp = ['mlp/fc1/kernel', 'mlp/fc2/kernel'] if mlp_kind == 'gelu' else \
      ['mlp/fc2/kernel', 'mlp/gate/kernel', 'mlp/up/kernel']
  # QK-norm keeps its own affine LayerNorms; only the block's pre-norms lose theirs.
  qk = [f'attn/{n}_norm/LayerNorm_0/{w}' for n in ('k', 'q') for w in ('bias', 'scale')]
  kernels = [f'attn/{n}_kernel' for n in ('key', 'out', 'query', 'value')]
  assert _param_names(nn.meta.unbox(params['params'])) == sorted(kernels + qk + mlp)


def test_block_without_bias_equals_zero_bias_block():
  """Same function as the default block with zero biases and unit scales (its init values)."""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 8))
  block = layers.TransformerBlock(2, 16, use_bias=False, norm_affine=False)
  full = layers.TransformerBlock(2, 16)

  @jax.jit
  def both(x):  # one compile; the default block takes the bias-free block's kernels
    params = block.init(jax.random.PRNGKey(0), x)['params']
    flat = {'/'.join(k.key for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]}
    full_params = jax.tree_util.tree_map_with_path(
        lambda path, v: flat.get('/'.join(k.key for k in path), v),
        nn.meta.unbox(full.init(jax.random.PRNGKey(0), x)['params']))
    return block.apply({'params': params}, x), full.apply({'params': full_params}, x)

  out, ref = both(x)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_repa_pooling_and_alignment_match_numpy():
  rng = np.random.default_rng(0)
  maps = rng.normal(size=(2, 8, 8, 5))
  pooled = np.asarray(repa.pool_to_patches(jnp.asarray(maps), 4))
  want = np.stack([[maps[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(0, 1))
                    for i in range(4) for j in range(4)] for b in range(2)])
  np.testing.assert_allclose(pooled, want, atol=1e-6)
  h, y = rng.normal(size=(2, 16, 5)), rng.normal(size=(2, 16, 5))
  cos = [np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)
         for a, b in zip(h.reshape(-1, 5), y.reshape(-1, 5))]
  np.testing.assert_allclose(float(repa.alignment(jnp.asarray(h), jnp.asarray(y))),
                             np.mean(cos), rtol=1e-5)
  assert float(repa.alignment(jnp.asarray(y) * 3.0, jnp.asarray(y))) == pytest.approx(1.0)
  with pytest.raises(UserError, match='patch grid'):
    repa.pool_to_patches(jnp.zeros((1, 6, 6, 2)), 4)
