r"""jaxgen command line: train, evaluate, sample or describe a model from a config.

  python -m jaxgen.main --config=configs/dit.py:demo --workdir=workdirs/dit_demo
  python -m jaxgen.main --config=configs/dit.py:XL/2 --mode=info
  python -m jaxgen.main --config=configs/dit_moe.py:demo --workdir=DIR --mode=analyze  # MoE routing

Multi-host: pass --coordinator_address/--num_processes/--process_id (or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) on every host.
"""
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ('train', 'eval', 'sample', 'info', 'analyze')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file:variant.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, samples.')
_MODE = flags.DEFINE_enum('mode', 'train', MODES, 'What to do.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index.')


def initialize_distributed():
  """jax.distributed.initialize when flags or the environment ask for several processes."""
  import jax
  address = _COORDINATOR.value or os.environ.get('JAX_COORDINATOR_ADDRESS')
  num = _NUM_PROCESSES.value or int(os.environ.get('JAX_NUM_PROCESSES', '1'))
  if not address or num <= 1:
    return
  pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else int(
      os.environ.get('JAX_PROCESS_ID', '0'))
  # Cross-process collectives for CPU devices (harmless on GPU/TPU). Querying the
  # backend here would initialise it, which must wait for initialize().
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)


def format_info(info):
  lines = [f"family            {info['family']}",
           f"total params      {info['total_params']:,}",
           f"activated params  {info['activated_params']:,}",
           f"train FLOPs/ex    {info['train_flops_per_example']:.4g}",
           f"mesh              {info['mesh']}"]
  lines += [f"  {k + ' params':<24}{v:,}" for k, v in info.get('param_breakdown', {}).items()]
  lines += ['largest parameters (shape -> mesh sharding):']
  lines += [f"  {p['name']:<48} {str(p['shape']):<18} {p['sharding']}"
            for p in info['largest_params']]
  return '\n'.join(lines)


def run(config, workdir, mode):
  from jaxgen import trainer
  if mode == 'info':
    info = trainer.info(config, workdir)
    print(format_info(info))
    print(json.dumps(info))
    return
  if not workdir:
    from jaxgen.errors import UserError
    raise UserError(f'--workdir is required for --mode={mode}')
  os.makedirs(workdir, exist_ok=True)
  if mode == 'train':
    trainer.train(config, workdir)
  elif mode == 'eval':
    print(json.dumps(trainer.evaluate(config, workdir)))
  elif mode == 'sample':
    print(trainer.sample(config, workdir))
  elif mode == 'analyze':  # DiT-MoE routing heat maps -> workdir/analysis/routing/
    from jaxgen.analysis import routing
    print(json.dumps(routing.analyze(config, workdir)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from jaxgen.data import DatasetNotFoundError
  from jaxgen.errors import UserError
  config = _CONFIG.value
  if config is None:
    print('jaxgen: error: --config is required, e.g. --config=configs/dit.py:tiny',
          file=sys.stderr)
    sys.exit(2)
  logging.set_verbosity(logging.WARNING)
  try:
    initialize_distributed()
    run(config, _WORKDIR.value, _MODE.value)
  except (UserError, DatasetNotFoundError) as e:
    exit_with_error(str(e))


def exit_with_error(message):
  """Prints one line and exits 2 at once. Checkpoint saves were already awaited; what is
  skipped is interpreter teardown, where the threads of a failed orbax/tensorstore read
  print tracebacks into a closed event loop: stderr is closed to them first."""
  sys.stdout.flush()
  sys.stderr.flush()
  err = os.dup(2)
  os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
  os.write(err, f'jaxgen: error: {message}\n'.encode())
  os._exit(2)


def _parse_flags(argv):
  """absl flag parsing, with config errors (unknown variant, bad override) as one line."""
  from jaxgen.errors import UserError
  for i, arg in enumerate(argv):  # config_flags reports a missing file only on first use
    path = arg[len('--config='):] if arg.startswith('--config=') else (
        argv[i + 1] if arg == '--config' and i + 1 < len(argv) else None)
    if path is not None and not os.path.isfile(path.split(':')[0]):
      print(f'jaxgen: error: config file {path.split(":")[0]!r} not found; use e.g. '
            '--config=configs/dit.py:tiny', file=sys.stderr)
      sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except (UserError, flags.Error) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f'jaxgen: error: {msg}', file=sys.stderr)
    sys.exit(2)
  except OSError as e:  # config_flags could not load the file
    cause = e.__cause__ or e
    print(f'jaxgen: error: cannot load --config ({cause}); use e.g. '
          f'--config=configs/dit.py:tiny', file=sys.stderr)
    sys.exit(2)
  except (KeyError, AttributeError) as e:  # an override names a field the config lacks
    print(f'jaxgen: error: unknown config field in an override: {e}; '
          f'see --mode=info or the config file for valid fields', file=sys.stderr)
    sys.exit(2)


def entry_point():
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  entry_point()
