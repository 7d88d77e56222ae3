r"""DiT-MoE routing analysis: which experts the router picks, by timestep, position and class.

  python -m jaxgen.main --config=configs/dit_moe.py:demo --workdir=DIR --mode=analyze

restores the newest checkpoint in DIR (EMA parameters), noises `analysis.num_batches` test
batches at `analysis.num_timesteps` evenly spaced times exactly as the training objective
does (t = (j + 0.5) / T; 0 = data, 1 = noise; DDPM uses the integer step int(t * steps)),
runs the model once per (batch, time) with the MoE layers' `record_routing=True`, counts every
top-k assignment of every token, and writes DIR/analysis/routing/:
  routing.json       config, per-layer counts and frequencies (expert x timestep,
                     expert x position, expert x class) and the summary numbers below;
  routing_counts.npz the joint counts: image_counts [layers, T, images, E],
                     position_counts and position_null_counts [layers, T, E, L], labels;
  block<i>.png       heat maps of one MoE layer (columns are conditions, each column is the
                     distribution over experts and sums to 1) and per-expert spatial maps;
  summary.png        the summary numbers across layers.
Summary (the paper's three observations; TV = total-variation distance):
  dependence[f]      per layer, count-weighted mean over the conditions c of factor f
                     (position, timestep, class) of TV(p(e | c), p(e)): 0 = routing ignores f.
                     `<f>_null` is the same after a random permutation that makes routing
                     independent of f (positions shuffled within each image and time,
                     timestep bins shuffled per image, labels shuffled across images): the
                     finite-sample floor. A factor matters only where it clearly exceeds it.
  evenness           per layer, entropy of p(e) / log E (1 = every expert used equally).
  specialisation_by_timestep       per layer and time, TV(p(e | t), uniform).
  position_dependence_by_timestep  per layer and time, the position dependence within t.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxgen import objectives, sharding, writers
from jaxgen.analysis import heatmaps
from jaxgen.errors import UserError

NO_MOE = '--mode=analyze needs an MoE model (config.model.moe.num_experts > 0)'


# ----------------------------------------------------------------------------- collection


def timestep_grid(num_timesteps):
  """Evenly spaced bin centres in (0, 1)."""
  return (np.arange(num_timesteps) + 0.5) / num_timesteps


def noise_coefficients(objective, t):
  """Times t in (0, 1) -> (a, s, model_t) arrays with z = a x + s eps, as the objective's loss."""
  t = np.asarray(t, np.float64)
  if isinstance(objective, objectives.DDPM):  # integer steps
    steps = np.floor(t * objective.num_timesteps + 1e-6).astype(int)  # float-safe int(t * N)
    steps = np.clip(steps, 0, objective.num_timesteps - 1)
    ab = objective.alphas_cumprod[steps]
    return np.sqrt(ab), np.sqrt(1 - ab), steps.astype(np.float64)
  if isinstance(objective, objectives.RectifiedFlow):
    return 1 - t, t, t * objective.time_scale
  raise ValueError(f'routing analysis does not know how {type(objective).__name__} noises data')


def count_assignments(indices, num_experts, perm=None):
  """Top-k ids [B, L, K] -> (per-image counts [B, E], per-position counts [E, L]).

  `perm` [B, L] reorders each image's positions first (the permutation null)."""
  if perm is not None:
    indices = jnp.take_along_axis(indices, perm[..., None], axis=1)
  per_token = jnp.sum(jax.nn.one_hot(indices, num_experts, dtype=jnp.int32), axis=2)
  return jnp.sum(per_token, axis=1), jnp.sum(per_token, axis=0).T


def moe_layer_names(model):
  if not model.moe:
    return []
  return [f'block{i}' for i in range(model.depth) if i % model.moe_every == 0]


def collect_routing(exp, params, *, num_batches, timesteps):
  """Routing counts of `params` on `num_batches` test batches at each time in `timesteps`."""
  fam, cfg = exp.family, exp.config
  if not getattr(fam, 'moe', None):
    raise UserError(NO_MOE)
  model = fam.model.clone(moe=dict(fam.moe, record_routing=True))
  names, num_experts = moe_layer_names(model), fam.moe['num_experts']
  a, s, model_t = (np.asarray(v, np.float32) for v in noise_coefficients(fam.objective, timesteps))

  def forward(params, x, y, key, perm_key, a, s, model_t):
    z = a * x + s * jax.random.normal(key, x.shape, x.dtype)  # one eps per batch, all times
    t = jnp.full((x.shape[0],), model_t, jnp.float32)
    _, state = model.apply({'params': params}, z, t, y, train=False, mutable=['intermediates'])
    ids = [state['intermediates'][n]['moe']['moe_topk_indices'][0] for n in names]
    perm = jnp.argsort(jax.random.uniform(perm_key, ids[0].shape[:2]), axis=1)
    counts = [count_assignments(i, num_experts) for i in ids]
    null = [count_assignments(i, num_experts, perm)[1] for i in ids]
    return (jnp.stack([c[0] for c in counts]), jnp.stack([c[1] for c in counts]),
            jnp.stack(null), y)

  fn = jax.jit(forward, out_shardings=NamedSharding(exp.mesh, P()))
  it = exp.batches('test', train=False, seed=cfg.seed)
  num_t, side = len(a), cfg.data.image_size // cfg.model.patch_size
  position_counts = np.zeros((2, len(names), num_t, num_experts, side * side), np.int64)
  image_counts, labels = [], []
  with exp.context():
    for i in range(num_batches):
      batch = sharding.global_batch(next(it), exp.mesh)
      key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), i)
      per_t = []
      for j in range(num_t):
        perm_key = jax.random.fold_in(key, j + 1)
        img, pos, pos_null, y = jax.device_get(fn(params, batch['image'], batch['label'], key,
                                                  perm_key, a[j], s[j], model_t[j]))
        per_t.append(img)
        position_counts[:, :, j] += np.stack([pos, pos_null])
      image_counts.append(np.stack(per_t, axis=1))  # [layers, T, B, E]
      labels.append(np.asarray(y))
  result = dict(
      layers=names, timesteps=[float(t) for t in timesteps],
      model_timesteps=[float(t) for t in model_t], num_experts=num_experts,
      top_k=fam.moe['top_k'], grid=side, num_classes=cfg.data.num_classes,
      class_names=fam.row_names() or [str(c) for c in range(cfg.data.num_classes)],
      objective=cfg.objective.name, num_batches=num_batches,
      image_counts=np.concatenate(image_counts, axis=2).astype(np.int64),
      position_counts=position_counts[0], position_null_counts=position_counts[1],
      labels=np.concatenate(labels).astype(np.int64))
  result['stats'] = routing_statistics(
      result['image_counts'], position_counts[0], result['labels'], cfg.data.num_classes,
      position_null_counts=position_counts[1], layers=names, timesteps=timesteps)
  return result


# ----------------------------------------------------------------------------- statistics


def normalise(counts, axis=-2):
  """Counts -> distributions along `axis` (the experts); all-zero slices stay 0."""
  counts = np.asarray(counts, np.float64)
  return counts / np.maximum(counts.sum(axis, keepdims=True), 1)


def dependence(counts):
  """[..., E, C] counts -> [...]: count-weighted mean over conditions c of TV(p(e|c), p(e))."""
  counts = np.asarray(counts, np.float64)
  per_condition = counts.sum(-2)                                   # [..., C]
  overall = normalise(counts.sum(-1), axis=-1)[..., None]          # [..., E, 1]
  tv = 0.5 * np.abs(normalise(counts) - overall).sum(-2)           # [..., C]
  weights = per_condition / np.maximum(per_condition.sum(-1, keepdims=True), 1)
  return (tv * weights).sum(-1)


def evenness(counts):
  """[..., E] counts -> entropy of the expert distribution / log E (1 = perfectly even)."""
  p = normalise(counts, axis=-1)
  h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=-1)
  return h / np.log(p.shape[-1])


def class_counts(image_counts, labels, num_classes):
  """image_counts [layers, T, N, E], labels [N] -> [layers, E, C]."""
  onehot = np.eye(num_classes, dtype=np.int64)[np.asarray(labels)]
  return np.einsum('ltne,nc->lec', image_counts, onehot)


def permute_times(image_counts, rng):
  """Shuffle each image's timestep bins independently (the timestep permutation null)."""
  num_t, num_images = image_counts.shape[1:3]
  order = np.argsort(rng.random((num_images, num_t)), axis=1)
  x = np.take_along_axis(image_counts.transpose(0, 2, 1, 3), order[None, :, :, None], axis=2)
  return x.transpose(0, 2, 1, 3)


def routing_statistics(image_counts, position_counts, labels, num_classes, *,
                       position_null_counts=None, layers=None, timesteps=None,
                       null_permutations=20):
  """Marginal counts, frequencies and the summary numbers (see the module docstring).

  image_counts [layers, T, N, E], position_counts [layers, T, E, L] (and the same for
  position-permuted routing, `position_null_counts`), labels [N]."""
  image_counts, position_counts = np.asarray(image_counts), np.asarray(position_counts)
  num_layers, num_t, _, num_experts = image_counts.shape
  layers = layers or [f'layer{i}' for i in range(num_layers)]
  timesteps = np.asarray(timestep_grid(num_t) if timesteps is None else timesteps)
  time_counts = lambda c: c.sum(2).transpose(0, 2, 1)              # -> [layers, E, T]
  counts = {'timestep': time_counts(image_counts), 'position': position_counts.sum(1),
            'class': class_counts(image_counts, labels, num_classes)}
  overall = counts['timestep'].sum(-1)                             # [layers, E]
  freq = {k: normalise(v) for k, v in counts.items()}
  freq['overall'] = normalise(overall, axis=-1)
  rng = np.random.default_rng(0)
  nulls = lambda make: np.mean([dependence(make()) for _ in range(null_permutations)], axis=0)
  dep = {'position': dependence(counts['position'])}
  if position_null_counts is not None:
    dep['position_null'] = dependence(np.asarray(position_null_counts).sum(1))
  dep['timestep'] = dependence(counts['timestep'])
  dep['timestep_null'] = nulls(lambda: time_counts(permute_times(image_counts, rng)))
  dep['class'] = dependence(counts['class'])
  dep['class_null'] = nulls(lambda: class_counts(image_counts, rng.permutation(labels),
                                                 num_classes))
  spec_t = 0.5 * np.abs(freq['timestep'] - 1 / num_experts).sum(1)  # [layers, T]
  pos_t = dependence(position_counts)                               # [layers, T]
  early, late = timesteps < 0.5, timesteps >= 0.5
  half = lambda v, m: round(float(v[:, m].mean()), 4) if m.any() else None
  r = lambda v: np.round(np.asarray(v, np.float64), 4).tolist()
  summary = {
      'layers': list(layers), 'timesteps': r(timesteps), 'num_images': int(len(labels)),
      'assignments_per_layer': int(overall[0].sum()),
      'dependence': {k: r(v) for k, v in dep.items()},
      'dependence_mean': {k: round(float(np.mean(v)), 4) for k, v in dep.items()},
      'evenness': r(evenness(overall)),
      'specialisation_by_timestep': r(spec_t),
      'specialisation_by_timestep_mean': r(spec_t.mean(0)),
      'position_dependence_by_timestep': r(pos_t),
      'by_time_half': {'specialisation': {'t<0.5': half(spec_t, early),
                                          't>=0.5': half(spec_t, late)},
                       'position_dependence': {'t<0.5': half(pos_t, early),
                                               't>=0.5': half(pos_t, late)}},
  }
  if position_null_counts is not None:
    summary['position_dependence_by_timestep_null'] = r(dependence(position_null_counts))
  return {'counts': dict(counts, overall=overall), 'frequency': freq, 'summary': summary}


# ----------------------------------------------------------------------------- report


def write_report(result, outdir):
  """Heat-map PNGs per MoE layer, summary.png, routing.json and routing_counts.npz."""
  os.makedirs(outdir, exist_ok=True)
  save = lambda image, name: writers.save_png(np.asarray(image), os.path.join(outdir, name))
  for li, name in enumerate(result['layers']):
    save(heatmaps.layer_figure(result, li), f'{name}.png')
  save(heatmaps.summary_figure(result), 'summary.png')
  st, arrays = result['stats'], ('image_counts', 'position_counts', 'position_null_counts',
                                 'labels')
  meta = {k: v for k, v in result.items() if k not in ('stats',) + arrays}
  layers = {name: {
      'counts': {k: st['counts'][k][li].tolist() for k in ('overall', 'timestep', 'position',
                                                           'class')},
      'frequency': {k: np.round(st['frequency'][k][li], 6).tolist()
                    for k in ('overall', 'timestep', 'position', 'class')},
  } for li, name in enumerate(result['layers'])}
  with open(os.path.join(outdir, 'routing.json'), 'w') as f:
    json.dump(dict(meta, summary=st['summary'], layer_stats=layers), f)
  np.savez_compressed(os.path.join(outdir, 'routing_counts.npz'),
                      **{k: result[k] for k in arrays})
  return outdir


# ----------------------------------------------------------------------------- entry point


def analyze(config, workdir):
  """Restore workdir's newest checkpoint, collect routing with its EMA parameters, write the
  report to workdir/analysis/routing/ and return the summary dict."""
  from jaxgen import trainer
  moe = config.model.get('moe') if 'model' in config else None
  if not moe or not moe.get('num_experts'):
    raise UserError(NO_MOE)
  opts = config.get('analysis') or {}
  exp = trainer.Experiment(config, workdir)
  ema_params, step = exp.restore_ema()
  result = collect_routing(exp, ema_params, num_batches=opts.get('num_batches', 4),
                           timesteps=timestep_grid(opts.get('num_timesteps', 10)))
  result['step'] = step
  outdir = os.path.join(workdir, 'analysis', 'routing')
  if exp.is_primary:
    write_report(result, outdir)
  return dict(result['stats']['summary'], step=step, outdir=outdir)
