"""Executes every notebook in colabs/ end to end with a tiny configuration.

Contract for notebooks in colabs/: parameters come from `JAXGEN_NB_<NAME>` environment
variables, outputs go under `JAXGEN_NB_WORKDIR`, and a run writes at least one PNG there.
"""
import glob
import json
import os
import time

import shutil

import jax
import nbformat
from nbclient import NotebookClient

from conftest import FAST_XLA_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, 'colabs')

TINY_RUN = {
    'JAXGEN_NB_CONFIG': 'tiny',
    'JAXGEN_NB_TOTAL_STEPS': '3',
    'JAXGEN_NB_VIM_STEPS': '3',
    'JAXGEN_NB_FLEXTOK_STEPS': '3',
    'JAXGEN_NB_AR_STEPS': '3',
    'JAXGEN_NB_BATCH_SIZE': '8',
    'JAXGEN_NB_LOG_EVERY': '1',
    'JAXGEN_NB_SAMPLE_STEPS': '2',
    'JAXGEN_NB_CFG_SCALES': '1.0,3.0',
    'JAXGEN_REPO': REPO,
    # One device: the tiny runs gain nothing from 8 simulated ones but compile slower.
    'XLA_FLAGS': FAST_XLA_FLAGS,
}


def _errors(nb):
  return [(i, out.get('ename'), out.get('evalue'))
          for i, cell in enumerate(nb.cells) if cell.cell_type == 'code'
          for out in cell.get('outputs', []) if out.get('output_type') == 'error']


def test_every_notebook_runs(tmp_path, monkeypatch, request, tiny_vae):
  # The FlexTok notebook's first section resumes the session's trained tiny KL-VAE (a copy),
  # and the ViT-VQGAN one the session's tiny tokenizer: training them again here would only
  # repeat test_kl_vae's and test_vitvqgan's CLI runs.
  shutil.copytree(tiny_vae[0], tmp_path / 'kl_vae')
  monkeypatch.setenv('JAXGEN_NB_VAE_WORKDIR', str(tmp_path / 'kl_vae'))
  # Start this process's JAX backend now, with conftest's 8 devices: the XLA_FLAGS set below
  # are the kernels', and a backend first started under them (e.g. by the tokenizer fixture
  # below) would give every later test in this worker one device.
  assert len(jax.devices()) == 8
  paths = sorted(glob.glob(os.path.join(COLABS, '*.ipynb')))
  assert paths, f'no notebooks in {COLABS}'
  for name, value in TINY_RUN.items():
    monkeypatch.setenv(name, value)  # the kernel inherits this process's environment
  for path in paths:
    stem = os.path.splitext(os.path.basename(path))[0]
    workdir = tmp_path / stem
    monkeypatch.setenv('JAXGEN_NB_WORKDIR', str(workdir))
    if stem == 'vitvqgan_vim':
      # Requested only now: the tokenizer waits on the Fashion-MNIST classifier, which
      # another worker is usually training while the notebooks before this one run.
      tokenizer = request.getfixturevalue('tiny_tokenizer')[0]
      shutil.copytree(tokenizer, tmp_path / 'tokenizer')
      monkeypatch.setenv('JAXGEN_NB_TOKENIZER_WORKDIR', str(tmp_path / 'tokenizer'))
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get('outputs') for c in nb.cells if c.cell_type == 'code'), \
        f'{path} is committed with outputs; clear them'
    t0 = time.perf_counter()
    NotebookClient(nb, kernel_name='python3', timeout=300,
                   resources={'metadata': {'path': COLABS}}).execute()
    elapsed = time.perf_counter() - t0
    assert not _errors(nb), f'{path}: {_errors(nb)}'
    pngs = glob.glob(os.path.join(workdir, '**', '*.png'), recursive=True)
    assert pngs, f'{path} wrote no PNG under {workdir} ({elapsed:.0f} s)'
    if stem == 'dit_quickstart':
      names = sorted(os.path.basename(p) for p in pngs)
      assert names == ['cfg_1.png', 'cfg_3.png', 'step_0000003.png'], names
      with open(workdir / 'metrics.jsonl') as f:
        steps = [json.loads(line)['step'] for line in f if 'loss' in line]
      assert steps == [1, 2, 3], steps
      displayed = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
                   if 'image/png' in o.get('data', {})]
      assert len(displayed) >= 3, 'expected the loss plot, the trainer grid and the CFG grids'
