"""KL-VAE family: the LDM / Stable Diffusion convolutional autoencoder, the latent space of
FlexTok and of latent diffusion models.

  L_G = w_rec rec + w_perc perceptual + kl_weight * KL / (H W C)

rec is the mean L1 or L2 error per pixel of a reconstruction from a posterior sample, KL the
mean over the batch of each example's KL(q(z|x) || N(0, I)). LDM sums its per-pixel losses
over each image instead of averaging them, so dividing the KL by the pixels per image keeps
LDM's weights (kl_weight 1e-6) meaning what they mean there. From loss.disc_start (and with
loss.adv_weight > 0) the shared autoencoder GAN step adds w_adv times the non-saturating GAN
loss of a StyleGAN2 discriminator (jaxgen/families/autoencoder.py).

Latent API (what FlexTok and latent DiTs use): `encode_latents` (posterior mean, or a sample,
as (z - shift_factor) * scale_factor), `decode_latents` (its inverse, then the decoder),
`reconstruct`; `load(workdir)` gives (family, params) of a trained workdir.
"""
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import UserError
from jaxgen.families.autoencoder import AutoencoderFamily
from jaxgen.families.base import count_params
from jaxgen.models import kl_vae

TRAIN_HINT = ('train one first: python -m jaxgen.main --config=configs/kl_vae.py:demo '
              '--workdir=DIR')
RECONSTRUCTION = ('l1', 'l2')


def load(workdir, data_dir=None):
  """(family, EMA params) of the newest checkpoint of a trained kl_vae workdir."""
  from jaxgen import trainer
  family, params, _, _ = trainer.load_trained(workdir, 'kl_vae', TRAIN_HINT, data_dir)
  return family, params


class Family(AutoencoderFamily):

  def __init__(self, config):
    super().__init__(config)
    m, d = config.model, config.data
    ch_mult = tuple(m.ch_mult)  # a list when the config comes back from config.json
    factor = 2 ** (len(ch_mult) - 1)
    if not ch_mult or d.image_size % factor:
      raise UserError(f'kl_vae: ch_mult {ch_mult} downsamples {factor}x, which does not divide '
                      f'image_size {d.image_size}; use fewer levels or another image size')
    if config.loss.reconstruction not in RECONSTRUCTION:
      raise UserError(f'unknown kl_vae loss.reconstruction {config.loss.reconstruction!r}: use '
                      f'one of {RECONSTRUCTION}')
    self.model = kl_vae.AutoencoderKL(
        channels=d.channels, ch=m.ch, ch_mult=ch_mult, num_res_blocks=m.num_res_blocks,
        z_channels=m.z_channels, mid_attention=m.mid_attention, norm_groups=m.norm_groups,
        dtype=jnp.dtype(m.dtype))
    self.latent_shape = (d.image_size // factor, d.image_size // factor, m.z_channels)

  # -- losses --------------------------------------------------------------------
  def init_generator(self, rng, images):
    return self.model.init(rng, images, sample=False)['params']

  def generator_terms(self, gen_params, images, rng=None):
    """Forward pass from a posterior sample (with `rng`; its mean without) and the loss
    terms: the reconstruction error named by loss.reconstruction, KL, perceptual."""
    c = self.config.loss
    out = self.model.apply({'params': gen_params}, images, rng, sample=rng is not None)
    diff = out['recon'] - images
    rec = jnp.mean(jnp.abs(diff)) if c.reconstruction == 'l1' else jnp.mean(diff ** 2)
    terms = {c.reconstruction: rec, 'kl': jnp.mean(out['kl'])}
    if c.perceptual_weight:
      terms['perceptual'] = jnp.mean(self.perceptual.distance(out['recon'], images))
    return out, terms

  def generator_loss(self, terms):
    c = self.config.loss
    pixels = float(np.prod(self.image_shape))
    return (c.reconstruction_weight * terms[c.reconstruction]
            + c.perceptual_weight * terms.get('perceptual', 0.0)
            + c.kl_weight * terms['kl'] / pixels)

  def output_metrics(self, out):
    # How much of N(0, I) the posterior uses: a collapsing or exploding latent shows here.
    return dict(latent_std=jnp.std(out['mean']),
                posterior_std=jnp.mean(jnp.exp(0.5 * out['logvar'])))

  # -- latent API ----------------------------------------------------------------
  def encode_latents(self, params, images, sample=False, rng=None):
    """Images [B, H, W, C] in [-1, 1] -> scaled latents [B, H/f, W/f, z_channels]: the
    posterior mean, or with sample=True a draw (needs `rng`)."""
    if sample and rng is None:
      raise UserError('encode_latents(sample=True) needs rng=: a key for the posterior draw')
    m = self.config.model
    mean, logvar = self.model.apply({'params': params['generator']}, images,
                                    method=kl_vae.AutoencoderKL.encode)
    z = kl_vae.DiagonalGaussian(mean, logvar).sample(rng) if sample else mean
    return (z - m.shift_factor) * m.scale_factor

  def decode_latents(self, params, latents):
    """Scaled latents (as from encode_latents) -> images (unclipped)."""
    m = self.config.model
    return self.model.apply({'params': params['generator']},
                            latents / m.scale_factor + m.shift_factor,
                            method=kl_vae.AutoencoderKL.decode)

  def reconstruct(self, params, images):
    return jnp.clip(self.decode_latents(params, self.encode_latents(params, images)), -1.0, 1.0)

  def measure_latent_scale(self, params, num_batches=8, split='train'):
    """Mean and std of the unscaled posterior means over `num_batches` batches, and the
    scale_factor (1 / std) that makes them unit variance, as LDM measures its own."""
    encode = jax.jit(lambda p, x: self.model.apply({'params': p['generator']}, x,
                                                   method=kl_vae.AutoencoderKL.encode)[0])
    it = self.make_iterator(split, global_batch_size=self.config.batch_size, seed=0, train=False)
    z = np.concatenate([np.asarray(encode(params, next(it)['image'])).ravel()
                        for _ in range(num_batches)]).astype(np.float64)
    return dict(mean=float(z.mean()), std=float(z.std()), scale_factor=float(1.0 / z.std()))

  # -- accounting ----------------------------------------------------------------
  def flops_per_example(self, train=True):
    m, d = self.config.model, self.config.data
    gen = kl_vae.flops_per_example(d.image_size, d.channels, m.ch, tuple(m.ch_mult),
                                   m.num_res_blocks, m.z_channels, m.mid_attention)
    # Training: encoder + decoder (x3 for grads) plus the discriminator's share; the
    # perceptual network's passes are not counted.
    return 3 * gen + self.disc_train_flops() if train else gen

  def param_breakdown(self, params):
    """Encoder (with the 1x1 quant_conv), decoder (with post_quant_conv), discriminator."""
    g = params['generator']
    return dict(encoder=count_params(g['encoder']) + count_params(g['quant_conv']),
                decoder=count_params(g['decoder']) + count_params(g['post_quant_conv']),
                **self.disc_param_breakdown(params))
