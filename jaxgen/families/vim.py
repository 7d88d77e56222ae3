"""VIM family: class-conditional autoregressive image generation over a trained tokenizer's codes.

The tokenizer is a trained ViT-VQGAN workdir (config.tokenizer.workdir); images are tokenized
on the fly inside the train step (its weights are frozen constants), the VIM model learns
next-code prediction after a class token, and samples are decoded back to images by the
tokenizer, so the trainer's PNG grids and FID evaluation work unchanged.
"""
import jax
import jax.numpy as jnp
import optax

from jaxgen.errors import UserError
from jaxgen.families.base import FamilyBase
from jaxgen.models import vim

TOKENIZER_HINT = ('train one first: python -m jaxgen.main --config=configs/vitvqgan.py:demo '
                  '--workdir=DIR, then --config.tokenizer.workdir=DIR')


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
    from jaxgen import trainer
    family, params, config, _ = trainer.load_trained(
        t.workdir, 'vitvqgan', TOKENIZER_HINT, self.config.data.data_dir)
    m = config.model
    num_tokens = (config.data.image_size // m.patch_size) ** 2
    if (m.codebook_size, num_tokens) != (t.codebook_size, t.num_tokens):
      raise UserError(
          f'tokenizer {t.workdir} has {m.codebook_size} codes and {num_tokens} tokens per '
          f'image; set --config.tokenizer.codebook_size={m.codebook_size} '
          f'--config.tokenizer.num_tokens={num_tokens}')
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
    s = self.config.sample
    kw = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, cfg_scale=s.cfg_scale)
    kw.update(overrides)
    return vim.generate(self.model, params, labels, rng, **kw)

  def sample(self, params, rng, labels):
    family, tok_params = self.tokenizer
    return jnp.clip(family.detokenize(tok_params, self.generate(params, labels, rng)), -1, 1)

  def flops_per_example(self, train=True):
    m, t = self.config.model, self.config.tokenizer
    f = vim.flops_per_example(num_tokens=t.num_tokens, num_codes=t.codebook_size,
                              width=m.width, depth=m.depth, mlp_dim=m.mlp_dim)
    return 3 * f if train else f  # the tokenizer's (frozen) forward pass is not counted
