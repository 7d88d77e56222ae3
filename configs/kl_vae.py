r"""KL-VAE: the LDM / Stable Diffusion convolutional autoencoder (the latent space of FlexTok
and of latent DiTs); L1 + perceptual + KL + StyleGAN2 adversarial losses.

  python -m jaxgen.main --config=configs/kl_vae.py:demo --workdir=workdirs/kl_vae
  python -m jaxgen.main --config=configs/kl_vae.py:f8c16 --mode=info

Argument: a variant.
  tiny   tests (seconds): 16x16x4 latents of Fashion-MNIST, the discriminator from step 2
  demo   Fashion-MNIST 32x32x1 -> 8x8x4 latents (x4; ch 16, ch_mult (1, 2, 2)), 1200 steps
         of batch 32, ~10 min on 2 CPU cores, no GAN; the perceptual loss uses the offline
         Fashion-MNIST classifier (trained once by `python -m jaxgen.metrics.fmnist_net`)
  f8c16  ImageNet 256px -> 32x32x16 latents (x8): the SDXL-like VAE FlexTok trains in;
         ch 128, ch_mult (1, 2, 4, 4), 2 res blocks, mid attention (83.8M parameters)
  f8c4   the SD-1 VAE (LDM kl-f8): the same trunk with 4 latent channels, scale 0.18215
         (83.7M parameters)
ImageNet variants follow LDM: L1 + 1.0 LPIPS (pass --config.loss.perceptual_paths.vgg_path=...
and .lin_path=...) + 1e-6 KL, adversarial weight 0.5 from step 50001, Adam (0.5, 0.9) at
4.5e-6 x batch size. A trained VAE's `model.scale_factor` should make its latents unit
variance: `Family.measure_latent_scale(params)` measures it (1 / std).
"""
import ml_collections

from jaxgen import config_base
from jaxgen.errors import UserError

VARIANTS = ('tiny', 'demo', 'f8c16', 'f8c4')


def get_config(arg='demo'):
  if arg not in VARIANTS:
    raise UserError(f'unknown kl_vae config {arg!r}: use one of {VARIANTS} '
                    '(e.g. configs/kl_vae.py:demo)')
  c = config_base.base_config()
  c.family = 'kl_vae'
  c.model = ml_collections.ConfigDict(dict(
      ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16, mid_attention=True,
      norm_groups=32, dtype='float32',
      # Latents handed to FlexTok / a DiT are (z - shift_factor) * scale_factor.
      scale_factor=1.0, shift_factor=0.0,
      disc=ml_collections.ConfigDict(dict(base_channels=64, max_channels=512, mbstd_group=4))))
  c.loss = ml_collections.ConfigDict(dict(
      reconstruction='l1', reconstruction_weight=1.0, kl_weight=1e-6,
      perceptual='lpips_vgg16', perceptual_weight=1.0,
      perceptual_paths=ml_collections.ConfigDict(dict(vgg_path='', lin_path='')),
      adv_weight=0.5, disc_start=50_001, r1_gamma=10.0, r1_every=16))
  c.batch_size = 96  # LDM: 8 GPUs x 12
  lr = 4.5e-6 * c.batch_size  # LDM's base learning rate, scaled by the batch size
  c.optim.update(lr=lr, b1=0.5, b2=0.9, weight_decay=0.0, schedule='constant',
                 warmup_steps=0, grad_clip=0.0, ema_decay=0.0)
  c.disc_optim = ml_collections.ConfigDict(dict(
      name='adamw', lr=lr, b1=0.5, b2=0.9, eps=1e-8, weight_decay=0.0, schedule='constant',
      warmup_steps=0, end_lr_ratio=0.0, grad_clip=0.0))
  c.sample = ml_collections.ConfigDict(dict(num_images=8, seed=0))
  c.eval.update(metrics='loss,fid')
  c.data.update(name='imagenet2012', image_size=256, channels=3, num_classes=1000)
  c.update(total_steps=250_000, log_every=100, checkpoint_every=5000, sample_every=10_000,
           eval_every=50_000)

  if arg == 'f8c16':
    # Placeholder until measured on the trained model (measure_latent_scale).
    c.model.update(z_channels=16, scale_factor=1.0)
  elif arg == 'f8c4':
    c.model.update(z_channels=4, scale_factor=0.18215)
  else:  # Fashion-MNIST 32x32x1 (padded), the offline perceptual network
    c.data = config_base.base_config().data
    c.loss.perceptual = 'fmnist_classifier'
    c.loss.perceptual_paths = ml_collections.ConfigDict()
    c.eval.update(num_samples=1000, num_real=10000)
    if arg == 'tiny':
      c.model.update(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, norm_groups=4,
                     disc=dict(base_channels=4, max_channels=8, mbstd_group=4))
      c.loss.update(perceptual_weight=0.0, disc_start=2, r1_every=2, adv_weight=0.1)
      c.update(total_steps=4, batch_size=8, log_every=1, checkpoint_every=2, eval_every=0,
               sample_every=0, progress_bar=False, eval_batches=1)
      c.eval.update(metrics='loss', num_samples=16, num_real=16)
      c.sample.num_images = 4
      for o in (c.optim, c.disc_optim):
        o.update(lr=1e-3, b1=0.9, b2=0.99, warmup_steps=0, schedule='constant')
    else:  # demo: sized for 2 CPU cores, where convolutions' backward is slow
      # scale_factor: the posterior means' std was 0.98 early in training (step 40); check the
      # trained model's with Family.measure_latent_scale before training a DiT on it.
      c.model.update(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, norm_groups=8,
                     scale_factor=1.0)
      c.loss.update(perceptual_weight=0.1, adv_weight=0.0)
      c.update(total_steps=1200, batch_size=32, log_every=50, checkpoint_every=400,
               sample_every=400, eval_every=600)
      c.optim.update(lr=1e-3, b1=0.9, b2=0.99, warmup_steps=100, schedule='cosine',
                     end_lr_ratio=0.1)
  return c
