"""MoE layer: every dispatch path against a NumPy float64 reference (incl. capacity drops),
the balance loss and metrics, router gradients, and expert parallelism on a data=2 x
expert=4 mesh of simulated devices (sharded == unsharded, E/4 experts per device, all-to-all).

Parameters of the single-device tests are drawn with NumPy into the shapes of
`jax.eval_shape(init)`: random initialisers compile slowly on CPU, and it lets the
zero-initialised GELU biases be non-zero.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxgen import sharding, train_state
from jaxgen.models import experts, moe

B, L, D, H = 4, 8, 16, 32


def _params(module, x, seed=0, scale=0.5):
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), x)['params'])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (scale * rng.normal(size=s.shape)).astype(np.float32), shapes)


def _x(shape=(B, L, D), seed=1):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _apply(module, params, x):
  """Jitted forward: (y, {sow name: value})."""
  @jax.jit
  def f(p, x):
    y, state = module.apply({'params': p}, x, mutable=['intermediates'])
    return y, jax.tree.map(lambda v: v[0], dict(state['intermediates']),
                           is_leaf=lambda v: isinstance(v, tuple))
  return f(params, x)


# ----------------------------------------------------------------------------- NumPy reference


def _gelu(z):
  return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))


def _silu(z):
  return z / (1 + np.exp(-z))


def np_expert(p, kind, e, v):
  """Expert e of float64 weights p applied to v [..., D]."""
  if kind == 'swiglu':
    return (_silu(v @ p['wi_gate'][e]) * (v @ p['wi_up'][e])) @ p['wo'][e]
  return _gelu(v @ p['wi'][e] + p['bi'][e]) @ p['wo'][e] + p['bo'][e]


def np_moe(params, x, *, kind, num_experts, top_k, renormalize=False, num_shared=2,
           capacity=None, alpha=0.005):
  """Float64 reference, written independently of the layer (loops over assignments).

  capacity: per-batch-row expert capacity; assignments are admitted first-choice-first
  (all tokens' 1st choices in token order, then 2nd choices, ...), as GShard."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  b, l, d = x.shape
  xt = np.asarray(x, np.float64).reshape(b * l, d)
  logits = xt @ p['router']['kernel']
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  idx = np.argsort(-probs, axis=-1, kind='stable')[:, :top_k]
  w = np.take_along_axis(probs, idx, -1)
  if renormalize:
    w = w / w.sum(-1, keepdims=True)
  kept = np.ones_like(idx, bool)
  if capacity is not None:
    for g in range(b):
      used = np.zeros(num_experts, int)
      for k in range(top_k):
        for s in range(l):
          e = idx[g * l + s, k]
          kept[g * l + s, k] = used[e] < capacity
          used[e] += 1

  y = np.zeros_like(xt)
  for t in range(b * l):
    for k in range(top_k):
      if kept[t, k]:
        y[t] += w[t, k] * np_expert(p, kind, idx[t, k], xt[t])
  if num_shared:
    s = p['shared']
    if kind == 'swiglu':
      y += (_silu(xt @ s['gate']['kernel']) * (xt @ s['up']['kernel'])) @ s['fc2']['kernel']
    else:
      y += _gelu(xt @ s['fc1']['kernel'] + s['fc1']['bias']) @ s['fc2']['kernel'] + \
          s['fc2']['bias']
  counts = np.bincount(idx.reshape(-1), minlength=num_experts)
  f = num_experts * counts / idx.size
  stats = dict(
      moe_aux_loss=alpha * np.sum(probs.mean(0) * f),
      moe_router_entropy=np.mean(-np.sum(probs * np.log(probs), -1)),
      moe_expert_load=counts / idx.size,
      moe_dropped_fraction=np.mean(~kept),
      moe_topk_indices=idx.reshape(b, l, top_k))
  return y.reshape(b, l, d), stats


# ----------------------------------------------------------------------------- single device


@pytest.mark.parametrize('kind,renormalize', [('swiglu', False), ('gelu', True)])
def test_every_dispatch_matches_numpy_when_nothing_is_dropped(kind, renormalize):
  e, k = 4, 2
  x = _x()
  base = moe.MoE(num_experts=e, top_k=k, expert_hidden=H, expert_kind=kind,
                 renormalize=renormalize, capacity_factor=e / k, record_routing=True)
  params = _params(base, x)
  ref, stats = np_moe(params, x, kind=kind, num_experts=e, top_k=k, renormalize=renormalize)
  routes = set()
  # (dispatch, grouped_matmul, window_factor, spill_factor): the windows at the defaults, at
  # 1x the mean with a spill and with none, and at half the mean (spill or blocks).
  for dispatch, grouped, wf, sf in (('dense', 'windows', 1.25, 0.75),
                                    ('dropless', 'windows', 1.25, 0.75),
                                    ('dropless', 'windows', 1.0, 0.5),
                                    ('dropless', 'windows', 1.0, 0.0),
                                    ('dropless', 'windows', 0.5, 1.0),
                                    ('dropless', 'blocks', 1.25, 0.75),
                                    ('dropless', 'ragged_dot', 1.25, 0.75),
                                    ('capacity', 'windows', 1.25, 0.75)):
    label = f'{dispatch} {grouped} {wf} {sf}'
    y, sown = _apply(base.clone(dispatch=dispatch, grouped_matmul=grouped, window_factor=wf,
                                spill_factor=sf), params, x)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4, err_msg=label)
    assert float(sown['moe_dropped_fraction']) == 0.0, label
    np.testing.assert_array_equal(sown['moe_topk_indices'], stats['moe_topk_indices'])
    for name in ('moe_aux_loss', 'moe_router_entropy', 'moe_expert_load'):
      np.testing.assert_allclose(sown[name], stats[name], rtol=1e-5, err_msg=name)
    if (dispatch, grouped) == ('dropless', 'windows'):
      counts = np.round(stats['moe_expert_load'] * B * L * k).astype(int)
      route = _np_window_route(counts, B * L * k, wf, sf)
      routes.add(route)
      assert float(sown['moe_window_spill']) == float(route == 1), label
      assert float(sown['moe_window_overflow']) == float(route == 2), label
    else:
      assert 'moe_window_overflow' not in sown and 'moe_window_spill' not in sown
  assert routes == {0, 1, 2}  # each of windows alone, with the spill and blocks was run
  assert y.dtype == jnp.float32 and y.shape == x.shape
  # The reference really uses the (non-)renormalised weights: switching it changes the output.
  other, _ = np_moe(params, x, kind=kind, num_experts=e, top_k=k,
                    renormalize=not renormalize)
  assert np.abs(other - ref).max() > 1e-2


def _uneven_groups(kind):
  """Sorted rows of 4 experts with groups 0, 5, 17, 1 (empty, under, over and at one block of
  4) and 3 padding rows (sentinel id 4) that must come back as zeros: (xs, ids, sizes,
  params, float64 reference)."""
  sizes = np.array([0, 5, 17, 1])
  ids = np.concatenate([np.repeat(np.arange(4), sizes), [4, 4, 4]]).astype(np.int32)
  rng = np.random.default_rng(0)
  xs = rng.standard_normal((len(ids), D)).astype(np.float32)
  names = {'swiglu': ('wi_gate', 'wi_up', 'wo'), 'gelu': ('wi', 'bi', 'wo', 'bo')}[kind]
  shapes = {'wi_gate': (4, D, H), 'wi_up': (4, D, H), 'wi': (4, D, H), 'bi': (4, H),
            'wo': (4, H, D), 'bo': (4, D)}
  p = {n: (0.3 * rng.standard_normal(shapes[n])).astype(np.float32) for n in names}
  p64 = {n: v.astype(np.float64) for n, v in p.items()}
  ref = np.zeros_like(xs, np.float64)
  for r, e in enumerate(ids[:-3]):
    ref[r] = np_expert(p64, kind, e, xs[r].astype(np.float64))
  return xs, ids, sizes, p, ref


@pytest.mark.parametrize('kind', ['swiglu', 'gelu'])
def test_blocked_grouped_matmul_matches_numpy_on_uneven_groups(kind):
  xs, ids, sizes, p, ref = _uneven_groups(kind)
  layout = experts.block_layout(jnp.asarray(ids), jnp.asarray(sizes), 4)
  assert layout[2] == -(-len(ids) // 4) + 4 and list(layout[1][:6]) == [1, 1, 2, 2, 2, 2]
  y = experts.blocked_ffn(jnp.asarray(xs), jnp.asarray(ids), jnp.asarray(sizes), p, kind)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
  assert experts.block_size(1024, 8) == 64 and experts.block_size(10, 8) == 8


def _np_window_route(counts, rows, window_factor, spill_factor):
  """NumPy restatement of the windows' choice: 0 windows alone, 1 with the spill (of a
  quarter of the experts, at least 2), 2 blocks."""
  spill_experts = min(max(2, len(counts) // 4), len(counts))
  def rows_of(factor):
    return min(int(np.ceil(np.ceil(factor * rows / len(counts)) / 8) * 8), rows)
  window, spill = rows_of(window_factor), rows_of(spill_factor) if spill_factor else 0
  over = np.maximum(np.asarray(counts) - window, 0)
  if not over.any():
    return 0
  return 1 if (over > 0).sum() <= spill_experts and over.max() <= spill else 2


@pytest.mark.parametrize('kind', ['swiglu', 'gelu'])
def test_windows_spill_or_fall_back_to_blocks_when_groups_overflow(kind):
  xs, ids, sizes, p, ref = _uneven_groups(kind)  # groups 0, 5, 17, 1
  args = (jnp.asarray(xs), jnp.asarray(ids), jnp.asarray(sizes), p, kind)
  np.testing.assert_allclose(experts.windowed_ffn(*args, 17), ref, rtol=1e-4, atol=1e-4)
  # A window of 8 leaves rows 9-17 of the group of 17 to the spill (zeros without it).
  alone = experts.windowed_ffn(*args, 8)
  np.testing.assert_array_equal(alone[5 + 8:5 + 17], 0)
  np.testing.assert_allclose(alone[:5 + 8], ref[:5 + 8], rtol=1e-4, atol=1e-4)
  spill = experts.spill_ffn(*args, 8, 16)
  np.testing.assert_array_equal(spill[:5 + 8], 0)
  np.testing.assert_allclose(spill[5 + 8:5 + 17], ref[5 + 8:5 + 17], rtol=1e-4, atol=1e-4)
  target = np.random.default_rng(1).standard_normal(xs.shape).astype(np.float32)
  ref_grads = jax.grad(lambda xs, p: jnp.sum(
      experts.blocked_ffn(xs, args[1], args[2], p, kind) * target), argnums=(0, 1))(xs, p)
  # (window, spill rows, route): fits; one group spills; two groups spill; a spill too
  # small and no spill at all (blocks); a window of all rows (no cond at all).
  cases = ((17, 8, 0), (8, 16, 1), (1, 16, 1), (4, 8, 2), (8, 0, 2), (len(ids), 0, 0))
  for window, spill_rows, route in cases:
    assert int(experts.window_route(jnp.asarray(sizes), window, spill_rows)) == route
    f = lambda xs, p, w=window, s=spill_rows: experts.windows_or_blocks_ffn(
        xs, args[1], args[2], p, kind, w, s)
    label = f'window {window} spill {spill_rows}'
    np.testing.assert_allclose(jax.jit(f)(xs, p), ref, rtol=1e-4, atol=1e-4, err_msg=label)
    grads = jax.grad(lambda xs, p: jnp.sum(f(xs, p) * target), argnums=(0, 1))(xs, p)
    for a, b_ in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-4, err_msg=label)
  # Three groups over their window is past the spill's two experts: blocks. With 16 experts
  # the spill takes four.
  assert int(experts.window_route(jnp.asarray([9, 9, 9, 0]), 8, 64)) == 2
  assert [int(experts.window_route(jnp.asarray([9] * j + [0] * (16 - j)), 8, 64))
          for j in (4, 5)] == [1, 2]
  assert experts.window_rows(1024, 8, 1.5) == 192 and experts.window_rows(20, 8, 1.5) == 8
  assert experts.window_rows(16, 2, 1.5) == 16  # a window of all rows: no cond needed


@pytest.mark.parametrize('field,value,message', [
    ('dispatch', 'sparse', 'unknown MoE dispatch'), ('grouped_matmul', 'gmm', 'unknown grouped'),
    ('expert_kind', 'relu', 'unknown expert kind'), ('top_k', 5, 'top_k=5 must be'),
    ('window_factor', 0.0, 'window_factor=0.0 must be > 0'),
    ('spill_factor', -0.5, 'spill_factor=-0.5 must be >= 0')])
def test_bad_fields_name_the_problem(field, value, message):
  m = moe.MoE(num_experts=4, expert_hidden=H).clone(**{field: value})
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((B, L, D)))


def test_capacity_drops_the_lowest_priority_assignments():
  e, k = 4, 2
  x = _x(seed=2)
  m = moe.MoE(num_experts=e, top_k=k, expert_hidden=H, dispatch='capacity',
              capacity_factor=0.5, num_shared=0)
  capacity = math.ceil(0.5 * L * k / e)  # 2 slots per expert and batch row
  params = _params(m, x, seed=3)
  ref, stats = np_moe(params, x, kind='swiglu', num_experts=e, top_k=k, num_shared=0,
                      capacity=capacity)
  assert stats['moe_dropped_fraction'] > 0.2  # the test really drops assignments
  y, sown = _apply(m, params, x)
  np.testing.assert_allclose(float(sown['moe_dropped_fraction']),
                             stats['moe_dropped_fraction'], rtol=1e-6)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
  # Load is counted before dropping.
  np.testing.assert_allclose(sown['moe_expert_load'], stats['moe_expert_load'], rtol=1e-6)


def test_balance_loss_matches_numpy_float64_and_uniform_router_gives_alpha():
  e, k, alpha = 8, 2, 0.01
  x = _x(seed=4)
  m = moe.MoE(num_experts=e, top_k=k, expert_hidden=H, balance_coef=alpha, num_shared=0,
              dispatch='dense')
  params = _params(m, x, seed=5, scale=1.0)
  _, stats = np_moe(params, x, kind='swiglu', num_experts=e, top_k=k, num_shared=0,
                    alpha=alpha)
  _, sown = _apply(m, params, x)
  np.testing.assert_allclose(float(sown['moe_aux_loss']), stats['moe_aux_loss'], rtol=1e-5)
  # A collapsed router (expert 0 first for every token, ties -> expert 1 second) costs more.
  collapsed = {**params, 'router': {'kernel': np.zeros_like(params['router']['kernel'])}}
  collapsed['router']['kernel'][:, 0] = 1.0
  xp = np.abs(x)
  _, stats = np_moe(collapsed, xp, kind='swiglu', num_experts=e, top_k=k, num_shared=0,
                    alpha=alpha)
  _, sown = _apply(m, collapsed, xp)
  np.testing.assert_allclose(sown['moe_expert_load'], [0.5, 0.5] + [0] * (e - 2))
  np.testing.assert_allclose(float(sown['moe_aux_loss']), stats['moe_aux_loss'], rtol=1e-5)
  assert float(sown['moe_aux_loss']) > 2 * alpha
  # A zero router gives uniform probabilities: P_i = 1/E, sum_i f_i = E -> aux = alpha.
  params['router']['kernel'] = np.zeros_like(params['router']['kernel'])
  _, sown = _apply(m, params, x)
  np.testing.assert_allclose(float(sown['moe_aux_loss']), alpha, rtol=1e-6)
  np.testing.assert_allclose(float(sown['moe_router_entropy']), np.log(e), rtol=1e-6)


def test_gradients_reach_the_router_through_aux_loss_and_combine_weights():
  x = _x(seed=6)
  target = _x(seed=7)
  m = moe.MoE(num_experts=4, expert_hidden=H, dispatch='dropless', num_shared=0)
  params = _params(m, x, seed=8)

  def loss(p, use_aux, use_out):
    y, state = m.apply({'params': p}, x, mutable=['intermediates'])
    return use_out * jnp.sum(y * target) + use_aux * moe.aux_loss(state['intermediates'])

  grad = jax.jit(jax.grad(loss))
  g_aux = grad(params, 1.0, 0.0)['router']['kernel']
  g_out = grad(params, 0.0, 1.0)
  assert np.abs(g_aux).max() > 1e-6
  assert np.abs(g_out['router']['kernel']).max() > 1e-4
  assert all(np.abs(g_out[n]).max() > 1e-4 for n in ('wi_gate', 'wi_up', 'wo'))


def test_bf16_dropless_close_to_float32_and_keeps_dtype():
  x16 = jnp.asarray(_x(seed=9), jnp.bfloat16)  # same input (and so routing) in both runs
  x = np.asarray(x16, np.float32)
  m = moe.MoE(num_experts=4, expert_hidden=H, dispatch='dropless')
  params = _params(m, x, seed=10)
  y32, s32 = _apply(m, params, x)
  y16, s16 = _apply(m.clone(dtype=jnp.bfloat16), params, x16)
  assert y16.dtype == jnp.bfloat16
  assert s16['moe_aux_loss'].dtype == jnp.float32  # router and loss stay in float32
  np.testing.assert_allclose(s16['moe_aux_loss'], s32['moe_aux_loss'], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=0,
                             atol=0.03 * np.abs(y32).max())


def test_param_counts_match_the_module_and_the_paper_block():
  x = _x()
  for kind in ('swiglu', 'gelu'):
    for shared in (0, 2):
      m = moe.MoE(num_experts=8, expert_hidden=H, expert_kind=kind, num_shared=shared)
      n = sum(a.size for a in jax.tree.leaves(_params(m, x)))
      total, active = moe.moe_param_counts(D, 8, 2, H, shared, kind)
      assert total == n, (kind, shared)
      expert = 3 * D * H if kind == 'swiglu' else 2 * D * H + H + D
      assert total - active == 6 * expert
  # DiT-MoE-S/2-8E2A: per block MoE = router + 8 SwiGLU experts (4D) + shared SwiGLU (2D).
  total, active = moe.moe_param_counts(384, 8, 2, 4 * 384, 2)
  assert total == 384 * 8 + 8 * 3 * 384 * 1536 + 3 * 384 * 768
  assert active == 384 * 8 + 2 * 3 * 384 * 1536 + 3 * 384 * 768
  # With attention (4D^2+4D) and adaLN (6D^2+6D) x 12 blocks this is the paper's 199M / 71M.
  other = 4 * 384 ** 2 + 4 * 384 + 6 * 384 ** 2 + 6 * 384
  assert abs(12 * (total + other) / 199e6 - 1) < 0.02
  assert abs(12 * (active + other) / 71e6 - 1) < 0.02


def test_helpers_collect_over_layers():
  inter = {'block0': {'moe': {'moe_aux_loss': (1.0,), 'moe_router_entropy': (2.0,),
                              'moe_dropped_fraction': (0.0,),
                              'moe_expert_load': (jnp.array([0.5, 0.5]),)}},
           'block1': {'moe': {'moe_aux_loss': (3.0,), 'moe_router_entropy': (4.0,),
                              'moe_dropped_fraction': (0.5,),
                              'moe_expert_load': (jnp.array([1.0, 0.0]),)}}}
  assert moe.aux_loss(inter) == 4.0
  m = moe.routing_metrics(inter)
  assert m['moe_router_entropy'] == 3.0 and m['moe_dropped_fraction'] == 0.25
  np.testing.assert_allclose(m['moe_max_load'], 1.5)
  assert moe.aux_loss({}) == 0.0 and moe.routing_metrics({}) == {}


# ----------------------------------------------------------------------------- expert parallel


def _mesh(**axes):
  return sharding.make_mesh(ml_collections.ConfigDict(
      dict(dict(data=1, fsdp=1, expert=1, tensor=1), **axes)))


def _sharded_init(m, x, mesh, rules):
  with train_state.mesh_context(mesh, rules):
    boxed = jax.eval_shape(m.init, jax.random.PRNGKey(0), x)['params']
    shardings = sharding.tree_shardings(boxed, mesh, rules)
    return jax.jit(lambda r: nn.meta.unbox(m.init(r, x)['params']),
                   out_shardings=shardings)(jax.random.PRNGKey(0))


def _loss_fn(m, target):
  def loss(p, x):
    y, state = m.apply({'params': p}, x, mutable=['intermediates'])
    return jnp.sum(y * target) + moe.aux_loss(state['intermediates']), y
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_expert_parallel_equals_single_device():
  e = 8
  rules = sharding.rules_tuple(sharding.DEFAULT_RULES)
  mesh = _mesh(data=2, expert=4)
  x, target = _x((8, L, D), seed=11), _x((8, L, D), seed=12)
  base = moe.MoE(num_experts=e, expert_hidden=H, capacity_factor=e / 2, balance_coef=0.1)
  params = _sharded_init(base, x, mesh, rules)
  w = params['wi_gate']
  assert w.sharding.spec == jax.sharding.PartitionSpec('expert', None, None)
  assert {s.data.shape for s in w.addressable_shards} == {(e // 4, D, H)}
  with train_state.mesh_context(mesh, rules):  # the layer sees the mesh and its rules
    assert moe.expert_parallel_plan(e)[1:] == (('expert',), ('data', 'expert'))
  host_params = jax.device_get(params)
  for dispatch in ('dropless', 'capacity'):
    f = _loss_fn(base.clone(dispatch=dispatch), target)
    (ref_loss, ref_y), ref_g = f(host_params, x)
    with train_state.mesh_context(mesh, rules):
      xs = jax.device_put(x, sharding.batch_sharding(mesh))
      (loss, y), g = f(params, xs)
      hlo = f.lower(params, xs).compile().as_text()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=dispatch)
    np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-5, err_msg=dispatch)
    for a, b_ in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
      np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5, err_msg=dispatch)
    assert g['wi_gate'].sharding.spec[0] == 'expert'
    assert 'all-to-all' in hlo, dispatch


@pytest.mark.parametrize('grouped', ['windows', 'blocks', 'ragged_dot'])
def test_dropless_expert_parallel_with_fsdp_and_ragged_token_count(grouped):
  """fsdp=2 x expert=4: expert weights are also split over 'fsdp' (gathered inside
  shard_map); 6 tokens do not divide the 8 token shards (zero-padded)."""
  e = 8
  rules = sharding.rules_tuple(sharding.DEFAULT_RULES)
  mesh = _mesh(fsdp=2, expert=4)
  x = _x((1, 6, D), seed=13)
  m = moe.MoE(num_experts=e, expert_hidden=H, dispatch='dropless', grouped_matmul=grouped)
  params = _sharded_init(m, x, mesh, rules)
  assert {s.data.shape for s in params['wi_gate'].addressable_shards} == {(e // 4, D // 2, H)}
  ref, stats = np_moe(jax.device_get(params), x, kind='swiglu', num_experts=e, top_k=2)
  f = jax.jit(lambda p, x: m.apply({'params': p}, x))
  with train_state.mesh_context(mesh, rules):
    y = f(params, x)
    assert 'all-to-all' in f.lower(params, x).compile().as_text()
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
