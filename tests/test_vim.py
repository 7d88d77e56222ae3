"""VIM (stage-2 AR model) and the shared sampler's nucleus filter: KV cache == uncached,
causality, class conditioning, the loss falls."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config, run_cli
from jaxgen import families, sampling
from jaxgen.errors import UserError
from jaxgen.models import vim

MODEL = vim.VIM(num_codes=24, num_classes=3, max_len=10, width=32, depth=2, num_heads=2,
                mlp_dim=64, dropout=0.1)


@pytest.fixture(scope='module')
def params():
  return MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 10), jnp.int32))['params']


def test_top_p_mask_matches_numpy():
  logits = np.random.default_rng(0).normal(size=(4, 12)).astype(np.float32) * 2
  for top_p in (0.05, 0.5, 0.9, 0.999):
    got = np.asarray(sampling.top_p_mask(jnp.asarray(logits), top_p))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for row, p in zip(got, probs):
      order = np.argsort(-p)
      k = int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)  # smallest set reaching top_p
      want = np.zeros_like(row)
      want[order[:k]] = True
      np.testing.assert_array_equal(row, want)


def test_causal_and_class_conditioned(params):
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, 24).at[:, 0].set(24)
  logits = MODEL.apply({'params': params}, tokens)
  changed = MODEL.apply({'params': params}, tokens.at[:, 6].set((tokens[:, 6] + 1) % 24))
  np.testing.assert_allclose(logits[:, :6], changed[:, :6], atol=1e-5)
  assert float(jnp.max(jnp.abs(logits[:, 6:] - changed[:, 6:]))) > 1e-4
  other_class = MODEL.apply({'params': params}, tokens.at[:, 0].set(25))
  assert float(jnp.max(jnp.abs(logits - other_class))) > 1e-4


@pytest.mark.parametrize('kw', [dict(temperature=0.0), dict(temperature=1.0),
                                dict(temperature=0.9, top_k=8, top_p=0.8),
                                dict(temperature=1.0, cfg_scale=2.5)])
def test_kv_cache_sampling_equals_uncached(params, kw):
  labels = jnp.array([0, 1, 2, 3])  # 3 = unconditional (the null class)
  run = lambda cached: jax.jit(lambda p, r: vim.generate(MODEL, p, labels, r, cached=cached,
                                                         **kw))(params, jax.random.PRNGKey(5))
  cached, uncached = run(True), run(False)
  assert cached.shape == (4, 9) and int(cached.max()) < 24
  np.testing.assert_array_equal(cached, uncached)


def test_tiny_vim_loss_falls(params):
  """Teacher-forced next-code loss on a fixed batch falls under Adam (dropout on)."""
  codes = jax.random.randint(jax.random.PRNGKey(2), (8, 9), 0, 24)
  labels = jnp.arange(8) % 3
  inputs = jnp.concatenate([(24 + labels)[:, None], codes[:, :-1]], axis=1)
  tx = optax.adam(3e-3)

  def loss_fn(p, rng):
    logits = MODEL.apply({'params': p}, inputs, train=True, rngs={'dropout': rng})
    return optax.softmax_cross_entropy_with_integer_labels(logits, codes).mean()

  @jax.jit
  def step(p, o, rng):
    loss, g = jax.value_and_grad(loss_fn)(p, rng)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  p, o, losses = params, tx.init(params), []
  for i in range(40):
    p, o, loss = step(p, o, jax.random.PRNGKey(i))
    losses.append(float(loss))
  assert losses[0] > np.log(24) - 0.5 and np.mean(losses[-5:]) < 0.6 * losses[0]


def test_vim_cli_trains_over_the_tokenizer_and_samples(tiny_tokenizer, data_dir, tmp_path):
  """The trainer's loop on codes of the session's tiny tokenizer (tokenized on the fly); the
  samples are decoded by the tokenizer into a labelled class grid."""
  tok_workdir, _ = tiny_tokenizer
  workdir = str(tmp_path / 'vim')
  proc = run_cli('--config=configs/vim.py:tiny', f'--workdir={workdir}',
                 f'--config.tokenizer.workdir={tok_workdir}',
                 f'--config.data.data_dir={data_dir}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(f'{workdir}/metrics.jsonl')]
  assert len(rows) == 4 and all(np.isfinite(r['loss']) for r in rows)
  assert rows[0]['loss'] > np.log(64) - 1.0  # near uniform over the 64 codes at the start
  assert os.path.exists(f'{workdir}/samples/step_0000004.png')


def test_vim_tokenizer_errors(tiny_tokenizer, tiny_config):
  cfg = tiny_config('tiny', path='configs/vim.py')
  with pytest.raises(UserError, match='needs a trained tokenizer'):
    families.get_family(cfg).tokenizer
  cfg.tokenizer.update(workdir=tiny_tokenizer[0], codebook_size=128)
  with pytest.raises(UserError, match='codebook_size=64'):
    families.get_family(cfg)
  with pytest.raises(UserError, match='unknown vim variant'):
    load_config('configs/vim.py', 'VIM-H')
