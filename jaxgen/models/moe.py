"""Sparse Mixture-of-Experts layer (DiT-MoE), a drop-in replacement for a transformer MLP.

    y = shared_mlp(x) + sum_{k < K} p_k(x) * expert_{i_k(x)}(x)

Router: linear D -> E (no bias), softmax over all E in float32, then top-k of the
probabilities. The combine weights p_k are the top-k probabilities themselves
(NOT renormalised, as DiT-MoE's norm_topk_prob=False) unless `renormalize=True`.
Shared experts (DeepSeek-MoE style) are ONE `layers.Mlp` of hidden num_shared * D.

Values sown into the 'intermediates' collection (apply with mutable=['intermediates'];
without it sow is a silent no-op and the balance loss is lost):
  'moe_aux_loss'          scalar, alpha * sum_i P_i f_i over ALL T = B*L tokens of the
                          (global) batch: P_i = mean softmax prob of expert i,
                          f_i = E * (share of the T*K assignments routed to i).
                          ADD IT TO THE TRAINING LOSS (see `aux_loss`).
  'moe_router_entropy'    scalar, mean over tokens of the softmax entropy (nats).
  'moe_expert_load'       [E], share of the T*K assignments routed to each expert
                          (before any capacity drop; sums to 1).
  'moe_dropped_fraction'  scalar, share of the T*K assignments dropped by the capacity
                          limit (always 0 for 'dropless' and 'dense').
  'moe_window_spill'      1.0 when 'dropless' with grouped_matmul 'windows' ran the spill
                          (a few experts overflowed their windows a little), and
  'moe_window_overflow'   1.0 when it ran the blocked fallback instead (only for that
                          combination; under expert parallelism the windows are per device
                          and this global criterion is approximate).
  'moe_topk_indices'      [B, L, K] int32 expert ids, only when `record_routing=True`.
Like every `sow`, each value is stored as a 1-tuple under the module's path, e.g.
intermediates['block3']['moe']['moe_aux_loss'] == (aux,). `aux_loss(intermediates)` sums
the loss over all MoE layers; `routing_metrics(intermediates)` averages the metrics.

Dispatch implementations (identical functions when nothing is dropped):
  'dense'     every expert on every token, combined with a [T, E] weight matrix that is
              zero outside the top-k. Reference for tests / tiny E; E x the FLOPs.
  'capacity'  GShard/Switch: groups = batch rows [G=B, S=L, D]; capacity
              C = min(S, ceil(capacity_factor * S * K / E)); slots assigned by a cumsum over
              priority-ordered assignments (every token's first choice before any second
              choice); dispatch/combine tensors [G, S, E, C]; expert inputs [E, G, C, D].
              Expert parallelism: the [E, G, C, D] activations are constrained to
              E over the 'expert' mesh axes and G over the remaining batch axes, while tokens
              arrive with G over all batch axes (incl. 'expert'), so XLA lowers the two
              re-shardings to all-to-alls. Assignments beyond capacity are dropped (their
              contribution is zero; the shared MLP still sees the token).
  'dropless'  sort-based: the T*K assignments are sorted by expert id, gathered, and the
              experts run as a grouped matmul over the group sizes; unsorted, weighted and
              summed over K. Never drops. The grouped matmul (grouped_matmul 'windows', the
              default, 'blocks' or 'ragged_dot') is in experts.py: 'windows' gives each expert
              a window of window_factor x the mean group size, runs the rows of the few
              experts (a quarter of E, at least 2) that overflow it in a spill of
              spill_factor x the mean, and runs 'blocks' instead on a step where that is not
              enough.
              Expert parallelism (a mesh is active, the 'expert' rule maps to mesh axes of
              total size n > 1 and n divides E): routing and the balance loss are computed
              on the global arrays; the expert computation runs in
              `jax.shard_map` where each device holds E/n experts (in_specs
              P('expert', None, None): 'fsdp'/'tensor' shards of the expert weights are
              all-gathered on entry) and its local tokens (tokens are split over the batch
              axes plus the expert axes; T is zero-padded to a multiple of that count).
              Each device packs its a = T_local*K assignments by destination device into a
              fixed [n, a, D] send buffer, exchanges it with `jax.lax.all_to_all` over the
              expert axes, sorts what it received by local expert id (padding rows get the
              sentinel id E/n, sort last and lie beyond the group sizes, so the grouped
              matmul leaves them zero), runs the grouped matmul, and a second all_to_all
              brings results back to the source, which un-permutes and combines them.
              Memory cost: the send and receive buffers are n x the local assignments
              (n * T_local * K * D per buffer, per device) because each destination slot must
              hold the worst case (all local assignments going to one device) to stay
              dropless with a fixed-shape all_to_all; 'ragged_dot' and 'blocks' then
              also run over n*a rows ('windows' over window_factor * a rows, plus the spill).
              `jax.lax.ragged_all_to_all` would avoid the padding but is UNIMPLEMENTED on
              XLA:CPU (jax 0.10.2: "HLO opcode ragged-all-to-all is not supported"), so it
              is not used. On XLA:CPU `ragged_dot` itself is expanded into a masked dense dot
              over all local experts (E/n x the useful FLOPs), hence the other two.
Routing uses `top_k` below (k rounds of argmax) instead of `jax.lax.top_k`: the SPMD
partitioner all-gathers the [T, E] operand of TopK, but keeps argmax token-sharded.
"""
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxgen import sharding as jsharding
from jaxgen.models import experts, layers

Dtype = Any

SOW_NAMES = ('moe_aux_loss', 'moe_router_entropy', 'moe_expert_load', 'moe_dropped_fraction',
             'moe_window_overflow', 'moe_topk_indices')
DISPATCHES = ('dropless', 'capacity', 'dense')
KINDS = ('swiglu', 'gelu')


# ----------------------------------------------------------------------------- routing


def top_k(probs, k):
  """Top-k over the last axis by k rounds of argmax ([T, E] -> values, ids [T, K]).

  Same result as jax.lax.top_k (ties go to the lower expert id), but the SPMD partitioner
  keeps the token axis sharded, whereas it all-gathers the [T, E] operand of TopK."""
  vals, ids, masked = [], [], probs
  for _ in range(k):
    i = jnp.argmax(masked, axis=-1)
    ids.append(i)
    vals.append(jnp.take_along_axis(probs, i[..., None], axis=-1)[..., 0])
    masked = jnp.where(jax.nn.one_hot(i, probs.shape[-1], dtype=bool), -jnp.inf, masked)
  return jnp.stack(vals, -1), jnp.stack(ids, -1).astype(jnp.int32)


# ----------------------------------------------------------------------------- dispatches


def dense_dispatch(x, idx, w, p, kind, num_experts):
  """x [T, D], idx/w [T, K] -> [T, D]: all experts on all tokens, masked combine."""
  t, d = x.shape
  combine = jnp.einsum('tke,tk->te', jax.nn.one_hot(idx, num_experts, dtype=w.dtype), w)
  ye = experts.batched_ffn(jnp.broadcast_to(x, (num_experts, t, d)), p, kind)  # [E, T, D]
  return jnp.einsum('etd,te->td', ye, combine.astype(ye.dtype))


def capacity_slots(idx, num_experts, capacity):
  """GShard slot assignment. idx [G, S, K] -> (one-hot expert [G,S,K,E],
  one-hot slot [G,S,K,C] (all-zero where dropped), kept [G,S,K] bool).

  Priority: all tokens' first choices, in token order, before any second choice."""
  g, s, k = idx.shape
  oh = jax.nn.one_hot(idx, num_experts, dtype=jnp.int32)  # [G, S, K, E]
  prio = oh.transpose(0, 2, 1, 3).reshape(g, k * s, num_experts)
  pos = jnp.cumsum(prio, axis=1) - 1
  pos = jnp.sum(pos * prio, axis=-1).reshape(g, k, s).transpose(0, 2, 1)  # [G, S, K]
  kept = pos < capacity
  return oh, jax.nn.one_hot(pos, capacity, dtype=jnp.int32), kept


def capacity_dispatch(x, idx, w, p, kind, num_experts, capacity, expert_spec=None):
  """x [G, S, D], idx/w [G, S, K] -> ([G, S, D], number of dropped assignments)."""
  oh, slot, kept = capacity_slots(idx, num_experts, capacity)
  dispatch = jnp.einsum('gske,gskc->gsec', oh, slot).astype(x.dtype)  # 0/1
  combine = jnp.einsum('gske,gskc,gsk->gsec', oh.astype(w.dtype), slot.astype(w.dtype), w)
  constrain = (lambda a: a) if expert_spec is None else (
      lambda a: jax.lax.with_sharding_constraint(a, expert_spec))
  xe = constrain(jnp.einsum('gsec,gsd->egcd', dispatch, x))  # all-to-all under EP
  ye = constrain(experts.batched_ffn(xe, p, kind))
  y = jnp.einsum('egcd,gsec->gsd', ye, combine.astype(ye.dtype))  # all-to-all back
  return y, jnp.sum(~kept)


def dropless_dispatch(x, idx, w, p, kind, num_experts, grouped='windows', window_factor=1.25,
                      spill_factor=0.75):
  """x [T, D], idx/w [T, K] -> [T, D]: sort by expert, grouped matmul, unsort (one device)."""
  t, k = idx.shape
  e_flat = idx.reshape(-1)
  order = jnp.argsort(e_flat, stable=True)
  ids = e_flat[order]
  xs = jnp.take(x, order // k, axis=0)
  group_sizes = jnp.zeros(num_experts, jnp.int32).at[ids].add(1)
  ys = experts.grouped_ffn(grouped, xs, ids, group_sizes, p, kind, t * k, window_factor,
                           spill_factor)
  y = jnp.take(ys, jnp.argsort(order), axis=0).reshape(t, k, -1)
  return jnp.einsum('tkd,tk->td', y, w.astype(y.dtype))


def _dropless_ep_local(x, idx, w, p, *, kind, num_experts, axis, n, grouped, window_factor,
                       spill_factor):
  """Per-device body of the expert-parallel dropless path (inside shard_map).

  x [t, D], idx/w [t, K] are this device's tokens; p holds its E/n experts."""
  t, k = idx.shape
  d = x.shape[-1]
  e_local = num_experts // n
  a = t * k
  e_flat = idx.reshape(-1)
  order = jnp.argsort(e_flat, stable=True)  # by destination device, then local expert
  e_sorted = e_flat[order]
  dest = e_sorted // e_local
  counts = jnp.zeros(n, jnp.int32).at[dest].add(1)
  starts = jnp.cumsum(counts) - counts
  slot = jnp.arange(a, dtype=jnp.int32) - starts[dest]
  # Send buffer [n, a]: row (j, s) holds sorted assignment starts[j] + s when s < counts[j].
  src = starts[:, None] + jnp.arange(a, dtype=jnp.int32)[None]
  valid = jnp.arange(a)[None] < counts[:, None]
  src = jnp.where(valid, src, 0)
  tok = order // k
  send_x = jnp.where(valid[..., None], jnp.take(x, jnp.take(tok, src), axis=0), 0)
  send_id = jnp.where(valid, jnp.take(e_sorted, src) % e_local, e_local)  # sentinel pads
  recv_x = jax.lax.all_to_all(send_x, axis, 0, 0, tiled=True).reshape(n * a, d)
  recv_id = jax.lax.all_to_all(send_id, axis, 0, 0, tiled=True).reshape(n * a)
  r_order = jnp.argsort(recv_id, stable=True)
  r_ids = recv_id[r_order]
  group_sizes = jnp.zeros(e_local, jnp.int32).at[r_ids].add(1, mode='drop')
  # On average a device receives as many real rows as it sent (a): the windows' scale.
  ys = experts.grouped_ffn(grouped, jnp.take(recv_x, r_order, axis=0), r_ids, group_sizes, p,
                           kind, a, window_factor, spill_factor)
  r_real = (r_ids < e_local)[:, None]
  ys = jnp.where(r_real, ys, 0)
  back = jnp.take(ys, jnp.argsort(r_order), axis=0).reshape(n, a, d)
  back = jax.lax.all_to_all(back, axis, 0, 0, tiled=True)
  y_sorted = back[dest, slot]  # [a, D] in sorted order
  y = jnp.take(y_sorted, jnp.argsort(order), axis=0).reshape(t, k, d)
  return jnp.einsum('tkd,tk->td', y, w.astype(y.dtype))


# ----------------------------------------------------------------------------- mesh helpers


def _rule_axes(name, mesh, default):
  """Mesh axes (size > 1) of the first active logical rule for `name`."""
  rules = nn.get_logical_axis_rules() or default
  for rule_name, axes in rules:
    if rule_name == name:
      if axes is None:
        return ()
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      return tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
  return ()


def _spec_axes(axes):
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else tuple(axes)


def expert_parallel_plan(num_experts):
  """(mesh, expert axes, token axes) of the active mesh; expert axes are () when experts
  are not sharded (no mesh, expert axis of size 1, or E not divisible)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None, (), ()
  expert_axes = _rule_axes('expert', mesh, jsharding.DEFAULT_RULES)
  n = math.prod(mesh.shape[a] for a in expert_axes)
  if n <= 1 or num_experts % n:
    expert_axes = ()
  batch_axes = _rule_axes('batch', mesh, jsharding.DEFAULT_RULES)
  token_axes = batch_axes + tuple(a for a in expert_axes if a not in batch_axes)
  return mesh, expert_axes, token_axes


def _mesh_size(mesh, axes):
  return math.prod(mesh.shape[a] for a in axes) if axes else 1


def dropless_expert_parallel(x, idx, w, p, kind, num_experts, mesh, expert_axes, token_axes,
                             grouped='windows', window_factor=1.25, spill_factor=0.75):
  """x [T, D], idx/w [T, K] (global) -> [T, D] with experts sharded over `expert_axes`."""
  t = x.shape[0]
  n_tok = _mesh_size(mesh, token_axes)
  pad = (-t) % n_tok
  if pad:  # padding tokens carry zero weight and are sliced off
    x = jnp.pad(x, ((0, pad), (0, 0)))
    idx = jnp.pad(idx, ((0, pad), (0, 0)))
    w = jnp.pad(w, ((0, pad), (0, 0)))
  tok_spec = P(_spec_axes(token_axes), None)
  ex = _spec_axes(expert_axes)
  p_specs = jax.tree.map(lambda v: P(ex, *([None] * (v.ndim - 1))), p)
  body = lambda x, i, w, p: _dropless_ep_local(
      x, i, w, p, kind=kind, num_experts=num_experts, axis=ex,
      n=_mesh_size(mesh, expert_axes), grouped=grouped, window_factor=window_factor,
      spill_factor=spill_factor)
  y = jax.shard_map(body, mesh=mesh, in_specs=(tok_spec, tok_spec, tok_spec, p_specs),
                    out_specs=tok_spec)(x, idx, w, p)
  return y[:t]


# ----------------------------------------------------------------------------- the layer


class MoE(nn.Module):
  """Routed experts (+ shared MLP): x [B, L, D] -> [B, L, D] in x's dtype.

  Fields: num_experts E; top_k K; expert_hidden H (None -> 4*D); expert_kind 'swiglu'
  (gate/up/down, no bias, as the DiT-MoE code) or 'gelu' (2-layer GELU(tanh) MLP with
  biases, the paper's Eq.); num_shared (shared experts as ONE MLP of hidden num_shared*D,
  same kind; 0 -> none); renormalize (top-k weights renormalised to sum 1); dispatch
  'dropless' | 'capacity' | 'dense'; grouped_matmul for dropless, 'windows' | 'blocks' |
  'ragged_dot'; window_factor and spill_factor (of 'windows'); capacity_factor; balance_coef
  alpha; record_routing (sow the top-k ids); dtype (compute dtype; router is float32).

  Params: router/kernel [D, E] ('embed', None); wi_gate, wi_up [E, D, H]
  ('expert', 'embed', 'mlp') and wo [E, H, D] ('expert', 'mlp', 'embed') for swiglu;
  wi [E, D, H], bi [E, H], wo [E, H, D], bo [E, D] for gelu; shared/ (a layers.Mlp).
  """
  num_experts: int
  top_k: int = 2
  expert_hidden: Optional[int] = None
  expert_kind: str = 'swiglu'
  num_shared: int = 2
  renormalize: bool = False
  dispatch: str = 'dropless'
  grouped_matmul: str = 'windows'
  window_factor: float = 1.25
  spill_factor: float = 0.75
  capacity_factor: float = 1.25
  balance_coef: float = 0.005
  record_routing: bool = False
  dtype: Dtype = jnp.float32

  def _expert_params(self, d, h):
    e = self.num_experts
    w_in = layers.logical(layers.xavier_fan(d, h), ('expert', 'embed', 'mlp'))
    w_out = layers.logical(layers.xavier_fan(h, d), ('expert', 'mlp', 'embed'))
    zeros = nn.initializers.zeros
    if self.expert_kind == 'swiglu':
      return {'wi_gate': self.param('wi_gate', w_in, (e, d, h)),
              'wi_up': self.param('wi_up', w_in, (e, d, h)),
              'wo': self.param('wo', w_out, (e, h, d))}
    return {'wi': self.param('wi', w_in, (e, d, h)),
            'bi': self.param('bi', layers.logical(zeros, ('expert', 'mlp')), (e, h)),
            'wo': self.param('wo', w_out, (e, h, d)),
            'bo': self.param('bo', layers.logical(zeros, ('expert', 'embed')), (e, d))}

  def check(self):
    """Raises ValueError naming the first invalid field (the DiT family turns it into a
    one-line error before anything is built)."""
    if self.dispatch not in DISPATCHES:
      raise ValueError(f'unknown MoE dispatch {self.dispatch!r}: use one of {DISPATCHES}')
    if self.grouped_matmul not in experts.GROUPED_MATMULS:
      raise ValueError(f'unknown grouped_matmul {self.grouped_matmul!r}: use one of '
                       f'{experts.GROUPED_MATMULS}')
    if self.expert_kind not in KINDS:
      raise ValueError(f'unknown expert kind {self.expert_kind!r}: use one of {KINDS}')
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f'top_k={self.top_k} must be in [1, num_experts={self.num_experts}]')
    if self.window_factor <= 0:
      raise ValueError(f'window_factor={self.window_factor} must be > 0 (1.25: windows of '
                       '1.25x the mean load)')
    if self.spill_factor < 0:
      raise ValueError(f'spill_factor={self.spill_factor} must be >= 0 (0: no spill, an '
                       'overflowing window runs the blocked fallback)')

  @nn.compact
  def __call__(self, x):
    self.check()
    e, k = self.num_experts, self.top_k
    b, l, d = x.shape
    t = b * l
    h = self.expert_hidden or 4 * d

    # Router in float32 (kaiming-uniform as torch nn.Linear, like the reference gate).
    router_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
    logits = layers.dense(e, ('embed', None), dtype=jnp.float32, use_bias=False,
                          kernel_init=router_init, name='router')(x.astype(jnp.float32))
    probs = jax.nn.softmax(logits.reshape(t, e), axis=-1)
    top_p, top_i = top_k(probs, k)  # [T, K]
    weights = top_p / jnp.sum(top_p, -1, keepdims=True) if self.renormalize else top_p

    # Balance loss and metrics over all T tokens (global arrays, also under a mesh).
    counts = jnp.sum(jax.nn.one_hot(top_i, e, dtype=jnp.float32), axis=(0, 1))  # [E]
    load = counts / (t * k)
    aux = self.balance_coef * jnp.sum(jnp.mean(probs, axis=0) * e * load)
    entropy = jnp.mean(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1))

    p = jax.tree.map(lambda v: v.astype(self.dtype), self._expert_params(d, h))
    xt = x.astype(self.dtype).reshape(t, d)
    mesh, expert_axes, token_axes = expert_parallel_plan(e)
    dropped = jnp.zeros((), jnp.float32)
    if self.dispatch == 'dense':
      y = dense_dispatch(xt, top_i, weights, p, self.expert_kind, e)
    elif self.dispatch == 'dropless':
      if self.grouped_matmul == 'windows':
        route = experts.window_route(counts, experts.window_rows(t * k, e, self.window_factor),
                                     experts.spill_rows(t * k, e, self.spill_factor))
        self.sow('intermediates', 'moe_window_spill', (route == 1).astype(jnp.float32))
        self.sow('intermediates', 'moe_window_overflow', (route == 2).astype(jnp.float32))
      windows = (self.window_factor, self.spill_factor)
      if expert_axes:
        y = dropless_expert_parallel(xt, top_i, weights, p, self.expert_kind, e, mesh,
                                     expert_axes, token_axes, self.grouped_matmul, *windows)
      else:
        y = dropless_dispatch(xt, top_i, weights, p, self.expert_kind, e, self.grouped_matmul,
                              *windows)
    else:
      capacity = min(l, math.ceil(self.capacity_factor * l * k / e))
      spec = None
      if mesh is not None:
        group_axes = tuple(a for a in token_axes if a not in expert_axes)
        if b % _mesh_size(mesh, group_axes):
          group_axes = ()
        if expert_axes or group_axes:
          spec = P(_spec_axes(expert_axes), _spec_axes(group_axes), None, None)
      y, n_dropped = capacity_dispatch(
          xt.reshape(b, l, d), top_i.reshape(b, l, k), weights.reshape(b, l, k), p,
          self.expert_kind, e, capacity, spec)
      dropped = n_dropped.astype(jnp.float32) / (t * k)
    y = y.reshape(b, l, d)

    if self.num_shared:
      y = y + layers.Mlp(self.num_shared * d, self.expert_kind, self.dtype, name='shared')(
          x.astype(self.dtype))

    self.sow('intermediates', 'moe_aux_loss', aux)
    self.sow('intermediates', 'moe_router_entropy', entropy)
    self.sow('intermediates', 'moe_expert_load', load)
    self.sow('intermediates', 'moe_dropped_fraction', dropped)
    if self.record_routing:
      self.sow('intermediates', 'moe_topk_indices', top_i.reshape(b, l, k).astype(jnp.int32))
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------- helpers


def _collect(intermediates, name):
  """All values sown under `name` anywhere in an intermediates tree, in tree order."""
  found = []

  def walk(node):
    if isinstance(node, dict) or hasattr(node, 'items'):
      for key, value in node.items():
        if key == name:
          found.extend(value if isinstance(value, (tuple, list)) else [value])
        else:
          walk(value)
  walk(intermediates)
  return found


def aux_loss(intermediates):
  """Sum of 'moe_aux_loss' over every MoE layer (0.0 when there is none)."""
  vals = _collect(intermediates, 'moe_aux_loss')
  return sum(vals) if vals else jnp.zeros((), jnp.float32)


def routing_metrics(intermediates):
  """Layer-averaged scalar metrics: moe_aux_loss (sum), moe_router_entropy,
  moe_dropped_fraction, moe_window_spill and moe_window_overflow (shares of the MoE layers
  that ran the spill and the blocked fallback; dropless 'windows' only), moe_max_load (max
  expert share x E; 1 = balanced) and moe_load/expertNN (each expert's share of the
  assignments)."""
  out = {}
  if not _collect(intermediates, 'moe_aux_loss'):
    return out
  out['moe_aux_loss'] = aux_loss(intermediates)
  for name in ('moe_router_entropy', 'moe_dropped_fraction', 'moe_window_spill',
               'moe_window_overflow'):
    vals = _collect(intermediates, name)
    if vals:
      out[name] = sum(vals) / len(vals)
  loads = _collect(intermediates, 'moe_expert_load')
  out['moe_max_load'] = sum(jnp.max(v) * v.shape[-1] for v in loads) / len(loads)
  if len({v.shape for v in loads}) == 1:  # per-expert share, averaged over layers
    mean_load = sum(loads) / len(loads)
    out.update({f'moe_load/expert{i:02d}': mean_load[i] for i in range(mean_load.shape[0])})
  return out


def moe_param_counts(D, E, K, hidden, num_shared, kind='swiglu'):
  """(total, activated) parameters of one MoE layer: router + experts + shared MLP.

  Activated counts the router, K experts and the shared MLP."""
  def mlp(h):
    if kind == 'swiglu':
      return 3 * D * h
    if kind == 'gelu':
      return 2 * D * h + h + D
    raise ValueError(f'unknown expert kind {kind!r}')
  router = D * E
  shared = mlp(num_shared * D) if num_shared else 0
  return router + E * mlp(hidden) + shared, router + K * mlp(hidden) + shared
