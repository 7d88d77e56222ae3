"""ViT-VQGAN tokenizer family: the tokenizer and a StyleGAN2 discriminator trained together.

The two-optimizer GAN step, perceptual loss and reconstruction samples are the shared
autoencoder family's (jaxgen/families/autoencoder.py); the tokenizer's own objective is

  L_G = w_l2 L2 + w_ll logit-Laplace + w_perc perceptual + VQ codebook + beta commitment

plus, from loss.disc_start, w_adv times the non-saturating GAN loss of the reconstructions.
"""
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from jaxgen.families.autoencoder import AutoencoderFamily
from jaxgen.families.base import count_params
from jaxgen.metrics import codebook as codebook_metrics
from jaxgen.metrics import image as image_metrics
from jaxgen.models import vitvqgan
from jaxgen.objectives import logit_laplace


class Family(AutoencoderFamily):

  def __init__(self, config):
    super().__init__(config)
    m, d = config.model, config.data
    self.model = vitvqgan.VitVQGAN(
        image_size=d.image_size, channels=d.channels, patch_size=m.patch_size,
        enc=FrozenDict(m.encoder.to_dict()), dec=FrozenDict(m.decoder.to_dict()),
        codebook_size=m.codebook_size, code_dim=m.code_dim, l2_normalize=m.l2_normalize,
        head_dim=m.head_dim, dtype=jnp.dtype(m.dtype))

  # -- losses --------------------------------------------------------------------
  def init_generator(self, rng, images):
    return self.model.init(rng, images)['params']

  def generator_terms(self, gen_params, images, rng=None):
    """The tokenizer's forward pass and its reconstruction / VQ loss terms."""
    del rng  # deterministic
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

  def after_update(self, params, batch, rng, step):
    """Dead-code restart: every loss.restart_every steps before loss.restart_until, codes no
    token of the batch chose move onto random encoder outputs of the batch."""
    c, l2 = self.config.loss, self.config.model.l2_normalize
    if not c.get('restart_every'):
      return params
    gen = params['generator']
    codebook = gen['quantizer']['codebook']

    def restart():
      z = self.model.apply({'params': gen}, batch['image'],
                           method=vitvqgan.VitVQGAN.encoder_outputs)
      codes = vitvqgan.nearest_codes(z, codebook, l2)
      return vitvqgan.restart_dead_codes(codebook, z, codes, rng, l2)

    on = (step % c.restart_every == c.restart_every - 1) & (step < c.restart_until)
    new = jax.lax.cond(on, restart, lambda: codebook)
    key = "['generator']['quantizer']['codebook']"
    return jax.tree_util.tree_map_with_path(
        lambda path, x: new if jax.tree_util.keystr(path) == key else x, params)

  def output_metrics(self, out):
    return self.code_metrics(out['codes'])

  def code_metrics(self, codes):
    k = self.config.model.codebook_size
    return dict(codebook_usage=codebook_metrics.codebook_usage(codes, k),
                codebook_perplexity=codebook_metrics.codebook_perplexity(codes, k))

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
  @property
  def num_codes(self):
    return self.config.model.codebook_size

  @property
  def num_tokens(self):
    """Tokens per image (raster order)."""
    return self.model.num_tokens

  def tokenize(self, params, images):
    """Images [B, H, W, C] in [-1, 1] -> codes [B, N] (raster order)."""
    return self.model.apply({'params': params['generator']}, images,
                            method=lambda m, x: m.encode(x)[1])

  def detokenize(self, params, codes):
    return self.model.apply({'params': params['generator']}, codes,
                            method=vitvqgan.VitVQGAN.decode_codes)

  def reconstruct(self, params, images):
    return self.model.apply({'params': params['generator']}, images)['recon']

  # -- accounting ----------------------------------------------------------------
  def flops_per_example(self, train=True):
    m, d = self.config.model, self.config.data
    gen = vitvqgan.flops_per_example(
        image_size=d.image_size, channels=d.channels, patch_size=m.patch_size,
        enc=m.encoder, dec=m.decoder, code_dim=m.code_dim, codebook_size=m.codebook_size,
        head_dim=m.head_dim)
    # Training: the generator once (x3 for grads) plus the discriminator's share.
    return 3 * gen + self.disc_train_flops() if train else gen

  def param_breakdown(self, params):
    """Parameter counts of the encoder, decoder, quantizer and discriminator."""
    g = params['generator']
    return dict(encoder=count_params(g['encoder']) + count_params(g['to_code']),
                decoder=(count_params(g['decoder']) + count_params(g['head_hidden'])
                         + count_params(g['head_out'])),
                quantizer=count_params(g['quantizer']), **self.disc_param_breakdown(params))
