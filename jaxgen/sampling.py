"""Sampling toolkit shared by the families: guidance wrappers and the compiled
autoregressive token sampler (KV cache, lax.scan) with its uncached reference."""
import jax
import jax.numpy as jnp


def classifier_free_guidance(apply_fn, labels, null_label, scale):
  """Wraps apply_fn(z, t, labels) into denoise(z, t) = uncond + scale * (cond - uncond).

  The conditional and unconditional halves run as one doubled batch.
  """
  if scale == 1.0:
    return lambda z, t: apply_fn(z, t, labels)

  def denoise(z, t):
    out = apply_fn(jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                   jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
    cond, uncond = jnp.split(out, 2)
    return uncond + scale * (cond - uncond)

  return denoise


def apg_update(cond, uncond, scale, momentum_buffer, *, momentum=-0.5, norm_threshold=2.5,
               eta=0.0):
  """Adaptive projected guidance (Sadat et al., 2024) for one sampler step; returns
  (guided, new_buffer).

    buffer = (cond - uncond) + momentum * buffer     (the paper's MomentumBuffer)
    diff   = buffer, its L2 norm per example clipped to norm_threshold (<= 0: no clip)
    diff   = parallel + orth, parallel = <diff, c^> c^ with c^ = cond / |cond|
    guided = cond + (scale - 1) * (orth + eta * parallel)

  Norms and the projection run over all non-batch dims, in float32. As in the paper the
  clip and projection act on the running average, and the buffer keeps it unclipped. With
  momentum=0, norm_threshold=0, eta=1 this is plain CFG. `momentum_buffer` None counts as
  zeros; the new buffer keeps the old one's dtype (float32 from None), so it can be a loop
  carry. A sampler threads it through its loop:

    def step(i, carry):
      z, buf = carry
      cond, uncond = jnp.split(apply_fn(jnp.concatenate([z, z]), ...), 2)
      v, buf = apg_update(cond, uncond, scale, buf)
      return z - dt * v, buf

    z, _ = jax.lax.fori_loop(0, num_steps, step, (noise, jnp.zeros(noise.shape, jnp.float32)))
  """
  dtype = cond.dtype
  cond32, uncond32 = cond.astype(jnp.float32), uncond.astype(jnp.float32)
  axes = tuple(range(1, cond.ndim))
  buffer = cond32 - uncond32
  if momentum_buffer is not None:
    buffer = buffer + momentum * momentum_buffer.astype(jnp.float32)
  diff = buffer
  if norm_threshold > 0:
    norm = jnp.sqrt(jnp.sum(jnp.square(diff), axis=axes, keepdims=True))
    diff = diff * jnp.minimum(1.0, norm_threshold / jnp.maximum(norm, 1e-12))
  unit = cond32 / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(cond32), axis=axes, keepdims=True)),
                              1e-12)
  parallel = jnp.sum(diff * unit, axis=axes, keepdims=True) * unit
  update = (diff - parallel) + eta * parallel
  guided = (cond32 + (scale - 1) * update).astype(dtype)
  new_dtype = jnp.float32 if momentum_buffer is None else momentum_buffer.dtype
  return guided, buffer.astype(new_dtype)


def class_grid_labels(num_classes, per_class):
  """Labels for a grid with one row per class: [0]*per_class + [1]*per_class + ..."""
  return jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), per_class)


# ----------------------------------------------------------------------------
# Autoregressive token sampling (LM, VIM, FlexTok AR)
# ----------------------------------------------------------------------------
def top_p_mask(logits, top_p):
  """True for the tokens of the nucleus: the most probable tokens whose cumulative
  probability first reaches top_p (always at least the most probable one)."""
  order = jnp.argsort(-logits, axis=-1)
  probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more probable tokens
  keep_sorted = before < top_p
  return jnp.put_along_axis(jnp.zeros_like(keep_sorted), order, keep_sorted, axis=-1,
                            inplace=False)


def sample_token(logits, rng, temperature=1.0, top_k=0, top_p=1.0):
  """One token per row of logits [B, V]: greedy at temperature 0, else softmax(logits / T)
  restricted to the top_k largest (0 = all) and then to the top_p nucleus (1 = all)."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    logits = jnp.where(top_p_mask(logits, top_p), logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(step_fn, cache, prompt, num_new, rng, *, temperature=1.0, top_k=0, top_p=1.0):
  """Continues `prompt` [B, P] by `num_new` tokens with a KV cache; returns [B, P + num_new].

  step_fn(cache, tokens [B, n]) -> (logits [B, n, V], cache) appends n tokens to the cache.
  The prompt is prefilled in one call, then one lax.scan step per new token, so the whole
  loop compiles once for given shapes. Token t is drawn with fold_in(rng, t), as in
  `generate_uncached`.
  """
  p = prompt.shape[1]
  logits, cache = step_fn(cache, prompt)
  first = sample_token(logits[:, -1], jax.random.fold_in(rng, p), temperature, top_k, top_p)

  def step(carry, t):
    cache, token = carry
    logits, cache = step_fn(cache, token[:, None])
    nxt = sample_token(logits[:, -1], jax.random.fold_in(rng, t), temperature, top_k, top_p)
    return (cache, nxt), token

  (_, last), tokens = jax.lax.scan(step, (cache, first), p + 1 + jnp.arange(num_new - 1))
  new = jnp.concatenate([tokens.T, last[:, None]], axis=1) if num_new > 1 else last[:, None]
  return jnp.concatenate([prompt, new], axis=1)


def generate_uncached(logits_fn, prompt, num_new, rng, *, temperature=1.0, top_k=0,
                      top_p=1.0):
  """The reference for `generate`: recomputes logits_fn(tokens [B, P + num_new]) -> [B, T, V]
  over the whole (causal) buffer for every new token. O(T) times the work; for tests."""
  b, p = prompt.shape
  buffer = jnp.concatenate([prompt, jnp.zeros((b, num_new), prompt.dtype)], axis=1)

  def step(t, buffer):
    logits = jax.lax.dynamic_index_in_dim(logits_fn(buffer), t - 1, axis=1, keepdims=False)
    token = sample_token(logits, jax.random.fold_in(rng, t), temperature, top_k, top_p)
    return jax.lax.dynamic_update_index_in_dim(buffer, token.astype(buffer.dtype), t, axis=1)

  return jax.lax.fori_loop(p, p + num_new, step, buffer)
