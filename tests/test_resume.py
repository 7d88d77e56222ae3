"""Checkpoints survive preemption: exact resume, SIGTERM saves, SIGKILL mid-save is harmless."""
import json
import os
import signal
import time

from conftest import run_cli, start_cli

TINY = '--config=configs/dit.py:tiny'


def _losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


def _wait_for(predicate, proc, timeout=180):
  t0 = time.time()
  while not predicate():
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    assert time.time() - t0 < timeout, 'timed out'
    time.sleep(0.2)


def _steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def test_resume_reproduces_uninterrupted_run(data_dir, tmp_path):
  full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
  assert run_cli(TINY, f'--workdir={full}', '--config.total_steps=6').returncode == 0
  assert run_cli(TINY, f'--workdir={part}', '--config.total_steps=3').returncode == 0
  proc = run_cli(TINY, f'--workdir={part}', '--config.total_steps=6')
  assert proc.returncode == 0, proc.stderr[-2000:]
  a, b = _losses(full), _losses(part)
  assert sorted(b) == [1, 2, 3, 4, 5, 6]  # the second run started at step 4
  for step in (4, 5, 6):
    assert a[step] == b[step], (step, a[step], b[step])  # bit-exact on CPU


def test_sigterm_saves_and_exits_cleanly(data_dir, tmp_path):
  work = str(tmp_path / 'w')
  proc = start_cli(TINY, f'--workdir={work}', '--config.total_steps=100000',
                   '--config.checkpoint_every=0', '--config.sample_every=0')
  _wait_for(lambda: os.path.exists(os.path.join(work, 'metrics.jsonl'))
            and len(_losses(work)) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert 'SIGTERM: saved checkpoint' in err
  steps = _steps(work)
  assert len(steps) == 1 and steps[0] >= 3 and steps[0] == max(_losses(work))


def test_sigkill_during_saves_leaves_a_restorable_checkpoint(data_dir, tmp_path):
  work = str(tmp_path / 'w')
  # Saving every step, a SIGKILL is very likely to land inside a save.
  proc = start_cli(TINY, f'--workdir={work}', '--config.total_steps=100000',
                   '--config.checkpoint_every=1', '--config.keep_checkpoints=2')
  _wait_for(lambda: len(_steps(work)) >= 2 and max(_steps(work)) >= 5, proc)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  last = max(_steps(work))
  resumed = run_cli(TINY, f'--workdir={work}', f'--config.total_steps={last + 2}',
                    '--config.checkpoint_every=1')
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert max(_steps(work)) == last + 2
