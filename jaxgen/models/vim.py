"""VIM stage 2 (Yu et al., 2022): a decoder-only Transformer over image token ids in raster
order, class-conditional through a prepended class token with its own embedding table.

One id space keeps the shared token sampler unchanged: ids 0..num_codes-1 are image codes,
num_codes + c is class c, and num_codes + num_classes is the null class (classifier-free
guidance and unconditional sampling). The model reads [class, t_1, ..., t_{N-1}] and predicts
[t_1, ..., t_N]; logits cover the codes only. Learned absolute positions, pre-LN blocks from
the shared layers with dropout, a final LayerNorm, an untied readout. The same model serves
FlexTok's AR stage.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen import sampling
from jaxgen.models import layers


class VIM(nn.Module):
  num_codes: int
  num_classes: int
  max_len: int  # 1 class token + the image's tokens
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @property
  def null_class(self):
    return self.num_codes + self.num_classes

  @nn.compact
  def __call__(self, tokens, *, train=False, decode=False):
    """tokens [B, n] (ids as above) -> logits over the codes [B, n, num_codes]."""
    n = tokens.shape[1]
    init = nn.initializers.normal(0.02)
    codes = self.param('code_embedding', layers.logical(init, ('vocab', 'embed')),
                       (self.num_codes, self.width))
    classes = self.param('class_embedding', layers.logical(init, (None, 'embed')),
                         (self.num_classes + 1, self.width))
    is_class = tokens >= self.num_codes
    x = jnp.where(is_class[..., None],
                  jnp.take(classes, jnp.clip(tokens - self.num_codes, 0, self.num_classes), 0),
                  jnp.take(codes, jnp.clip(tokens, 0, self.num_codes - 1), 0))
    start, queries, mask = layers.causal_positions(self, n, decode, self.max_len)
    pos = self.param('pos_embedding', layers.logical(init, (None, 'embed')),
                     (self.max_len, self.width))
    x = (x + jnp.take(pos, queries, 0)[None]).astype(self.dtype)
    x = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0)(x)
    for i in range(self.depth):
      x = layers.TransformerBlock(self.num_heads, self.mlp_dim, dropout=self.dropout,
                                  dtype=self.dtype, name=f'block{i}')(
          x, mask, decode=decode, cache_index=start, cache_len=self.max_len, train=train)
    x = layers.LayerNorm(dtype=self.dtype, name='final_norm')(x)
    logits = layers.dense(self.num_codes, ('embed', 'vocab'), dtype=self.dtype,
                          name='readout')(x)
    return logits.astype(jnp.float32)


def flops_per_example(*, num_tokens, num_codes, width, depth, mlp_dim):
  """Analytic forward matmul FLOPs of one sequence (class token + num_tokens - 1 codes)."""
  return layers.transformer_flops(num_tokens, width, depth, mlp_dim) + (
      2 * num_tokens * width * num_codes)


def init_cache(model, batch_size):
  """An empty KV cache of `model.max_len` slots for `batch_size` rows."""
  tokens = jnp.zeros((batch_size, model.max_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, decode=True))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['cache'])


def generate(model, params, labels, rng, *, num_tokens=None, temperature=1.0, top_k=0,
             top_p=1.0, cfg_scale=1.0, cached=True):
  """Class-conditional samples: codes [B, num_tokens] (default: all max_len - 1) for labels
  [B] (num_classes = unconditional), with the compiled KV-cache sampler (or, cached=False,
  the uncached reference). cfg_scale != 1 runs each row twice, with its class and with the
  null class, and samples from uncond + cfg_scale * (cond - uncond) logits."""
  num_tokens = num_tokens or model.max_len - 1
  guided = cfg_scale != 1.0
  prompt = (model.num_codes + labels.astype(jnp.int32))[:, None]

  def doubled(tokens):  # [cond rows; the same rows with the null class]
    if not guided:
      return tokens
    null = jnp.where(tokens >= model.num_codes, model.null_class, tokens)
    return jnp.concatenate([tokens, null])

  def guide(logits):
    if not guided:
      return logits
    cond, uncond = jnp.split(logits, 2)
    return uncond + cfg_scale * (cond - uncond)

  kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  if not cached:
    logits_fn = lambda tokens: guide(model.apply({'params': params}, doubled(tokens)))
    out = sampling.generate_uncached(logits_fn, prompt, num_tokens, rng, **kw)
  else:
    def step_fn(cache, tokens):
      logits, state = model.apply({'params': params, 'cache': cache}, doubled(tokens),
                                  decode=True, mutable=['cache'])
      return guide(logits), state['cache']
    cache = init_cache(model, prompt.shape[0] * (2 if guided else 1))
    out = sampling.generate(step_fn, cache, prompt, num_tokens, rng, **kw)
  return out[:, 1:]
