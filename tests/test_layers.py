"""Shared layers and the DiT against independent NumPy references and invariants."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.models import dit, layers


def test_sincos_embedding_matches_formula():
  width, grid = 16, 4
  emb = layers.sincos_2d_embedding(width, grid)
  assert emb.shape == (grid * grid, width)
  # Hand-computed: patch at row 2, col 3 -> index 11; channel j<4 encodes x=3 with omega_j.
  omega = 1.0 / 10000 ** (np.arange(4) / 4)
  expect = np.concatenate([np.sin(3 * omega), np.cos(3 * omega), np.sin(2 * omega),
                           np.cos(2 * omega)])
  np.testing.assert_allclose(emb[11], expect, rtol=1e-6)


def test_patchify_roundtrip_and_layout():
  x = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
  p = layers.patchify(jnp.asarray(x), 4)
  assert p.shape == (2, 4, 48)
  np.testing.assert_array_equal(p[0, 1], x[0, 0:4, 4:8].reshape(-1))  # row-major patch order
  np.testing.assert_array_equal(layers.unpatchify(p, 4, 3), x)


def test_attention_matches_numpy_float64():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 8)).astype(np.float32)
  mask = np.tril(np.ones((5, 5), bool))[None, None]
  attn = layers.Attention(num_heads=2)
  params = attn.init(jax.random.PRNGKey(0), x)['params']
  params = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32),
                        nn.meta.unbox(params))
  out = attn.apply({'params': params}, x, mask)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  q, k, v = (np.einsum('bld,dhk->blhk', x, p[n + '_kernel']) + p[n + '_bias']
             for n in ('query', 'key', 'value'))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(4)
  logits = np.where(mask, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  ref = np.einsum('bhqk,bkhd->bqhd', w, v)
  ref = np.einsum('blhk,hkd->bld', ref, p['out_kernel']) + p['out_bias']
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_swiglu_mlp_matches_numpy():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 3, 6)).astype(np.float32)
  mlp = layers.Mlp(hidden=10, kind='swiglu')
  params = nn.meta.unbox(mlp.init(jax.random.PRNGKey(1), x)['params'])
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  gate = x @ p['gate']['kernel']
  ref = (gate / (1 + np.exp(-gate)) * (x @ p['up']['kernel'])) @ p['fc2']['kernel']
  np.testing.assert_allclose(mlp.apply({'params': params}, x), ref, rtol=1e-4, atol=1e-5)


def _tiny_dit(**kw):
  args = dict(image_size=16, channels=1, patch_size=4, width=32, depth=2, num_heads=2,
              num_classes=10)
  args.update(kw)
  return dit.DiT(**args)


def _perturbed_params(model, x, t, y, scale=0.05):
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), x, t, y)['params'])
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  return jax.tree.unflatten(tree, [l + scale * jax.random.normal(k, l.shape)
                                   for l, k in zip(leaves, keys)])


def test_dit_adaln_zero_init_outputs_zero():
  model = _tiny_dit()
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 1))
  t, y = jnp.array([0.3, 0.7]), jnp.array([1, 2])
  params = model.init(jax.random.PRNGKey(0), x, t, y)['params']
  np.testing.assert_array_equal(model.apply({'params': params}, x, t, y), 0.0)


def test_dit_uses_positions_time_and_class():
  model = _tiny_dit()
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 1))
  t, y = jnp.array([0.3, 0.7]), jnp.array([1, 2])
  params = _perturbed_params(model, x, t, y)
  out = model.apply({'params': params}, x, t, y)
  assert out.shape == x.shape
  # Swap two patches of the input: without position information the output patches
  # would simply swap too.
  xp = x.at[:, 0:4, 0:4].set(x[:, 4:8, 4:8]).at[:, 4:8, 4:8].set(x[:, 0:4, 0:4])
  outp = model.apply({'params': params}, xp, t, y)
  swapped_back = outp.at[:, 0:4, 0:4].set(outp[:, 4:8, 4:8]).at[:, 4:8, 4:8].set(outp[:, 0:4, 0:4])
  assert float(jnp.abs(swapped_back - out).max()) > 1e-3
  assert float(jnp.abs(model.apply({'params': params}, x, t + 0.5, y) - out).max()) > 1e-3
  assert float(jnp.abs(model.apply({'params': params}, x, t, (y + 1) % 10) - out).max()) > 1e-3


def test_label_dropout_uses_null_class_at_rate():
  emb = layers.LabelEmbedder(num_classes=10, width=4, dropout=0.25)
  labels = jnp.zeros((20000,), jnp.int32)
  params = emb.init({'params': jax.random.PRNGKey(0)}, labels, train=False)['params']
  table = nn.meta.unbox(params)['embedding']
  assert table.shape == (11, 4)
  out = emb.apply({'params': params}, labels, train=True, rngs={'dropout': jax.random.PRNGKey(3)})
  null_rate = float(jnp.mean(jnp.all(out == table[10], axis=-1)))
  assert abs(null_rate - 0.25) < 0.015
  out_eval = emb.apply({'params': params}, labels, train=False)
  np.testing.assert_array_equal(out_eval, jnp.broadcast_to(table[0], out_eval.shape))


def test_dit_flops_match_paper_xl2():
  # DiT paper: XL/2 at 256px (32x32x4 latents) costs 118.6 GFLOPs (multiply-adds) per forward.
  fwd = dit.flops_per_example(image_size=32, patch_size=2, width=1152, depth=28, channels=4,
                              train=False)
  assert abs(fwd / 2 / 1e9 - 118.6) / 118.6 < 0.01


@pytest.mark.parametrize('mlp_kind', ['gelu', 'swiglu'])
def test_dit_flops_match_xla_cost_analysis(mlp_kind):
  """The analytic count against XLA's own count of the compiled forward pass."""
  kw = dict(image_size=16, patch_size=2, width=64, depth=2, channels=1, mlp_ratio=3.0)
  model = dit.DiT(num_heads=2, num_classes=10, mlp_kind=mlp_kind, **kw)
  x, t, y = jnp.zeros((1, 16, 16, 1)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), x, t, y)
  cost = jax.jit(model.apply).lower(params, x, t, y).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = dit.flops_per_example(mlp_kind=mlp_kind, train=False, **kw)
  # XLA also counts elementwise work (norms, activations, softmax): a few percent more.
  assert 1.0 <= cost['flops'] / analytic < 1.1, (cost['flops'], analytic)
