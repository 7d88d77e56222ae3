"""FlexTok family: a 1D tokenizer of 1..N ordered FSQ tokens with a rectified-flow decoder,
trained in the latent space of a trained KL-VAE (config.vae.workdir).

Each step: images -> VAE latents (frozen, posterior mean) -> 2x2 patches x0 -> encoder ->
FSQ codes; keep_k ~ config.model.keep_k_mode and registers past it masked (nested dropout);
a share model.null_dropout of rows see only the null token (for guidance); the decoder
learns the velocity eps - x0 of z_t = (1 - t) x0 + t eps with t logit-normal. With
repa.weight > 0 the loss adds REPA: decoder block repa.layer's patch tokens, through a
projector, align (cosine) with a frozen feature network's map of the clean image
(`jaxgen.metrics.perceptual` network repa.net, map repa.tap, pooled to the patch grid).

Tokenizer API: `tokenize(images) -> ids [B, N]`, `detokenize(ids[:, :k])` for any k (Euler
over sample.num_steps steps, compiled whole, with CFG or adaptive projected guidance),
`autoencode(images, k)`. Samples and rFID use reconstructions of fixed test images.
"""
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from jaxgen import objectives, sampling
from jaxgen.errors import UserError
from jaxgen.families.base import FamilyBase, count_params
from jaxgen.metrics import codebook as codebook_metrics
from jaxgen.models import flextok, fsq as fsq_lib, layers, registers
from jaxgen.objectives import repa

VAE_HINT = ('train one first: python -m jaxgen.main --config=configs/kl_vae.py:demo '
            '--workdir=DIR, then --config.vae.workdir=DIR')
TRAIN_HINT = ('train one first: python -m jaxgen.main --config=configs/flextok.py:demo '
              '--workdir=DIR --config.vae.workdir=VAE_DIR')
GUIDANCE = ('none', 'cfg', 'apg')


class Family(FamilyBase):
  reconstructs = True

  def __init__(self, config):
    super().__init__(config)
    m, v = config.model, config.vae
    if config.sample.guidance not in GUIDANCE:
      raise UserError(f'unknown flextok sample.guidance {config.sample.guidance!r}: use one '
                      f'of {GUIDANCE}')
    if m.keep_k_mode not in registers.KEEP_K_MODES:
      raise UserError(f'unknown flextok model.keep_k_mode {m.keep_k_mode!r}: use one of '
                      f'{registers.KEEP_K_MODES}')
    if v.latent_size % m.patch_size:
      raise UserError(f'flextok: patch_size {m.patch_size} does not divide the VAE latent '
                      f'size {v.latent_size}')
    self.fsq = fsq_lib.FSQ(tuple(m.levels))
    self.num_patches = (v.latent_size // m.patch_size) ** 2
    r = config.get('repa') or {}
    self.repa_weight = float(r.get('weight', 0.0))
    self.repa_net, repa_dim = None, 0
    if self.repa_weight:
      if not 0 <= r.layer < m.decoder.depth:
        raise UserError(f'repa.layer {r.layer} is not a decoder block (0..'
                        f'{m.decoder.depth - 1})')
      self.repa_net = self._load_repa_net()
      d = config.data
      repa_dim = jax.eval_shape(self._repa_map, jnp.zeros(
          (1, d.image_size, d.image_size, d.channels))).shape[-1]
    self.model = flextok.FlexTok(
        num_patches=self.num_patches, patch_dim=m.patch_size ** 2 * v.latent_channels,
        num_registers=m.num_registers, levels=self.fsq.levels,
        enc=FrozenDict(m.encoder.to_dict()), dec=FrozenDict(m.decoder.to_dict()),
        repa_layer=r.get('layer', -1) if self.repa_weight else -1, repa_dim=repa_dim,
        repa_hidden=r.get('hidden', 2048), dtype=jnp.dtype(m.dtype))
    self.objective = objectives.make_objective(config.objective)
    self._vae = None
    if v.workdir:  # restored now, outside any trace
      self._vae = self._load_vae()
    elif v.get('random_init'):  # benchmarks only: timing does not depend on the weights
      self._vae = self._random_vae(v.random_init)

  # -- the frozen VAE --------------------------------------------------------------
  @property
  def vae(self):
    """(kl_vae family, its EMA params) from config.vae.workdir."""
    if self._vae is None:
      raise UserError(f'FlexTok needs a trained KL-VAE: {VAE_HINT}')
    return self._vae

  def _load_vae(self):
    from jaxgen import trainer
    v = self.config.vae
    family, params, config, _ = trainer.load_trained(v.workdir, 'kl_vae', VAE_HINT,
                                                     self.config.data.data_dir)
    got = (family.latent_shape[0], family.latent_shape[2])
    if got != (v.latent_size, v.latent_channels):
      raise UserError(f'KL-VAE {v.workdir} has {got[0]}x{got[0]}x{got[1]} latents; set '
                      f'--config.vae.latent_size={got[0]} --config.vae.latent_channels={got[1]}')
    if v.get('scale_factor'):  # e.g. 1 / std measured by KL-VAE measure_latent_scale
      family.config.model.scale_factor = v.scale_factor
    if config.data.image_size != self.config.data.image_size:
      raise UserError(f'KL-VAE {v.workdir} takes {config.data.image_size}px images, FlexTok '
                      f'{self.config.data.image_size}px: set --config.data.image_size to match')
    return family, params

  def _random_vae(self, variant):
    """An untrained configs/kl_vae.py:<variant> (randomly initialised weights)."""
    import os

    import flax.linen as nn

    from jaxgen import families
    from jaxgen.config_base import load_config
    path = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'kl_vae.py')
    config = load_config(path, variant)
    config.data = self.config.data
    family = families.get_family(config)
    return family, nn.meta.unbox(family.init_params(jax.random.PRNGKey(0)))

  def latent_patches(self, images):
    """Images -> the VAE's scaled posterior means as 2x2 patches [B, P, 4 c] (constants)."""
    family, params = self.vae
    latents = family.encode_latents(params, images)
    return jax.lax.stop_gradient(layers.patchify(latents, self.config.model.patch_size))

  def patches_to_images(self, patches):
    family, params = self.vae
    v = self.config.vae
    latents = layers.unpatchify(patches, self.config.model.patch_size, v.latent_channels)
    return jnp.clip(family.decode_latents(params, latents), -1.0, 1.0)

  # -- REPA's frozen feature network -----------------------------------------------
  def _load_repa_net(self):
    from jaxgen.metrics import perceptual
    r = self.config.repa
    return perceptual.perceptual_from_config(r.net, r.get('paths'), self.config.data.data_dir)

  def _repa_map(self, images):
    """The frozen network's feature map repa.tap of `images`: [B, H', W', F]."""
    return self.repa_net.features_fn(self.repa_net.variables, images)[self.config.repa.tap]

  def repa_target(self, images):
    """That map pooled to the decoder's patch grid: [B, P, F], a constant."""
    grid = int(round(self.num_patches ** 0.5))
    return jax.lax.stop_gradient(repa.pool_to_patches(self._repa_map(images), grid))

  # -- training --------------------------------------------------------------------
  def init_params(self, rng):
    x = jnp.zeros((1, self.num_patches, self.model.patch_dim), jnp.float32)
    return self.model.init(rng, x, jnp.zeros((1,), jnp.float32))['params']

  def loss(self, params, batch, rng, train):
    loss, metrics, _ = self._objective(params, batch['image'], rng, train)
    return loss, metrics

  def _objective(self, params, images, rng, train):
    """(flow loss, metrics, token ids): the ids let eval count tokens without re-encoding."""
    m = self.config.model
    k_rng, null_rng, obj_rng = jax.random.split(rng, 3)
    x0 = self.latent_patches(images)
    b = x0.shape[0]
    codes, ids = self.model.apply({'params': params}, x0, method=flextok.FlexTok.encode)
    keep_k = registers.sample_keep_k(k_rng, b, m.num_registers, m.keep_k_mode)
    null = None
    if train and m.null_dropout > 0:
      null = jax.random.bernoulli(null_rng, m.null_dropout, (b,))

    hidden = {}  # the decoder's projected REPA features, from the objective's one pass

    def denoise(z, t):
      args = ({'params': params}, z, t, codes, keep_k, null)
      if not self.repa_weight:
        return self.model.apply(*args, method=flextok.FlexTok.decode)
      v, state = self.model.apply(*args, method=flextok.FlexTok.decode,
                                  mutable=['intermediates'])
      hidden['repa'] = state['intermediates']['decoder']['repa_features'][0]
      return v

    loss, metrics = self.objective.loss(denoise, x0, obj_rng)
    if self.repa_weight:
      align = repa.alignment(hidden['repa'], self.repa_target(images))
      metrics = dict(metrics, flow_loss=loss, repa_cos=align)
      loss = loss - self.repa_weight * align
    k = self.fsq.num_codes
    return loss, dict(metrics, keep_k_mean=jnp.mean(keep_k.astype(jnp.float32)),
                      token_usage=codebook_metrics.codebook_usage(ids, k),
                      token_perplexity=codebook_metrics.codebook_perplexity(ids, k)), ids

  # -- tokenizer API -----------------------------------------------------------------
  @property
  def num_codes(self):
    return self.fsq.num_codes

  @property
  def num_tokens(self):
    """Tokens per image: N, of which any prefix decodes."""
    return self.config.model.num_registers

  def tokenize(self, params, images):
    """Images [B, H, W, C] in [-1, 1] -> token ids [B, N], ordered coarse to fine."""
    _, ids = self.model.apply({'params': params}, self.latent_patches(images),
                              method=flextok.FlexTok.encode)
    return ids

  def detokenize(self, params, ids, rng=None, **overrides):
    """Token ids [B, k] (any 1 <= k <= N: the first k of `tokenize`) -> images [B, H, W, C]."""
    b, k = ids.shape
    n = self.config.model.num_registers
    if not 1 <= k <= n:
      raise UserError(f'FlexTok decodes 1 to {n} tokens (model.num_registers), got {k}')
    ids = jnp.pad(ids, ((0, 0), (0, n - k)))
    return self.decode_tokens(params, ids, jnp.full((b,), k, jnp.int32), rng, **overrides)

  def decode_tokens(self, params, ids, keep_k, rng=None, **overrides):
    """Token ids [B, N] of which row i keeps the first keep_k[i] (traced: one compiled
    program serves every k) -> images. The decoder sees those codes and mask tokens after
    them; the flow is integrated by Euler over sample.num_steps steps with sample.guidance
    ('none', 'cfg' or 'apg'; overrides replace config.sample fields)."""
    s = self.config.sample.to_dict()
    s.update(overrides)
    b = ids.shape[0]
    codes = self.fsq.indices_to_codes(ids)
    rng = jax.random.PRNGKey(s['seed']) if rng is None else rng
    noise = jax.random.normal(rng, (b, self.num_patches, self.model.patch_dim), jnp.float32)
    decode = lambda z, t, c, kk, null: self.model.apply(
        {'params': params}, z, t, c, kk, null, method=flextok.FlexTok.decode)
    twice = lambda x: jnp.concatenate([x, x])
    null = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])

    def cond_uncond(z, t):
      return jnp.split(decode(twice(z), twice(t), twice(codes), twice(keep_k), null), 2)

    guidance, scale = s['guidance'], s['guidance_scale']
    if guidance == 'none' or scale == 1.0:
      out = self.objective.sample(lambda z, t: decode(z, t, codes, keep_k, None), noise, rng,
                                  num_steps=s['num_steps'])
    elif guidance == 'cfg':
      def cfg(z, t):
        cond, uncond = cond_uncond(z, t)
        return uncond + scale * (cond - uncond)
      out = self.objective.sample(cfg, noise, rng, num_steps=s['num_steps'])
    else:
      def apg(z, t, buffer):
        cond, uncond = cond_uncond(z, t)
        return sampling.apg_update(cond, uncond, scale, buffer, momentum=s['apg_momentum'],
                                   norm_threshold=s['apg_norm_threshold'], eta=s['apg_eta'])
      out = self.objective.sample(apg, noise, rng, num_steps=s['num_steps'],
                                  state=jnp.zeros_like(noise))
    return self.patches_to_images(out)

  def autoencode(self, params, images, k, rng=None, **overrides):
    """Images -> their first k tokens -> images."""
    return self.detokenize(params, self.tokenize(params, images)[:, :k], rng, **overrides)

  def reconstruct(self, params, images):
    return self.autoencode(params, images, self.config.model.num_registers)

  # -- eval and samples ----------------------------------------------------------------
  def eval_metrics(self, params, batch, rng):
    loss, metrics, ids = self._objective(params, batch['image'], rng, train=False)
    hist = codebook_metrics.code_histogram(ids, self.fsq.num_codes)
    return dict(metrics, loss=loss, token_histogram=hist)

  def reduce_eval_metrics(self, totals):
    totals = dict(totals)
    hist = jnp.asarray(totals.pop('token_histogram'))
    totals.update(token_usage=codebook_metrics.usage_from_histogram(hist),
                  token_perplexity=codebook_metrics.perplexity_from_histogram(hist))
    return totals

  def sample_ks(self):
    """Token counts of the sample grid's rows: 1, 2, 4, ... and N."""
    n = self.config.model.num_registers
    return [int(k) for k in registers.pow2_values(n)]

  def sample(self, params, rng, images):
    """Inputs over their reconstructions from k = 1, 2, 4, ..., N tokens (one sampler run
    over all rows)."""
    ks = self.sample_ks()
    ids = jnp.tile(self.tokenize(params, images), (len(ks), 1))
    keep_k = jnp.repeat(jnp.asarray(ks, jnp.int32), images.shape[0])
    return jnp.concatenate([images, self.decode_tokens(params, ids, keep_k, rng)], axis=0)

  def grid_layout(self):
    ks = self.sample_ks()
    return 1 + len(ks), ['input'] + [f'k={k}' for k in ks], 'reconstructions'

  # -- accounting ----------------------------------------------------------------------
  def flops_per_example(self, train=True, encode_only=False):
    """Training: encoder + one decoder pass, x3. Otherwise tokenize + detokenize: the encoder
    plus sample.num_steps decoder passes (x2 with guidance); `encode_only`: the encoder."""
    m = self.config.model
    enc, dec = flextok.flops_per_example(
        num_patches=self.num_patches, patch_dim=self.model.patch_dim,
        num_registers=m.num_registers, enc=m.encoder, dec=m.decoder, fsq_dim=self.fsq.dim)
    if encode_only:
      return enc
    if train:  # the frozen VAE encoder is not counted
      return 3 * (enc + dec)
    s = self.config.sample
    guided = s.guidance != 'none' and s.guidance_scale != 1.0
    return enc + s.num_steps * (2 if guided else 1) * dec

  def param_breakdown(self, params):
    return dict(encoder=count_params(params['encoder']), decoder=count_params(params['decoder']))
