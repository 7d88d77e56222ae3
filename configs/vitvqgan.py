r"""ViT-VQGAN tokenizer (stage 1): ViT encoder / decoder, factorized l2-normalised codes,
L2 + logit-Laplace + perceptual + StyleGAN2 adversarial losses.

  python -m jaxgen.main --config=configs/vitvqgan.py:demo --workdir=workdirs/vitvqgan
  python -m jaxgen.main --config=configs/vitvqgan.py:SL --mode=info

Argument: `<variant>[,plain]`.
  variant  tiny (tests, seconds) | demo (Fashion-MNIST, ~15 min on 2 CPU cores; the
           perceptual loss and rFID use the offline Fashion-MNIST classifier, trained once by
           `python -m jaxgen.metrics.fmnist_net`) | SS, BB, SL: the paper's encoder-decoder
           pairings (Small 8 blocks / 512 / MLP 2048 / 8 heads; Base 12 / 768 / 3072 / 12;
           Large 32 / 1280 / 5120 / 16) on ImageNet 256px, patch 8, 8192 codes of dim 32,
           LPIPS (pass --config.loss.perceptual_paths.vgg_path=... and .lin_path=...)
  plain    plain VQ instead of factorized l2 codes: lookup dim = width, no l2-normalisation
           (the paper's Table 4 baseline)

Parameter counts (`--mode=info`, per encoder / decoder) against the paper's Table 1: Small
25.9M (paper 32M), Base 86.0M (91M), Large 633M (599M); configs/vim.py: VIM-B 708M (650M),
VIM-L 1.85B (1.7B). The paper's figures cannot all come from its stated sizes: L blocks of
width d with a 4d MLP hold 12 L d^2 weights before any embedding, 25.2M for Small (below
its 32M) but 629M for Large, 679M for VIM-B and 1.81B for VIM-L (above its 599M, 650M and
1.7B). We build the stated sizes; tests/test_vitvqgan.py checks the counts against 12 L d^2
plus embeddings and heads.
"""
import ml_collections

from jaxgen import config_base
from jaxgen.errors import UserError

# name -> (depth, width, mlp_dim, heads)
SIZES = {'S': (8, 512, 2048, 8), 'B': (12, 768, 3072, 12), 'L': (32, 1280, 5120, 16)}
VARIANTS = ('tiny', 'demo', 'SS', 'BB', 'SL')


def vit(size):
  depth, width, mlp_dim, heads = SIZES[size] if isinstance(size, str) else size
  return ml_collections.ConfigDict(dict(depth=depth, width=width, mlp_dim=mlp_dim,
                                        num_heads=heads))


def parse(arg):
  variant, *opts = arg.split(',')
  if variant not in VARIANTS or set(opts) - {'plain'}:
    raise UserError(f'unknown vitvqgan config {arg!r}: use one of {VARIANTS}, optionally '
                    'with ",plain" (e.g. configs/vitvqgan.py:demo,plain)')
  return variant, 'plain' in opts


def get_config(arg='demo'):
  variant, plain = parse(arg)
  c = config_base.base_config()
  c.family = 'vitvqgan'
  c.model = ml_collections.ConfigDict(dict(
      patch_size=8, encoder=vit('S'), decoder=vit('S'), codebook_size=8192, code_dim=32,
      l2_normalize=True, head_dim=0, dtype='float32',
      disc=ml_collections.ConfigDict(dict(base_channels=64, max_channels=512, mbstd_group=4))))
  # The paper's weights: L = VQ + 0.1 adv + 0.1 perceptual + 0.1 logit-Laplace + 1.0 L2.
  c.loss = ml_collections.ConfigDict(dict(
      l2_weight=1.0, logit_laplace_weight=0.1, perceptual_weight=0.1, adv_weight=0.1,
      beta=0.25, disc_start=50_000, r1_gamma=10.0, r1_every=16,
      # Dead-code restart (not in the paper; 0 = off): every `restart_every` steps until
      # `restart_until`, codes unused by the batch move onto random encoder outputs.
      restart_every=0, restart_until=0,
      perceptual='lpips_vgg16',
      perceptual_paths=ml_collections.ConfigDict(dict(vgg_path='', lin_path=''))))
  # Adam (0.9, 0.99), 50k warm-up to 1e-4, cosine to 5e-5, decoupled weight decay 1e-4.
  c.optim.update(lr=1e-4, b1=0.9, b2=0.99, weight_decay=1e-4, schedule='cosine',
                 warmup_steps=50_000, end_lr_ratio=0.5, grad_clip=0.0, ema_decay=0.0)
  c.disc_optim = ml_collections.ConfigDict(dict(
      name='adamw', lr=1e-4, b1=0.0, b2=0.99, eps=1e-8, weight_decay=0.0, schedule='cosine',
      warmup_steps=50_000, end_lr_ratio=0.5, grad_clip=0.0))
  c.sample = ml_collections.ConfigDict(dict(num_images=8, seed=0))
  c.eval.update(metrics='loss,fid')
  c.data.update(name='imagenet2012', image_size=256, channels=3, num_classes=1000)
  c.update(total_steps=500_000, batch_size=256, log_every=100, checkpoint_every=5000,
           sample_every=10_000, eval_every=50_000)

  if variant in ('SS', 'BB', 'SL'):
    c.model.update(encoder=vit(variant[0]), decoder=vit(variant[1]))
  else:  # Fashion-MNIST 32x32x1 (padded), the offline perceptual network
    c.data = config_base.base_config().data
    c.loss.perceptual = 'fmnist_classifier'
    c.loss.perceptual_paths = ml_collections.ConfigDict()
    c.eval.update(num_samples=1000, num_real=10000)
    if variant == 'tiny':
      c.model.update(patch_size=8, encoder=vit((1, 32, 64, 2)), decoder=vit((1, 32, 64, 2)),
                     codebook_size=64, code_dim=8,
                     disc=dict(base_channels=4, max_channels=8, mbstd_group=4))
      c.loss.update(perceptual_weight=0.0, disc_start=2, r1_every=2)
      c.update(total_steps=4, batch_size=8, log_every=1, checkpoint_every=2, eval_every=0,
               sample_every=0, progress_bar=False, eval_batches=1)
      c.eval.update(metrics='loss', num_samples=16, num_real=16)
      c.sample.num_images = 4
      for o in (c.optim, c.disc_optim):
        o.update(lr=1e-3, warmup_steps=0, schedule='constant')
    else:  # demo: sized for 2 CPU cores (~15 min), where convolutions' backward is slow
      c.model.update(patch_size=4, encoder=vit((2, 64, 256, 4)), decoder=vit((2, 64, 256, 4)),
                     codebook_size=512, code_dim=8,  # dim 32 collapsed to ~1% usage here
                     disc=dict(base_channels=8, max_channels=32, mbstd_group=4))
      # Without the restart only ~15% of the codes are ever chosen here (all at 100%).
      c.loss.update(disc_start=800, r1_every=16, restart_every=25, restart_until=600)
      c.update(total_steps=1200, batch_size=32, log_every=50, checkpoint_every=400,
               sample_every=400, eval_every=600)
      for o in (c.optim, c.disc_optim):
        o.update(lr=1e-3, warmup_steps=100, schedule='cosine', end_lr_ratio=0.1)
  if plain:  # plain VQ: look up in the encoder's width, Euclidean distance
    c.model.update(code_dim=c.model.encoder.width, l2_normalize=False)
  return c
