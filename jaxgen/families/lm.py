"""Language-model family: standard, lexinvariant and semi-lexinvariant decoder-only LMs.

config.model.embedding picks the mode:
  standard      learned embedding table, tied readout;
  lexinvariant  a fresh N(0, I) table per sequence (from a per-sequence key), tied readout
                (config.model.table=orthogonal: random orthogonal rows of the same scale;
                config.model.shared_table_steps=N: one fixed table for the first N steps,
                and shared_table_decay_steps=D: then for a linearly shrinking share of the
                sequences over D more steps);
  semi          standard embeddings, trained on sequences where a Bernoulli(p) subset of
                positions goes through a random per-sequence vocabulary permutation.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgen import sampling
from jaxgen.errors import UserError
from jaxgen.families.base import FamilyBase
from jaxgen.models import lm

MODES = ('standard', 'lexinvariant', 'semi')
SHARED_TABLE_SALT = 0x7AB1E  # folded into the config seed: the warmup's one table


def permute_subset(tokens, rng, p, vocab_size):
  """Maps each position of tokens [B, T], with probability p, through a random permutation
  of the vocabulary drawn per sequence; returns (tokens, mask of chosen positions)."""
  perm_rng, mask_rng = jax.random.split(rng)
  keys = jax.random.split(perm_rng, tokens.shape[0])
  perms = jax.vmap(lambda k: jax.random.permutation(k, vocab_size))(keys)
  mask = jax.random.bernoulli(mask_rng, p, tokens.shape)
  permuted = jnp.take_along_axis(perms, tokens, axis=1)
  return jnp.where(mask, permuted, tokens).astype(tokens.dtype), mask


class Family(FamilyBase):
  """A decoder-only Transformer LM on a tokenized text dataset (see jaxgen/data/text.py)."""

  def __init__(self, config):
    super().__init__(config)
    m, d = config.model, config.data
    if m.embedding not in MODES:
      raise UserError(f'unknown --config.model.embedding={m.embedding!r}: use one of {MODES}')
    self.mode = m.embedding
    self.table = m.get('table', 'gaussian')  # workdirs saved before the option: gaussian
    if self.table not in lm.TABLES:
      raise UserError(f'unknown --config.model.table={self.table!r}: use one of {lm.TABLES}')
    for name in ('shared_table_steps', 'shared_table_decay_steps'):
      steps = m.get(name, 0)
      if steps < 0 or (steps and self.mode != 'lexinvariant'):
        raise UserError(f'--config.model.{name}={steps}: a number of steps >= 0, and only for '
                        'embedding=lexinvariant (the others have no random tables)')
    if self.table == 'orthogonal' and m.width < d.vocab_size:
      raise UserError(f'--config.model.table=orthogonal needs model.width >= the vocabulary '
                      f'({m.width} < {d.vocab_size}): use table=gaussian or a wider model')
    self.model = lm.TransformerLM(
        vocab_size=d.vocab_size, width=m.width, depth=m.depth, num_heads=m.num_heads,
        mlp_dim=m.mlp_dim, max_len=d.seq_len,
        embedding='lexinvariant' if self.mode == 'lexinvariant' else 'standard',
        position=m.position, mlp_kind=m.mlp_kind, rel_buckets=m.rel_buckets,
        rel_max_distance=m.rel_max_distance, logit_scale_init=m.logit_scale_init,
        dtype=jnp.dtype(m.dtype))

  # -- the model ----------------------------------------------------------------
  def tables(self, rng, batch_size, shared=False):
    """Per-sequence random tables (lexinvariant mode), else None: row i uses split(rng)[i].

    shared (a traced bool, or bools [B, 1]) instead gives every row (each row where it is
    True) the one table of a fixed key, the same at every step: the table warmup of
    `config.model.shared_table_steps` (see shared_rows)."""
    keys = jax.random.split(rng, batch_size)
    if shared is not False:
      fixed = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), SHARED_TABLE_SALT)
      keys = jnp.where(shared, jnp.broadcast_to(fixed, keys.shape), keys)
    return self.tables_from_keys(keys)

  def tables_from_keys(self, keys):
    """One random table per key [B] (config.model.table: gaussian or orthogonal), else None."""
    if self.mode != 'lexinvariant':
      return None
    return lm.random_tables(keys, self.config.data.vocab_size, self.config.model.width,
                            kind=self.table)

  def apply(self, params, tokens, tables=None, **kwargs):
    return self.model.apply({'params': params}, tokens, tables, **kwargs)

  def init_params(self, rng):
    tokens = jnp.zeros((1, 8), jnp.int32)
    return self.model.init(rng, tokens, self.tables(rng, 1))['params']

  def token_losses(self, params, inputs, targets, rng, shared_table=False):
    """Next-token cross entropy [B, T] and logits, with this batch's tables from `rng` (or
    the one shared table, see `tables`)."""
    logits = self.apply(params, inputs, self.tables(rng, inputs.shape[0], shared_table))
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets), logits

  def shared_table_share(self, step):
    """The share of sequences trained with the one shared table at `step`: 1 for the first
    N = shared_table_steps steps, then falling linearly to 0 over D = shared_table_decay_steps
    more (at once when D = 0). Not in the paper: one table teaches n-gram statistics, which
    build the copying circuit that fresh tables give no first-order signal for, and the slow
    decay lets that circuit carry over to fresh tables (a sudden switch loses it on mixed
    text; benchmarks/measured/cpu_lm_copying.json)."""
    m = self.config.model
    n, d = m.get('shared_table_steps', 0), m.get('shared_table_decay_steps', 0)
    return jnp.clip((n + d - step) / (d + 1), 0.0, 1.0)

  def shared_rows(self, rng, batch_size, step):
    """Bools [B, 1] for `tables`: each row uses the shared table with probability
    shared_table_share(step); False (fresh tables only) when there is no warmup."""
    m = self.config.model
    if self.mode != 'lexinvariant' or not (m.get('shared_table_steps', 0) or
                                           m.get('shared_table_decay_steps', 0)):
      return False
    rng = jax.random.fold_in(rng, SHARED_TABLE_SALT)
    return jax.random.uniform(rng, (batch_size, 1)) < self.shared_table_share(step)

  def train_loss(self, params, batch, rng, step):
    """The loss with fresh tables, or in the warmup the shared one for some rows."""
    shared = self.shared_rows(rng, batch['inputs'].shape[0], step)
    return self.loss(params, batch, rng, train=True, shared_table=shared)

  def loss(self, params, batch, rng, train, shared_table=False):
    table_rng, semi_rng = jax.random.split(rng)
    inputs, targets = batch['inputs'], batch['targets']
    metrics = {}
    if self.mode == 'semi' and train:
      window = jnp.concatenate([inputs, targets[:, -1:]], axis=1)
      window, mask = permute_subset(window, semi_rng, self.config.model.semi_p,
                                    self.config.data.vocab_size)
      inputs, targets = window[:, :-1], window[:, 1:]
      metrics['permuted_fraction'] = mask.mean()
    losses, logits = self.token_losses(params, inputs, targets, table_rng, shared_table)
    loss = losses.mean()
    accuracy = (jnp.argmax(logits, -1) == targets).mean()
    return loss, dict(metrics, accuracy=accuracy, bits_per_token=loss / jnp.log(2.0))

  # -- sampling -----------------------------------------------------------------
  def init_cache(self, batch_size, length):
    """An empty KV cache for `length` positions."""
    model = self.model.clone(max_len=length)
    tokens = jnp.zeros((batch_size, length), jnp.int32)
    tables = self.tables(jax.random.PRNGKey(0), batch_size)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tables,
                                               decode=True))['cache']
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def generate(self, params, prompts, num_new, rng, tables=None, *, temperature=None,
               top_k=None, cached=True):
    """prompts [B, P] continued by num_new tokens with the compiled KV-cache sampler (or the
    uncached reference); tables default to fresh ones from `rng` in lexinvariant mode."""
    s = self.config.sample
    temperature = s.temperature if temperature is None else temperature
    top_k = s.top_k if top_k is None else top_k
    table_rng, rng = jax.random.split(rng)
    if tables is None:
      tables = self.tables(table_rng, prompts.shape[0])
    length = prompts.shape[1] + num_new
    model = self.model.clone(max_len=length)
    if not cached:
      logits_fn = lambda tokens: model.apply({'params': params}, tokens, tables)
      return sampling.generate_uncached(logits_fn, prompts, num_new, rng,
                                        temperature=temperature, top_k=top_k)

    def step_fn(cache, tokens):
      logits, state = model.apply({'params': params, 'cache': cache}, tokens, tables,
                                  decode=True, mutable=['cache'])
      return logits, state['cache']

    return sampling.generate(step_fn, self.init_cache(prompts.shape[0], length), prompts,
                             num_new, rng, temperature=temperature, top_k=top_k)

  def sample(self, params, rng, prompts):
    return self.generate(params, prompts, self.config.sample.num_new, rng)

  def sample_inputs(self):
    """The first prompt_len tokens of the first num_prompts test windows (read once: every
    periodic sample uses the same prompts)."""
    if not hasattr(self, '_prompts'):
      s = self.config.sample
      it = self.make_iterator('test', global_batch_size=s.num_prompts, seed=0, train=False)
      self._prompts = jnp.asarray(next(it)['inputs'][:, :s.prompt_len])
    return self._prompts

  def tokenizer(self):
    if not hasattr(self, '_tokenizer'):
      from jaxgen.data import tokenizers
      self._tokenizer = tokenizers.make_tokenizer(self.config.data)
    return self._tokenizer

  def write_samples(self, outputs, stem, writer, step, save=True):
    """Decoded prompts | continuations, one block per prompt, to stem + '.txt'."""
    tok, p = self.tokenizer(), self.config.sample.prompt_len
    blocks = [f'--- sample {i} ---\n{tok.decode(row[:p])}|{tok.decode(row[p:])}'
              for i, row in enumerate(np.asarray(outputs))]
    text = '\n'.join(blocks) + '\n'
    if save:
      os.makedirs(os.path.dirname(stem), exist_ok=True)
      with open(stem + '.txt', 'w') as f:
        f.write(text)
    if writer is not None:
      writer.write_texts(step, {'samples': text})
    return stem + '.txt'

  # -- data and accounting ------------------------------------------------------
  def make_iterator(self, split, *, global_batch_size, seed, train):
    from jaxgen.data import text
    return text.make_text_iterator(self.config.data, split, global_batch_size=global_batch_size,
                                   seed=seed, process_index=jax.process_index(),
                                   process_count=jax.process_count(), train=train)

  def flops_per_example(self, train=True):
    m, d = self.config.model, self.config.data
    per_token = lm.flops_per_token(vocab_size=d.vocab_size, width=m.width, depth=m.depth,
                                   mlp_dim=m.mlp_dim, seq_len=d.seq_len, mlp_kind=m.mlp_kind)
    return per_token * d.seq_len * (3 if train else 1)
