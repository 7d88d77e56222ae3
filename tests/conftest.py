"""Shared test setup: 8 simulated CPU devices in-process, a hermetic prepared dataset, CLI runner."""
import os
import subprocess
import sys

# Test-speed settings, shared with every subprocess the tests start. Compilation
# dominates the tests' time on 2 cores: XLA's backend optimisation level 0 halves
# it (the tests' tiny models do not care about run-time speed), and a persistent
# compilation cache lets repeated CLI runs of one config skip it altogether.
FAST_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(REPO, '.pytest_cache', 'jax-compilation-cache'))
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Must happen before jax is imported anywhere in the test process.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + FAST_XLA_FLAGS +
                           ' --xla_force_host_platform_device_count=8').strip()

import pytest  # noqa: E402


def load_config(path, arg):
  """configs/<family>.py:get_config(arg), loaded by path as config_flags does."""
  from jaxgen.config_base import load_config as load
  return load(path, arg)


def load_script(name):
  """scripts/<name>.py imported as a module (the scripts are not a package)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'scripts', name + '.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tree_norm(tree):
  """The L2 norm of a pytree, in NumPy float64: eager jnp ops (optax.tree.norm outside jit)
  compile a program per leaf shape, ~20 ms each."""
  import jax
  import numpy as np
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree.leaves(tree))))


def shared_dir(tmp_path_factory, name):
  """A directory shared by every pytest-xdist worker of this run (the run's base temp dir is
  per worker), so what is built once per session is built once per run."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent
  path = base / name
  path.mkdir(exist_ok=True)
  return str(path)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """Fashion-MNIST prepared once per run into a temp dir (and exported for subprocesses)."""
  from jaxgen.data import default_data_config, prepare_dataset
  path = shared_dir(tmp_path_factory, 'tfds')
  cfg = default_data_config()
  cfg.data_dir = path
  prepare_dataset(cfg)  # file-locked: one worker builds, the others wait
  os.environ['JAXGEN_DATA_DIR'] = path
  return path


@pytest.fixture
def tiny_config(data_dir):
  """A config (default: the tiny DiT) reading the session's prepared Fashion-MNIST."""
  def make(arg='tiny', path='configs/dit.py'):
    cfg = load_config(path, arg)
    cfg.data.data_dir = data_dir
    return cfg
  return make


def cli_env(devices=1, **extra):
  env = dict(os.environ, XLA_FLAGS=FAST_XLA_FLAGS)
  if devices > 1:
    env['XLA_FLAGS'] += f' --xla_force_host_platform_device_count={devices}'
  env.update({k: str(v) for k, v in extra.items()})
  return env


def run_cli(*args, devices=1, timeout=240, env=None):
  """Runs `python -m jaxgen.main ARGS` in the repo; returns CompletedProcess (text)."""
  return subprocess.run([sys.executable, '-m', 'jaxgen.main', *args], cwd=REPO,
                        env=env or cli_env(devices), capture_output=True, text=True,
                        timeout=timeout)


def start_cli(*args, devices=1, env=None):
  return subprocess.Popen([sys.executable, '-m', 'jaxgen.main', *args], cwd=REPO,
                          env=env or cli_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope='session')
def fmnist_classifier(data_dir):
  """The Fashion-MNIST feature network, trained once per session by its CLI into `data_dir`.

  Returns (variables, test accuracy, CLI stdout, data config). The CLI runs without
  FAST_XLA_FLAGS: unlike the tiny models elsewhere, this training's run time matters, and
  unoptimised XLA code runs its steps about 3x slower.
  """
  import types
  from jaxgen.data import default_data_config
  from jaxgen.data.files import file_lock
  from jaxgen.metrics import fmnist_net
  log = os.path.join(data_dir, 'fmnist_classifier_cli.log')
  with file_lock(os.path.join(data_dir, '.fmnist_classifier.lock')):  # one worker trains
    if not os.path.exists(log):
      cmd = [sys.executable, '-m', 'jaxgen.metrics.fmnist_net', f'--data_dir={data_dir}']
      proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, XLA_FLAGS=''),
                            capture_output=True, text=True, timeout=600)
      assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
      with open(log, 'w') as f:
        f.write(proc.stdout)
  with open(log) as f:
    stdout = f.read()
  cfg = default_data_config()
  cfg.data_dir = data_dir
  variables, accuracy = fmnist_net.read_classifier_file(fmnist_net.classifier_path(cfg))
  return types.SimpleNamespace(variables=variables, accuracy=accuracy, stdout=stdout,
                               data_config=cfg)


@pytest.fixture(scope='session')
def tiny_tokenizer(tmp_path_factory, data_dir, fmnist_classifier):
  """A configs/vitvqgan.py:tiny workdir trained once per run by the CLI (4 steps, the
  discriminator from step 2) with its final eval (PSNR, codebook usage, rFID); the VIM
  tests tokenize with it. Returns (workdir, CompletedProcess or None if already trained)."""
  from jaxgen.data.files import file_lock
  workdir = os.path.join(shared_dir(tmp_path_factory, 'tiny_tokenizer'), 'workdir')
  proc = None
  with file_lock(workdir + '.lock'):
    if not os.path.exists(os.path.join(workdir, 'done')):
      proc = run_cli('--config=configs/vitvqgan.py:tiny', f'--workdir={workdir}',
                     f'--config.data.data_dir={data_dir}', '--config.eval_every=4',
                     '--config.eval.metrics=loss,fid', '--config.eval.num_samples=16',
                     '--config.eval.num_real=64')
      assert proc.returncode == 0, proc.stderr[-3000:]
      open(os.path.join(workdir, 'done'), 'w').close()
  return workdir, proc


@pytest.fixture(scope='session')
def tiny_vae(tmp_path_factory, data_dir):
  """A configs/kl_vae.py:tiny workdir trained once per run by the CLI (4 steps, the
  discriminator from step 2, a final loss eval); FlexTok trains in its latent space.
  Returns (workdir, CompletedProcess or None if already trained)."""
  from jaxgen.data.files import file_lock
  workdir = os.path.join(shared_dir(tmp_path_factory, 'tiny_vae'), 'workdir')
  proc = None
  with file_lock(workdir + '.lock'):
    if not os.path.exists(os.path.join(workdir, 'done')):
      proc = run_cli('--config=configs/kl_vae.py:tiny', f'--workdir={workdir}',
                     f'--config.data.data_dir={data_dir}', '--config.eval_every=4')
      assert proc.returncode == 0, proc.stderr[-3000:]
      open(os.path.join(workdir, 'done'), 'w').close()
  return workdir, proc


@pytest.fixture(scope='session')
def text_data_dir(tmp_path_factory):
  """The Shakespeare text dataset prepared once per session into a temp dir."""
  from jaxgen.data import text
  path = shared_dir(tmp_path_factory, 'text_tfds')
  cfg = text.text_data_config()
  cfg.data_dir = path
  text.prepare(cfg)
  return path


@pytest.fixture
def tiny_lm_config(text_data_dir):
  """configs/lexinvariant.py:tiny,<mode> reading the session's prepared Shakespeare."""
  def make(mode='lexinvariant'):
    cfg = load_config('configs/lexinvariant.py', f'tiny,{mode}')
    cfg.data.data_dir = text_data_dir
    return cfg
  return make


# Files whose tests take longest run first (ordered by measured total time): with one
# file per worker (--dist loadfile --no-loadscope-reorder) a long file started last would leave
# the other worker idle at the end of the run. The first two go to different workers: the
# notebooks' tokenizer section waits on test_vitvqgan's classifier and tiny tokenizer.
SLOW_FILES_FIRST = ('test_notebooks.py', 'test_vitvqgan.py', 'test_flextok.py', 'test_dit_moe.py',
                    'test_kl_vae.py', 'test_cli.py', 'test_train.py', 'test_lm.py',
                    'test_lm_evals.py', 'test_resume.py', 'test_vim.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
