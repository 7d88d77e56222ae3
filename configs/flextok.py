r"""FlexTok: images -> 1..N ordered FSQ tokens -> images, with a rectified-flow decoder in the
latent space of a trained KL-VAE.

  python -m jaxgen.main --config=configs/kl_vae.py:demo --workdir=workdirs/kl_vae
  python -m jaxgen.main --config=configs/flextok.py:demo --workdir=workdirs/flextok \
      --config.vae.workdir=workdirs/kl_vae
  python -m jaxgen.main --config=configs/flextok.py:d18-d28 --mode=info

Variants: `tiny` (tests, over configs/kl_vae.py:tiny's 16x16x4 latents), `demo` (Fashion-MNIST
over the kl_vae demo's 8x8x4 latents: 16 patches, 32 registers, FSQ 8x5x5x5 = 1000 codes,
encoder and decoder 4 x 96) and the paper's d12-d12, d18-d18, d18-d28 (encoder depth -
decoder depth; width 64 x depth, head dim 64) over 32x32x16 latents of 256px ImageNet (configs/kl_vae.py:f8c16): 256 patches,
256 registers, FSQ 8x8x8x5x5x5 = 64,000 codes, Euler 25 steps with adaptive projected
guidance at scale 7.5. The paper's optimizer and keep_k schedule are not published: AdamW
lr 1e-4, 'pow2' keep_k and 10% null-condition dropout are our choices.

REPA (on in `demo`, off elsewhere unless --config.repa.weight > 0): decoder block repa.layer's
patch tokens, through a 3-layer MLP projector (repa.hidden), align with map repa.tap of the
frozen perceptual network repa.net pooled to the patch grid. The paper uses DINOv2-L (weight and layer unpublished);
offline, repa.net=fmnist_classifier (its 16/8/4-pixel maps: tap -1 is the 4x4 one) or
lpips_vgg16 with --config.repa.paths.vgg_path=... work; REPA's own default weight is 0.5.
"""
import ml_collections

from jaxgen import config_base
from jaxgen.errors import UserError

# name -> (encoder depth, decoder depth)
SIZES = {'d12-d12': (12, 12), 'd18-d18': (18, 18), 'd18-d28': (18, 28)}
VARIANTS = ('tiny', 'demo', *SIZES)


def vit(depth, width=None, heads=None):
  """The paper's sizing: width 64 x depth, head dim 64."""
  width = width or 64 * depth
  return ml_collections.ConfigDict(dict(depth=depth, width=width, num_heads=heads or width // 64))


def get_config(arg='demo'):
  if arg not in VARIANTS:
    raise UserError(f'unknown flextok variant {arg!r}: use one of {VARIANTS} '
                    '(e.g. configs/flextok.py:demo)')
  c = config_base.base_config()
  c.family = 'flextok'
  # random_init: a configs/kl_vae.py variant built untrained instead of a workdir (benchmarks);
  # scale_factor: overrides the VAE's (0: keep it), so that the latents have unit variance.
  c.vae = ml_collections.ConfigDict(dict(workdir='', random_init='', scale_factor=0.0,
                                         latent_size=32, latent_channels=16))
  c.model = ml_collections.ConfigDict(dict(
      patch_size=2, num_registers=256, levels=(8, 8, 8, 5, 5, 5), encoder=vit(12),
      decoder=vit(12), keep_k_mode='pow2', null_dropout=0.1, dtype='float32'))
  c.repa = ml_collections.ConfigDict(dict(weight=0.0, layer=1, hidden=2048,
                                          net='fmnist_classifier', tap=-1,
                                          paths=dict(vgg_path='', lin_path='', path='')))
  c.objective = ml_collections.ConfigDict(dict(name='rectified_flow', logit_mean=0.0,
                                               logit_std=1.0))
  c.sample = ml_collections.ConfigDict(dict(
      num_steps=25, guidance='apg', guidance_scale=7.5, apg_momentum=-0.5,
      apg_norm_threshold=2.5, apg_eta=0.0, num_images=8, seed=0))
  c.optim.update(lr=1e-4, b1=0.9, b2=0.99, weight_decay=0.05, schedule='cosine',
                 warmup_steps=5000, end_lr_ratio=0.1, grad_clip=1.0, ema_decay=0.9999)
  c.eval.update(metrics='loss,fid')
  c.data.update(name='imagenet2012', image_size=256, channels=3, num_classes=1000)
  c.update(total_steps=300_000, batch_size=256, log_every=100, checkpoint_every=5000,
           sample_every=10_000, eval_every=50_000)
  if arg in SIZES:
    enc, dec = SIZES[arg]
    c.model.update(encoder=vit(enc), decoder=vit(dec))
    return c
  c.data = config_base.base_config().data  # Fashion-MNIST 32x32x1
  c.eval.update(num_samples=1000, num_real=10000)
  c.optim.update(warmup_steps=100, ema_decay=0.999)
  if arg == 'tiny':  # over configs/kl_vae.py:tiny (16x16x4 latents)
    c.vae.update(latent_size=16, latent_channels=4)
    c.model.update(patch_size=4, num_registers=8, levels=(5, 5, 3), encoder=vit(1, 32, 2),
                   decoder=vit(1, 32, 2))
    c.sample.update(num_steps=3, num_images=4, guidance_scale=2.0)
    c.update(total_steps=4, batch_size=8, log_every=1, checkpoint_every=2, eval_every=0,
             sample_every=0, progress_bar=False, eval_batches=1)
    c.eval.update(metrics='loss', num_samples=16, num_real=16)
    c.optim.update(lr=1e-3, warmup_steps=0, schedule='constant')
    c.repa.update(layer=0, hidden=32)
  else:  # demo, over configs/kl_vae.py:demo (8x8x4 latents)
    c.vae.update(latent_size=8, latent_channels=4)
    # Sized for 2 CPU cores (~0.45 s/step with REPA, ~21 min with its evals): width 128
    # measured ~1 s/step at batch 32.
    c.model.update(num_registers=32, levels=(8, 5, 5, 5), encoder=vit(4, 96, 3),
                   decoder=vit(4, 96, 3))
    c.sample.update(num_steps=20, guidance_scale=2.0)
    c.update(total_steps=2500, batch_size=32, log_every=50, checkpoint_every=500,
             sample_every=500, eval_every=1250)
    c.optim.update(lr=1e-3, end_lr_ratio=0.05)
    # REPA on, against the FMNIST classifier's 4x4 map. Measured at 2500 steps against
    # weight 0: eval flow loss 0.192 vs 0.198, rFID-FMNIST 8.4 vs 9.2, k=32 reconstruction MSE
    # 0.119 vs 0.127, class kept 65% vs 61%, for ~25% more step time.
    c.repa.update(weight=0.5, layer=1, hidden=256)
  return c
