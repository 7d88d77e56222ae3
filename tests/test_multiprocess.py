"""Two processes with jax.distributed on 127.0.0.1 (gloo) train like one process."""
import json
import os
import socket
import subprocess
import sys

from conftest import REPO, cli_env, run_cli


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [r['loss'] for r in rows if 'loss' in r]


def test_two_processes_match_single_process(data_dir, tmp_path):
  args = ['--config=configs/dit.py:tiny', '--config.total_steps=3',
          '--config.checkpoint_every=0', '--config.data.num_threads=1']
  single = str(tmp_path / 'single')
  proc = run_cli(*args, f'--workdir={single}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  multi = str(tmp_path / 'multi')
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'jaxgen.main', *args, f'--workdir={multi}',
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
      cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # Each process had one CPU device: the mesh spans two processes, batch split across them.
  expected, got = _losses(single), _losses(multi)
  assert len(got) == 3
  for a, b in zip(expected, got):
    assert abs(a - b) <= 1e-5 * abs(a), (expected, got)
  # Both processes took part in the final (multi-process) orbax checkpoint.
  assert sorted(os.listdir(os.path.join(multi, 'checkpoints'))) == ['3']
