"""What the image autoencoder families (ViT-VQGAN, KL-VAE) share: an autoencoder trained with
reconstruction / perceptual losses against an optional StyleGAN2 discriminator.

Parameters are {'generator': ..., 'discriminator': ...}, each with its own optax optimizer
(config.optim, config.disc_optim) joined by optax.multi_transform, so both update in the
trainer's one compiled step. One scalar carries both objectives, and stop_gradient routes
each to its own parameters:

  total = L_G(G) + [step >= loss.disc_start] * (w_adv L_adv(G, sg(D))
                                                + L_D(sg(G(x)), D) + lazy R1(D))
  L_adv = non-saturating GAN loss of the reconstructions

so d total / d G = d (L_G + w_adv L_adv) / d G and d total / d D = d (L_D + R1) / d D. With
loss.adv_weight = 0 there is no discriminator at all (no 'discriminator' parameters).

A subclass sets `self.model` and implements `init_generator`, `generator_terms` (the forward
pass and its loss terms), `generator_loss`, `reconstruct` and `flops_per_example`.
"""
import abc

import jax
import jax.numpy as jnp
import optax

from jaxgen import optim
from jaxgen.families.base import FamilyBase, count_params
from jaxgen.metrics import image as image_metrics
from jaxgen.models import stylegan_disc
from jaxgen.objectives import gan


class AutoencoderFamily(FamilyBase):
  reconstructs = True

  def __init__(self, config):
    super().__init__(config)
    m, d = config.model, config.data
    self.image_shape = (d.image_size, d.image_size, d.channels)
    self.adversarial = bool(config.loss.adv_weight)
    self.disc = stylegan_disc.StyleGANDiscriminator(
        base_channels=m.disc.base_channels, max_channels=m.disc.max_channels,
        mbstd_group=m.disc.mbstd_group, dtype=jnp.dtype(m.dtype))
    self._perceptual = None

  # -- what a subclass provides --------------------------------------------------
  @abc.abstractmethod
  def init_generator(self, rng, images):
    """The autoencoder's (boxed) parameters."""

  @abc.abstractmethod
  def generator_terms(self, gen_params, images, rng=None):
    """(model outputs with 'recon', dict of scalar loss terms); `rng` is None in eval."""

  @abc.abstractmethod
  def generator_loss(self, terms):
    """The weighted sum of `generator_terms`' terms."""

  @abc.abstractmethod
  def reconstruct(self, params, images):
    """Images [B, H, W, C] in [-1, 1] -> their reconstructions (deterministic)."""

  def output_metrics(self, out):
    """Extra metrics of the forward pass's outputs (e.g. codebook usage)."""
    return {}

  # -- parameters and optimizers -------------------------------------------------
  def init_params(self, rng):
    g_rng, d_rng = jax.random.split(rng)
    x = jnp.zeros((2, *self.image_shape), jnp.float32)
    params = {'generator': self.init_generator(g_rng, x)}
    if self.adversarial:
      params['discriminator'] = self.disc.init(d_rng, x)['params']
    return params

  def make_optimizer(self, total_steps):
    """Generator: config.optim; discriminator: config.disc_optim (its own lr, betas)."""
    tx_g, schedule = optim.make_optimizer(self.config.optim, total_steps)
    if not self.adversarial:
      return tx_g, schedule
    tx_d, _ = optim.make_optimizer(self.config.disc_optim, total_steps)
    labels = lambda params: {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}
    return optax.multi_transform({'generator': tx_g, 'discriminator': tx_d}, labels), schedule

  # -- losses --------------------------------------------------------------------
  @property
  def perceptual(self):
    if self._perceptual is None:
      from jaxgen.metrics import perceptual
      c = self.config.loss
      # Loaded on first use, which is inside the train step's trace: its weights must be
      # concrete arrays, not tracers that would leak into the next trace.
      with jax.ensure_compile_time_eval():
        self._perceptual = perceptual.perceptual_from_config(
            c.perceptual, c.get('perceptual_paths'), self.config.data.data_dir)
    return self._perceptual

  def discriminate(self, disc_params, images):
    return self.disc.apply({'params': disc_params}, images)

  def adversarial_terms(self, disc_params, images, recon, step):
    """(w_adv L_adv + L_D + R1, their metrics); zeros, without running D, before disc_start."""
    c = self.config.loss
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
    # autoencoder alone costs.
    g_adv, d_loss, r1, d_real, d_fake = jax.lax.cond(
        on, adversarial, lambda *_: tuple(jnp.zeros((), jnp.float32) for _ in range(5)),
        disc_params, recon)
    metrics = dict(g_adv=g_adv, d_loss=d_loss, r1=r1, disc_on=on.astype(jnp.float32),
                   d_real=d_real, d_fake=d_fake)
    return c.adv_weight * g_adv + d_loss + r1, metrics

  def train_loss(self, params, batch, rng, step):
    images = batch['image']
    out, terms = self.generator_terms(params['generator'], images, rng)
    gen = self.generator_loss(terms)
    metrics = dict(terms, generator_loss=gen, **self.output_metrics(out))
    if not self.adversarial:
      return gen, metrics
    adv, adv_metrics = self.adversarial_terms(params['discriminator'], images, out['recon'], step)
    return gen + adv, dict(metrics, **adv_metrics)

  def loss(self, params, batch, rng, train):
    """The generator's objective without the adversarial term (eval, or no GAN)."""
    images = batch['image']
    out, terms = self.generator_terms(params['generator'], images, rng if train else None)
    recon = jnp.clip(out['recon'], -1.0, 1.0)  # PSNR of the images one would display
    metrics = dict(terms, psnr=jnp.mean(image_metrics.psnr(recon, images)),
                   **self.output_metrics(out))
    return self.generator_loss(terms), metrics

  # -- samples: reconstructions of fixed test images (FamilyBase.sample_inputs) -------
  def sample(self, params, rng, images):
    """Originals stacked over their reconstructions: [2B, H, W, C]."""
    del rng
    return jnp.concatenate([images, self.reconstruct(params, images)], axis=0)

  def grid_layout(self):
    return 2, ['input', 'recon'], 'reconstructions'

  # -- accounting ----------------------------------------------------------------
  def disc_train_flops(self):
    """The discriminator's training FLOPs per example: reals and fakes (twice), x3 for grads."""
    if not self.adversarial:
      return 0
    m, d = self.config.model, self.config.data
    disc = stylegan_disc.disc_flops_per_example(d.image_size, d.channels,
                                                m.disc.base_channels, m.disc.max_channels)
    return 3 * 3 * disc

  def disc_param_breakdown(self, params):
    return {'discriminator': count_params(params['discriminator'])} if self.adversarial else {}
