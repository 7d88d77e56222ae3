"""The one training loop, plus eval / sample / info, for every family.

Sections: setup (mesh, family, optimizer, shardings) -> restore or init ->
loop (step, log, checkpoint, sample, eval, preemption) -> finish.
"""
import json
import math
import os
import signal
import sys
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from jaxgen import checkpointing, evaluation, families, sharding, train_state, writers
from jaxgen.errors import UserError


# ----------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------
class Experiment:
  """Everything derived from the config that the modes share."""

  def __init__(self, config, workdir, devices=None):
    self.config, self.workdir = config, workdir
    self.family = families.get_family(config)
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.rules_tuple(config.axis_rules)
    sharding.check_batch(config.batch_size, self.mesh)
    evaluation.check_config(config.eval)
    if config.batch_size % config.get('grad_accum_steps', 1):
      raise UserError(f'batch_size={config.batch_size} is not divisible by '
                      f'grad_accum_steps={config.grad_accum_steps}')
    self.tx, self.schedule = self.family.make_optimizer(config.total_steps)
    self.rng = jax.random.PRNGKey(config.seed)
    self.abstract, self.shardings = train_state.abstract_state(
        self.family, self.tx, self.rng, self.mesh, self.rules)
    self.is_primary = jax.process_index() == 0

  def init_state(self):
    """A freshly initialised, sharded train state."""
    state, _ = train_state.init_state(self.family, self.tx, self.rng, self.mesh, self.rules,
                                      self.shardings)
    return state

  def context(self):
    return train_state.mesh_context(self.mesh, self.rules)

  def checkpointer(self):
    c = self.config
    return checkpointing.Checkpointer(self.workdir, keep=c.keep_checkpoints,
                                      async_save=c.async_checkpoints)

  def restore_latest(self, ckpt):
    step = ckpt.latest_step()
    if step is None:
      return None, None
    return ckpt.restore(step, self.abstract)

  def restore_ema(self):
    """(EMA parameters, step) of the newest checkpoint, for eval / sample / analysis."""
    with self.checkpointer() as ckpt:
      fields = ckpt.restore_fields(_required_latest_step(ckpt),
                                   {'step': self.abstract.step,
                                    'ema_params': self.abstract.ema_params})
    return fields['ema_params'], int(jax.device_get(fields['step']))

  def batches(self, split, train, seed):
    return self.family.make_iterator(split, global_batch_size=self.config.batch_size,
                                     seed=seed, train=train)

  def write_samples(self, params, step, writer=None, name=None):
    """Samples with `params` (the EMA) from the family's sample inputs (class labels, prompts)
    and saves them as the family renders them (a labelled PNG grid, a text file) under
    samples/<name> (default step_<step>); returns the saved file's path."""
    inputs = self.family.sample_inputs()
    if not hasattr(self, '_sample_fn'):
      self._sample_fn = jax.jit(self.family.sample, out_shardings=NamedSharding(self.mesh, P()))
    rng = jax.random.PRNGKey(self.config.sample.seed)
    with self.context():
      outputs = np.asarray(jax.device_get(self._sample_fn(params, rng, inputs)))
    stem = os.path.join(self.workdir, 'samples', name or f'step_{step:07d}')
    return self.family.write_samples(outputs, stem, writer if self.is_primary else None, step,
                                     save=self.is_primary)

  def evaluate(self, params):
    """The metrics named by config.eval.metrics for `params` (the EMA): see evaluation.py."""
    names = evaluation.metric_names(self.config.eval)
    out = self.loss_metrics(params) if 'loss' in names else {}
    out.update(evaluation.sample_metrics(self, params))
    return out

  def loss_metrics(self, params):
    """The family's eval metrics over `eval_batches` test batches: scalars averaged, arrays
    summed, then reduced to scalars by the family."""
    if not hasattr(self, '_eval_fn'):
      self._eval_fn = jax.jit(self.family.eval_metrics,
                              out_shardings=NamedSharding(self.mesh, P()))
    it = self.batches('test', train=False, seed=self.config.seed)
    totals = {}
    with self.context():
      for i in range(self.config.eval_batches):
        batch = sharding.global_batch(next(it), self.mesh)
        m = jax.device_get(self._eval_fn(params, batch, jax.random.PRNGKey(i)))
        for k, v in m.items():
          v = np.asarray(v, np.float64)
          totals[k] = totals.get(k, 0.0) + (v if v.ndim else v / self.config.eval_batches)
    totals = self.family.reduce_eval_metrics(totals)
    return {f'eval/{k}': float(v) for k, v in totals.items()}


def _required_latest_step(ckpt):
  step = ckpt.latest_step()
  if step is None:
    raise UserError(f'no checkpoint in {ckpt.directory}: train first '
                    f'(--mode=train with the same --workdir)')
  return step


class _Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _check_finite(metrics, step, ckpt):
  bad = [k for k in ('loss', 'param_norm') if k in metrics and not math.isfinite(metrics[k])]
  if bad:
    ckpt.wait()
    last = ckpt.latest_step()
    kept = f'the last good checkpoint (step {last}) is kept' if last else 'no checkpoint was saved'
    raise UserError(f'{bad[0]} is {metrics[bad[0]]} at step {step}: training diverged; lower '
                    f'--config.optim.lr or enable --config.optim.grad_clip; {kept}')


# ----------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------
def train(config, workdir):
  """Trains (resuming from workdir if it holds checkpoints); returns the last metrics."""
  exp = Experiment(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  if exp.is_primary:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  with exp.checkpointer() as ckpt:
    return _train_loop(exp, ckpt)


def _train_loop(exp, ckpt):
  c, family, workdir = exp.config, exp.family, exp.workdir
  data_iter = exp.batches('train', train=True, seed=c.seed)
  state, data_state = exp.restore_latest(ckpt)
  if state is None:
    state = exp.init_state()
  else:
    data_iter.set_state(data_state)
  start = int(jax.device_get(state.step))
  step_fn = train_state.make_train_step(family, exp.tx, exp.schedule, c, exp.mesh,
                                        exp.shardings, sharding.batch_sharding(exp.mesh))
  writer = writers.create_writer(workdir, is_primary=exp.is_primary)
  if start == 0 and exp.is_primary:
    writer.write_hparams(json.loads(c.to_json_best_effort()))
  preempt = _Preemption()
  bar = tqdm(total=c.total_steps, initial=start, disable=not (c.progress_bar and exp.is_primary),
             dynamic_ncols=True)
  metrics, t0, last_logged = {}, time.perf_counter(), start
  try:
    with exp.context():
      for step in range(start + 1, c.total_steps + 1):
        batch = sharding.global_batch(next(data_iter), exp.mesh)
        state, device_metrics = step_fn(state, batch)
        bar.update(1)
        last = step == c.total_steps
        stop = preempt.requested
        if step % c.log_every == 0 or last or stop:
          metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
          _check_finite(metrics, step, ckpt)
          dt = time.perf_counter() - t0
          metrics['steps_per_sec'] = (step - last_logged) / dt
          metrics['examples_per_sec'] = metrics['steps_per_sec'] * c.batch_size
          writer.write_scalars(step, metrics)
          bar.set_postfix(loss=f"{metrics['loss']:.4f}")
          t0, last_logged = time.perf_counter(), step
        if (c.checkpoint_every and step % c.checkpoint_every == 0) or last or stop:
          if step % c.log_every and not (last or stop):  # never save a diverged state
            _check_finite({k: float(device_metrics[k]) for k in ('loss', 'param_norm')},
                          step, ckpt)
          ckpt.save(step, state, data_iter.get_state(), c)
        if (c.sample_every and step % c.sample_every == 0) or last:
          exp.write_samples(state.ema_params, step, writer)
        if c.eval_every and step % c.eval_every == 0 or (last and c.eval_every):
          writer.write_scalars(step, exp.evaluate(state.ema_params))
        if stop:
          tqdm.write(f'SIGTERM: saved checkpoint at step {step} in {ckpt.directory}; exiting',
                     file=sys.stderr)
          break
        writer.flush()
  finally:
    bar.close()
    preempt.restore()
    writer.flush()
  return metrics


# ----------------------------------------------------------------------------
# Eval, sample, info
# ----------------------------------------------------------------------------
def evaluate(config, workdir):
  exp = Experiment(config, workdir)
  params, step = exp.restore_ema()
  metrics = exp.evaluate(params)
  if exp.is_primary:
    writer = writers.create_writer(workdir)
    writer.write_scalars(step, metrics)
    writer.flush()
    with open(os.path.join(workdir, f'eval_{step:07d}.json'), 'w') as f:
      json.dump(dict(metrics, step=step, eval_config=config.eval.to_dict()), f, indent=2)
  return metrics


def sample(config, workdir):
  exp = Experiment(config, workdir)
  params, step = exp.restore_ema()
  s = config.sample
  # Named by the sampler settings, so sampling never overwrites training's grids.
  name = f'sample_step{step}_{s.method}{s.num_steps}_cfg{s.cfg_scale:g}'
  return exp.write_samples(params, step, name=name)


def info(config, workdir=None):
  """Parameter counts, FLOPs, mesh and the largest parameters' shardings; allocates nothing."""
  exp = Experiment(config, workdir)
  params = exp.abstract.params
  leaves = jax.tree_util.tree_leaves_with_path(params)
  total = sum(math.prod(x.shape) for _, x in leaves)
  largest = sorted(leaves, key=lambda kv: -math.prod(kv[1].shape))[:8]
  out = {
      'family': config.family,
      'total_params': total,
      'activated_params': exp.family.activated_params(total),
      'train_flops_per_example': exp.family.flops_per_example(train=True),
      'mesh': dict(exp.mesh.shape),
      'largest_params': [
          {'name': jax.tree_util.keystr(path), 'shape': list(x.shape),
           'sharding': str(x.sharding.spec)} for path, x in largest],
  }
  breakdown = exp.family.param_breakdown(params)
  if breakdown:
    out['param_breakdown'] = breakdown
  return out


# ----------------------------------------------------------------------------
# Trained workdirs as inputs (evaluations, a stage-2 model's tokenizer)
# ----------------------------------------------------------------------------
def config_from_json(d):
  """The ConfigDict a workdir's config.json was written from (to_json_best_effort)."""
  import ml_collections
  config = ml_collections.ConfigDict(d)
  # JSON turned the axis rules' tuples into lists; the mesh code expects tuples.
  config.axis_rules = sharding.rules_tuple(config.axis_rules)
  return config


def load_trained(workdir, family, train_hint, data_dir=None):
  """(family object, EMA params, config, step) of the newest checkpoint in a trained workdir
  (see `load_experiment`)."""
  exp, params, step = load_experiment(workdir, family, train_hint, data_dir)
  return exp.family, params, exp.config, step


def load_experiment(workdir, family, train_hint, data_dir=None):
  """(Experiment, EMA params, step) of the newest checkpoint in a trained workdir.

  The config is rebuilt from workdir/config.json and must be of `family`; `data_dir`
  overrides its data location. Parameters go onto one device: the config's mesh may need
  more devices than this machine has. `train_hint` is the command that makes such a workdir.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.isdir(workdir):
    raise UserError(f'workdir {workdir} does not exist: train a model first ({train_hint})')
  if not os.path.isfile(path):
    raise UserError(f'{path} not found: {workdir} is not a trained workdir ({train_hint})')
  try:
    with open(path) as f:
      config = config_from_json(json.load(f))
  except (ValueError, TypeError, KeyError) as e:
    raise UserError(f'cannot read {path}: {type(e).__name__}: {e}') from e
  if config.get('family') != family:
    raise UserError(f'{workdir} holds a {config.get("family")!r} model, not a {family!r} one '
                    f'({train_hint})')
  if data_dir:
    config.data.data_dir = data_dir
  config.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
  exp = Experiment(config, workdir, devices=jax.devices()[:1])
  params, step = exp.restore_ema()
  return exp, params, step
