"""ViT-VQGAN tokenizer family: the tokenizer and a StyleGAN2 discriminator trained together.

Parameters are {'generator': ..., 'discriminator': ...}, each with its own optax optimizer
(config.optim, config.disc_optim) joined by optax.multi_transform, so both update in the
trainer's one compiled step. One scalar carries both objectives, and stop_gradient routes
each to its own parameters:

  total = L_G(G, sg(D)) + [step >= loss.disc_start] * (w_adv L_adv(G, sg(D))
                                                      + L_D(sg(G(x)), D) + lazy R1(D))
  L_G = w_l2 L2 + w_ll logit-Laplace + w_perc perceptual + VQ codebook + beta commitment
  L_adv = non-saturating GAN loss of the reconstructions

so d total / d G = d L_G / d G and d total / d D = d L_D / d D (both at the step's parameters).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core import FrozenDict

from jaxgen import optim
from jaxgen.families.base import FamilyBase
from jaxgen.metrics import codebook as codebook_metrics
from jaxgen.metrics import image as image_metrics
from jaxgen.models import stylegan_disc, vitvqgan
from jaxgen.objectives import gan, logit_laplace


class Family(FamilyBase):
  reconstructs = True

  def __init__(self, config):
    super().__init__(config)
    m, d = config.model, config.data
    self.model = vitvqgan.VitVQGAN(
        image_size=d.image_size, channels=d.channels, patch_size=m.patch_size,
        enc=FrozenDict(m.encoder.to_dict()), dec=FrozenDict(m.decoder.to_dict()),
        codebook_size=m.codebook_size, code_dim=m.code_dim, l2_normalize=m.l2_normalize,
        head_dim=m.head_dim, dtype=jnp.dtype(m.dtype))
    self.disc = stylegan_disc.StyleGANDiscriminator(
        base_channels=m.disc.base_channels, max_channels=m.disc.max_channels,
        mbstd_group=m.disc.mbstd_group, dtype=jnp.dtype(m.dtype))
    self.image_shape = (d.image_size, d.image_size, d.channels)
    self._perceptual = None

  # -- parameters and optimizers -------------------------------------------------
  def init_params(self, rng):
    g_rng, d_rng = jax.random.split(rng)
    x = jnp.zeros((2, *self.image_shape), jnp.float32)
    return {'generator': self.model.init(g_rng, x)['params'],
            'discriminator': self.disc.init(d_rng, x)['params']}

  def make_optimizer(self, total_steps):
    """Generator: config.optim; discriminator: config.disc_optim (its own lr, betas)."""
    tx_g, schedule = optim.make_optimizer(self.config.optim, total_steps)
    tx_d, _ = optim.make_optimizer(self.config.disc_optim, total_steps)
    labels = lambda params: {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}
    return optax.multi_transform({'generator': tx_g, 'discriminator': tx_d}, labels), schedule

  # -- losses --------------------------------------------------------------------
  @property
  def perceptual(self):
    if self._perceptual is None:
      from jaxgen.metrics import perceptual
      c = self.config.loss
      paths = {k: v for k, v in (c.get('perceptual_paths') or {}).items() if v}
      if c.perceptual == 'fmnist_classifier' and not paths:
        paths = {'data_dir': self.config.data.data_dir}
      # Loaded on first use, which is inside the train step's trace: its weights must be
      # concrete arrays, not tracers that would leak into the next trace.
      with jax.ensure_compile_time_eval():
        self._perceptual = perceptual.make_perceptual(c.perceptual, **paths)
    return self._perceptual

  def discriminate(self, disc_params, images):
    return self.disc.apply({'params': disc_params}, images)

  def generator_terms(self, gen_params, images):
    """The tokenizer's forward pass and its reconstruction / VQ loss terms."""
    c = self.config.loss
    out = self.model.apply({'params': gen_params}, images)
    terms = dict(
        l2=jnp.mean((out['recon'] - images) ** 2),
        logit_laplace=logit_laplace.nll(images, out['mu'], out['log_b']),
        codebook_loss=out['codebook_loss'], commitment=out['commitment'])
    if c.perceptual_weight:
      terms['perceptual'] = jnp.mean(self.perceptual.distance(out['recon'], images))
    return out, terms

  def generator_loss(self, terms):
    c = self.config.loss
    return (c.l2_weight * terms['l2'] + c.logit_laplace_weight * terms['logit_laplace']
            + c.perceptual_weight * terms.get('perceptual', 0.0) + terms['codebook_loss']
            + c.beta * terms['commitment'])

  def train_loss(self, params, batch, rng, step):
    c = self.config.loss
    images = batch['image']
    out, terms = self.generator_terms(params['generator'], images)
    gen = self.generator_loss(terms)
    on = step >= c.disc_start

    def adversarial(disc_params, recon):
      # The generator's term sees the discriminator as a constant...
      g_adv = gan.generator_loss(self.discriminate(jax.lax.stop_gradient(disc_params), recon))
      # ... and the discriminator sees the reconstructions as constants.
      real_logits = self.discriminate(disc_params, images)
      fake_logits = self.discriminate(disc_params, jax.lax.stop_gradient(recon))
      d_loss = gan.discriminator_loss(real_logits, fake_logits)
      r1 = jnp.zeros((), jnp.float32)
      if c.r1_gamma:  # gamma = 0 leaves R1's double backward out of the program
        r1 = gan.lazy_r1(lambda x: self.discriminate(disc_params, x), images, step,
                         c.r1_every, c.r1_gamma)
      return g_adv, d_loss, r1, jnp.mean(real_logits), jnp.mean(fake_logits)

    # Before disc_start the discriminator is not run at all (lax.cond): the step costs what the
    # tokenizer alone costs.
    g_adv, d_loss, r1, d_real, d_fake = jax.lax.cond(
        on, adversarial, lambda *_: tuple(jnp.zeros((), jnp.float32) for _ in range(5)),
        params['discriminator'], out['recon'])
    total = gen + c.adv_weight * g_adv + d_loss + r1
    metrics = dict(terms, generator_loss=gen, g_adv=g_adv, d_loss=d_loss, r1=r1,
                   disc_on=on.astype(jnp.float32), d_real=d_real, d_fake=d_fake,
                   **self.code_metrics(out['codes']))
    return total, metrics

  def code_metrics(self, codes):
    k = self.config.model.codebook_size
    return dict(codebook_usage=codebook_metrics.codebook_usage(codes, k),
                codebook_perplexity=codebook_metrics.codebook_perplexity(codes, k))

  def loss(self, params, batch, rng, train):
    """The generator's objective without the adversarial term (eval, or no GAN)."""
    images = batch['image']
    out, terms = self.generator_terms(params['generator'], images)
    metrics = dict(terms, psnr=jnp.mean(image_metrics.psnr(out['recon'], images)),
                   **self.code_metrics(out['codes']))
    return self.generator_loss(terms), metrics

  def eval_metrics(self, params, batch, rng):
    images = batch['image']
    out, terms = self.generator_terms(params['generator'], images)
    # A histogram, summed over the eval batches: one batch holds too few codes for usage.
    hist = codebook_metrics.code_histogram(out['codes'], self.config.model.codebook_size)
    return dict(terms, loss=self.generator_loss(terms), code_histogram=hist,
                psnr=jnp.mean(image_metrics.psnr(out['recon'], images)))

  def reduce_eval_metrics(self, totals):
    """Codebook usage and perplexity over all eval batches' codes together."""
    totals = dict(totals)
    hist = jnp.asarray(totals.pop('code_histogram'))
    totals['codebook_usage'] = codebook_metrics.usage_from_histogram(hist)
    totals['codebook_perplexity'] = codebook_metrics.perplexity_from_histogram(hist)
    return totals

  # -- tokenizer API -------------------------------------------------------------
  def tokenize(self, params, images):
    """Images [B, H, W, C] in [-1, 1] -> codes [B, N] (raster order)."""
    return self.model.apply({'params': params['generator']}, images,
                            method=lambda m, x: m.encode(x)[1])

  def detokenize(self, params, codes):
    return self.model.apply({'params': params['generator']}, codes,
                            method=vitvqgan.VitVQGAN.decode_codes)

  def reconstruct(self, params, images):
    return self.model.apply({'params': params['generator']}, images)['recon']

  # -- samples: reconstructions of fixed test images ------------------------------
  def sample_inputs(self):
    if not hasattr(self, '_sample_images'):
      n = self.config.sample.num_images
      it = self.make_iterator('test', global_batch_size=n, seed=0, train=False)
      self._sample_images = np.asarray(next(it)['image'])
    return self._sample_images

  def sample(self, params, rng, images):
    """Originals stacked over their reconstructions: [2B, H, W, C]."""
    del rng
    return jnp.concatenate([images, self.reconstruct(params, images)], axis=0)

  def write_samples(self, outputs, stem, writer, step, save=True):
    from jaxgen import writers
    grid = writers.image_grid(outputs, 2, row_labels=['input', 'recon'])
    if save:
      writers.save_png(grid, stem + '.png')
    if writer is not None:
      writer.write_images(step, {'reconstructions': grid})
    return stem + '.png'

  # -- accounting ----------------------------------------------------------------
  def flops_per_example(self, train=True):
    m, d = self.config.model, self.config.data
    gen = vitvqgan.flops_per_example(
        image_size=d.image_size, channels=d.channels, patch_size=m.patch_size,
        enc=m.encoder, dec=m.decoder, code_dim=m.code_dim, codebook_size=m.codebook_size,
        head_dim=m.head_dim)
    disc = stylegan_disc.disc_flops_per_example(d.image_size, d.channels,
                                                m.disc.base_channels, m.disc.max_channels)
    # Training: the generator once, the discriminator on reals, fakes (twice); x3 for grads.
    return 3 * (gen + 3 * disc) if train else gen

  def param_breakdown(self, params):
    """Parameter counts of the encoder, decoder, quantizer and discriminator."""
    count = lambda t: int(sum(np.prod(x.shape) for x in jax.tree.leaves(t)))
    g = params['generator']
    return dict(encoder=count(g['encoder']) + count(g['to_code']),
                decoder=count(g['decoder']) + count(g['head_hidden']) + count(g['head_out']),
                quantizer=count(g['quantizer']), discriminator=count(params['discriminator']))
