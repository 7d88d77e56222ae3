"""The command line as a user meets it: bad input gets one clear line and exit code 2."""
import hashlib
import json
import os

import pytest

from conftest import run_cli

TINY = '--config=configs/dit.py:tiny'


def _one_error_line(proc):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith('jaxgen: error:')]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  return lines[0]


def _tree_digest(path):
  """Hash of every file under path, to prove nothing was changed or deleted."""
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      out[os.path.relpath(p, path)] = hashlib.sha1(open(p, 'rb').read()).hexdigest()
  return out


@pytest.mark.parametrize('args,expect', [
    (['--config=configs/dit.py:Q/2', '--mode=info'], 'unknown DiT variant'),
    (['--config=configs/nope.py:tiny', '--mode=info'], 'not found'),
    ([TINY, '--config.no_such_field=1', '--mode=info'], 'unknown config field'),
    ([TINY, '--config.mesh.data=2', '--mode=info'], 'needs 2 devices but 1'),
    ([TINY, '--config.optim.name=sgdx', '--mode=info'], 'unknown optimizer'),
    (['--config=configs/dit_moe.py:tiny', '--config.model.moe.grouped_matmul=gmm',
      '--mode=info'], "config.model.moe: unknown grouped_matmul 'gmm'"),
])
def test_bad_config_is_one_line(args, expect):
  assert expect in _one_error_line(run_cli(*args))


def test_overrides_parse_by_the_current_type_and_reject_bad_ones():
  from jaxgen import config_base
  from jaxgen.errors import UserError
  config = config_base.load_config('configs/lexinvariant.py', 'tiny')
  config_base.apply_overrides(config, ['model.width=48', 'optim.lr=3e-3', 'model.dtype=bfloat16',
                                       'progress_bar=true'])
  assert (config.model.width, config.optim.lr, config.model.dtype) == (48, 3e-3, 'bfloat16')
  assert config.progress_bar is True and isinstance(config.model.width, int)
  for bad, expect in [('model.no_such=1', "no 'model.no_such'"),
                      ('model.width.x=1', "no 'model.width.x'"),
                      ('model.width', 'write KEY=VALUE'),
                      ('model.width=wide', "'wide' is not a int"),
                      ('progress_bar=maybe', "'maybe' is not a bool")]:
    with pytest.raises(UserError, match=expect):
      config_base.apply_overrides(config, [bad])
  assert config.model.width == 48  # a rejected override changes nothing


def test_batch_not_divisible_by_mesh():
  proc = run_cli(TINY, '--config.batch_size=6', '--config.mesh.data=2', '--config.mesh.fsdp=2',
                 '--mode=info', devices=4)
  assert 'not divisible by the 4 batch shards' in _one_error_line(proc)


def test_missing_dataset_says_how_to_install(tmp_path):
  proc = run_cli(TINY, f'--workdir={tmp_path}/w', f'--config.data.data_dir={tmp_path}/d',
                 f'--config.data.manual_dir={tmp_path}/nothing')
  assert 'apt-get install' in _one_error_line(proc)


def test_sample_without_a_checkpoint_says_train_first(tmp_path, data_dir):
  proc = run_cli(TINY, f'--workdir={tmp_path}/w', f'--config.data.data_dir={data_dir}',
                 '--mode=sample')
  assert 'no checkpoint in' in _one_error_line(proc) and 'train first' in proc.stderr


def test_info_counts_without_allocating():
  proc = run_cli('--config=configs/dit.py:XL/2', '--config.data.channels=4',
                 '--config.data.num_classes=1000', '--mode=info')
  assert proc.returncode == 0, proc.stderr[-2000:]
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  # DiT paper: XL/2 has 675M parameters (ours omits the learned-sigma output channels).
  assert abs(info['total_params'] / 675e6 - 1) < 0.01
  assert info['activated_params'] == info['total_params']
  assert info['largest_params'][0]['shape'] == [1152, 6 * 1152]  # a block's adaLN projection
  assert info['train_flops_per_example'] == 3 * 2 * 118.6e9 or abs(
      info['train_flops_per_example'] / (6 * 118.6e9) - 1) < 0.01


def test_corrupt_checkpoint_fails_cleanly_and_keeps_files(data_dir, tmp_path):
  work = str(tmp_path / 'w')
  assert run_cli(TINY, f'--workdir={work}').returncode == 0
  ckpts = os.path.join(work, 'checkpoints')
  assert sorted(os.listdir(ckpts)) == ['2', '4']
  # Damage every array file of the newest checkpoint.
  for root, _, files in os.walk(os.path.join(ckpts, '4', 'state')):
    for f in files:
      if not f.startswith('_') and 'metadata' not in f:
        with open(os.path.join(root, f), 'r+b') as fh:
          fh.write(b'\x00garbage\x00' * 8)
  before = _tree_digest(ckpts)
  proc = run_cli(TINY, f'--workdir={work}', '--config.total_steps=6')
  line = _one_error_line(proc)
  assert 'unreadable' in line and 'nothing was deleted' in line
  assert _tree_digest(ckpts) == before


def test_nan_loss_stops_and_keeps_checkpoint(data_dir, tmp_path):
  work = str(tmp_path / 'w')
  assert run_cli(TINY, f'--workdir={work}', '--config.total_steps=2').returncode == 0
  before = _tree_digest(os.path.join(work, 'checkpoints'))
  proc = run_cli(TINY, f'--workdir={work}', '--config.total_steps=8', '--config.optim.lr=1e35')
  line = _one_error_line(proc)
  assert 'diverged' in line and 'step 2' in line
  assert _tree_digest(os.path.join(work, 'checkpoints')) == before


def test_eval_and_sample_modes_use_the_checkpoint(data_dir, tmp_path):
  work = str(tmp_path / 'w')
  assert run_cli(TINY, f'--workdir={work}', '--config.total_steps=2').returncode == 0
  proc = run_cli(TINY, f'--workdir={work}', '--mode=eval')
  assert proc.returncode == 0, proc.stderr[-2000:]
  metrics = json.loads(proc.stdout.strip().splitlines()[-1])
  assert metrics['eval/loss'] > 0
  assert json.load(open(os.path.join(work, 'eval_0000002.json')))['step'] == 2
  proc = run_cli(TINY, f'--workdir={work}', '--mode=sample', '--config.sample.cfg_scale=3.0',
                 '--config.sample.method=heun')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().endswith('samples/sample_step2_heun4_cfg3.png')
  assert os.path.exists(os.path.join(work, 'samples', 'step_0000002.png'))  # not overwritten
  # Without a checkpoint, eval is a one-line error.
  assert 'no checkpoint' in _one_error_line(run_cli(TINY, f'--workdir={tmp_path}/empty',
                                                    '--mode=eval'))
