"""Helpers shared by the benchmark scripts: configs, timing, matmul ceiling, memory, output.

Run the scripts from the repository root (`python benchmarks/<name>.py`); they put the root
on sys.path, so `benchmarks.common`, `jaxgen` and `configs/` resolve without installation.
"""
import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense bf16 peak FLOP/s (no sparsity) by substrings of jax's device_kind.
PEAK_BF16 = (
    ('H200', 989e12),
    ('H100', 989e12),  # 'NVIDIA H100 80GB HBM3' (SXM); the PCIe card is lower (756e12)
    ('A100', 312e12),
)


# ----------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------
def load_config_module(name='dit'):
  """configs/<name>.py imported by path (configs/ is not a package)."""
  path = os.path.join(REPO, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'jaxgen_configs_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def arg_parser(doc, out_name):
  """An ArgumentParser described by the script docstring's first paragraph, with --out."""
  p = argparse.ArgumentParser(description=doc.split('\n\n')[0])
  p.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'results', f'{out_name}.json'),
                 help='JSON output')
  return p


def add_train_args(p, configs, configs_help, set_example, steps=10, steps_help=None):
  """The flags of every train-step benchmark: which configs, overrides, batch, steps, dtype."""
  p.add_argument('--configs', default=configs, help=configs_help)
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help=f'config override, e.g. {set_example} (repeatable)')
  p.add_argument('--batch', type=int, default=None, help='global training batch')
  p.add_argument('--steps', type=int, default=steps,
                 help=steps_help or 'timed train steps after warm-up')
  p.add_argument('--warmup', type=int, default=None, help='untimed steps after compilation')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='config.model.dtype (compute dtype; parameters stay float32)')


def fill_defaults(args, **defaults):
  """Sets each flag left None to its (accelerator, CPU) default for the machine it runs on."""
  acc = on_accelerator()
  for name, (on_acc, on_cpu) in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, on_acc if acc else on_cpu)
  return args


def parse_configs(text):
  """'tiny,S/2,ddpm,demo' -> ['tiny', 'S/2,ddpm', 'demo']: a 'ddpm' token joins its predecessor."""
  out = []
  for token in (t.strip() for t in text.split(',')):
    if not token:
      continue
    if token == 'ddpm':
      if not out:
        raise ValueError(f'--configs {text!r}: "ddpm" must follow a variant, e.g. tiny,ddpm')
      out[-1] += ',ddpm'
    else:
      out.append(token)
  return out


def synthetic_batches(config, mesh, count, seed=0):
  """`count` global batches shaped like config.data's, assembled like the trainer's.

  Text data (a `vocab_size`) gives random next-token pairs; image data random pixels and labels.
  """
  rng = np.random.default_rng(seed)
  d = config.data
  local = config.batch_size // jax.process_count()
  out = []
  for _ in range(count):
    if 'vocab_size' in d:
      tokens = rng.integers(0, d.vocab_size, (local, d.seq_len + 1)).astype(np.int32)
      batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
    else:
      batch = {
          'image': rng.uniform(-1, 1, (local, d.image_size, d.image_size, d.channels)
                               ).astype(np.float32),
          'label': rng.integers(0, d.num_classes, (local,)).astype(np.int32),
      }
    out.append(sharding.global_batch(batch, mesh))
  return out


def on_accelerator():
  return jax.default_backend() != 'cpu'


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------
def time_calls(call, steps, warmup=1, min_time_s=0.0, max_calls=1000):
  """Calls `call()` warmup times, then at least `steps` times and until `min_time_s` have
  passed (at most `max_calls`), blocking on each result; per-call seconds stats."""
  for _ in range(warmup):
    jax.block_until_ready(call())
  times = []
  while len(times) < steps or (sum(times) < min_time_s and len(times) < max_calls):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
  return {'median_s': statistics.median(times), 'mean_s': statistics.fmean(times),
          'min_s': min(times), 'times_s': times}


def timed_compile(jitted, *args):
  """AOT-compiles `jitted` for `args`; (compiled executable, seconds spent lowering + compiling)."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def time_train_step(exp, state, steps, warmup=1, min_time_s=0.0):
  """Compiles the trainer's step for Experiment `exp` and times it on synthetic batches.

  Returns (timing stats, compile seconds, last step's metrics, final state).
  """
  from jaxgen import train_state
  step_fn = train_state.make_train_step(exp.family, exp.tx, exp.schedule, exp.config, exp.mesh,
                                        exp.shardings, sharding.batch_sharding(exp.mesh))
  batches = synthetic_batches(exp.config, exp.mesh, count=2)
  with exp.context():
    compiled, compile_s = timed_compile(step_fn, state, batches[0])
    holder = {'state': state, 'i': 0}

    def one_step():  # the state is donated, so each step consumes the previous one
      holder['state'], holder['metrics'] = compiled(holder['state'], batches[holder['i'] % 2])
      holder['i'] += 1
      return holder['metrics']

    stats = time_calls(one_step, steps, warmup=warmup, min_time_s=min_time_s)
    metrics = jax.device_get(holder['metrics'])
  return stats, compile_s, metrics, holder['state']


def matmul_flops_per_s(n, dtype, repeats=10):
  """Best-of-`repeats` FLOP/s of a jitted n x n @ n x n matmul (2 n^3 FLOPs)."""
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  mm = jax.jit(jnp.matmul)
  stats = time_calls(lambda: mm(a, b), steps=repeats, warmup=2)
  return 2.0 * n ** 3 / stats['min_s']


def matmul_ceilings():
  """Measured matmul ceilings in FLOP/s: f32 2048^3 everywhere, bf16 4096^3 on accelerators.

  On GPU, jax's default f32 matmul precision may use TF32 tensor cores.
  """
  out = {'float32': matmul_flops_per_s(2048, jnp.float32)}
  if on_accelerator():
    out['bfloat16'] = matmul_flops_per_s(4096, jnp.bfloat16)
  return out


def peak_bf16_flops(device_kind):
  """The table's dense bf16 peak for `device_kind`, or None (CPU, unknown GPU)."""
  if jax.default_backend() != 'gpu':
    return None
  for key, flops in PEAK_BF16:
    if key.lower() in device_kind.lower():
      return flops
  return None


# ----------------------------------------------------------------------------
# Memory and machine
# ----------------------------------------------------------------------------
def peak_memory():
  """(bytes, source): device peak bytes in use where the backend reports it, else process
  max RSS (cumulative over the whole process, so later rows include earlier ones)."""
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device_peak_bytes_in_use'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'process_max_rss'


def machine_info(ceilings):
  dev = jax.devices()[0]
  return {
      'backend': jax.default_backend(),
      'device_kind': dev.device_kind,
      'device_count': jax.device_count(),
      'process_count': jax.process_count(),
      'cpu_count': os.cpu_count(),
      'platform': platform.platform(),
      'jax_version': jax.__version__,
      'matmul_ceiling_flops': ceilings,
      'peak_bf16_flops': peak_bf16_flops(dev.device_kind),
  }


def param_count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def ratio(num, den):
  return None if num is None or not den else num / den


# ----------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------
def _fmt(value):
  if value is None:
    return '-'
  if isinstance(value, float):
    return f'{value:.4g}'
  if isinstance(value, int):
    return f'{value:,}'
  return str(value)


def format_table(rows, columns):
  """`columns`: (key, header) pairs; returns an aligned text table."""
  cells = [[header for _, header in columns]]
  cells += [[_fmt(row.get(key)) for key, _ in columns] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
  lines = ['  '.join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def format_machine(machine):
  ceil = ', '.join(f'{k} {v / 1e12:.3g} TFLOP/s' for k, v in machine['matmul_ceiling_flops'].items())
  peak = machine['peak_bf16_flops']
  return (f"{machine['backend']} x{machine['device_count']} ({machine['device_kind']}), "
          f"jax {machine['jax_version']}; measured matmul ceiling: {ceil}; "
          f"bf16 peak: {'-' if peak is None else f'{peak / 1e12:.4g} TFLOP/s'}")


def start():
  """Measures this machine's matmul ceilings and prints them: (ceilings, machine info)."""
  ceilings = matmul_ceilings()
  machine = machine_info(ceilings)
  print(format_machine(machine), flush=True)
  return ceilings, machine


def finish(args, rows, columns, machine):
  """Prints the table and writes rows + machine + args as JSON to args.out."""
  print(format_table(rows, columns))
  write_json(args.out, rows, machine, args)


def write_json(path, rows, machine, args):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump({'machine': machine, 'args': vars(args), 'rows': rows}, f, indent=2)
  print(f'wrote {path}')
