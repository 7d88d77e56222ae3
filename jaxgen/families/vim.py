"""VIM family: class-conditional autoregressive image generation over a trained tokenizer's codes.

The tokenizer is a trained workdir (config.tokenizer.workdir) of config.tokenizer.family:
a ViT-VQGAN (codes in raster order) or FlexTok (ordered 1D tokens; sample.num_tokens = k < N
generates only the first k and decodes them). Images are tokenized on the fly inside the
train step (its weights are frozen constants), the model learns next-token prediction after a
class token, and samples are decoded back to images by the tokenizer, so the trainer's PNG
grids and FID evaluation work unchanged.
"""
import jax
import jax.numpy as jnp
import optax

from jaxgen.errors import UserError
from jaxgen.families.base import FamilyBase
from jaxgen.models import vim

TOKENIZER_HINT = ('train one first: python -m jaxgen.main --config=configs/vitvqgan.py:demo '
                  '(or configs/flextok.py:demo) --workdir=DIR, then '
                  '--config.tokenizer.workdir=DIR')
TOKENIZERS = ('vitvqgan', 'flextok')


class Family(FamilyBase):

  def __init__(self, config):
    super().__init__(config)
    m, t = config.model, config.tokenizer
    self.model = vim.VIM(
        num_codes=t.codebook_size, num_classes=config.data.num_classes,
        max_len=t.num_tokens + 1, width=m.width, depth=m.depth, num_heads=m.num_heads,
        mlp_dim=m.mlp_dim, dropout=m.dropout, dtype=jnp.dtype(m.dtype))
    self._tokenizer = None
    if t.workdir:  # restored now, outside any trace (restoring sets a mesh)
      self._tokenizer = self._load_tokenizer()

  @property
  def tokenizer(self):
    """(tokenizer family, its EMA params) from config.tokenizer.workdir."""
    if self._tokenizer is None:
      raise UserError(f'VIM needs a trained tokenizer: {TOKENIZER_HINT}')
    return self._tokenizer

  def _load_tokenizer(self):
    t = self.config.tokenizer
    kind = t.get('family', 'vitvqgan')  # workdirs from before FlexTok name none
    if kind not in TOKENIZERS:
      raise UserError(f'unknown tokenizer.family {kind!r}: use one of {TOKENIZERS}')
    from jaxgen import trainer
    family, params, _, _ = trainer.load_trained(
        t.workdir, kind, TOKENIZER_HINT, self.config.data.data_dir)
    if (family.num_codes, family.num_tokens) != (t.codebook_size, t.num_tokens):
      raise UserError(
          f'tokenizer {t.workdir} has {family.num_codes} codes and {family.num_tokens} tokens '
          f'per image; set --config.tokenizer.codebook_size={family.num_codes} '
          f'--config.tokenizer.num_tokens={family.num_tokens}')
    return family, params

  def tokenize(self, images):
    family, params = self.tokenizer
    return jax.lax.stop_gradient(family.tokenize(params, images))

  def init_params(self, rng):
    tokens = jnp.zeros((1, self.model.max_len), jnp.int32)
    return self.model.init({'params': rng, 'dropout': rng}, tokens)['params']

  def loss(self, params, batch, rng, train):
    drop_rng, label_rng = jax.random.split(rng)
    codes = self.tokenize(batch['image'])
    labels = batch['label'].astype(jnp.int32)
    p = self.config.model.class_dropout
    if train and p > 0:  # the null class, for classifier-free guidance
      labels = jnp.where(jax.random.bernoulli(label_rng, p, labels.shape),
                         self.config.data.num_classes, labels)
    inputs = jnp.concatenate([(self.model.num_codes + labels)[:, None], codes[:, :-1]], axis=1)
    logits = self.model.apply({'params': params}, inputs, train=train,
                              rngs={'dropout': drop_rng})
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, codes)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == codes)
    return jnp.mean(nll), dict(accuracy=accuracy, bits_per_token=jnp.mean(nll) / jnp.log(2.0))

  def generate(self, params, labels, rng, **overrides):
    """Token ids [B, k] for class labels [B]; k = sample.num_tokens (0: all)."""
    s = self.config.sample
    kw = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, cfg_scale=s.cfg_scale,
              num_tokens=s.get('num_tokens') or None)
    kw.update(overrides)
    if kw['num_tokens'] and not 1 <= kw['num_tokens'] <= self.config.tokenizer.num_tokens:
      raise UserError(f"sample.num_tokens {kw['num_tokens']} is outside 1.."
                      f'{self.config.tokenizer.num_tokens} (the tokenizer\'s tokens per image)')
    return vim.generate(self.model, params, labels, rng, **kw)

  def sample(self, params, rng, labels):
    family, tok_params = self.tokenizer
    return jnp.clip(family.detokenize(tok_params, self.generate(params, labels, rng)), -1, 1)

  def flops_per_example(self, train=True):
    m, t = self.config.model, self.config.tokenizer
    f = vim.flops_per_example(num_tokens=t.num_tokens, num_codes=t.codebook_size,
                              width=m.width, depth=m.depth, mlp_dim=m.mlp_dim)
    return 3 * f if train else f  # the tokenizer's (frozen) forward pass is not counted
