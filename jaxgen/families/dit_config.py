"""Config pieces shared by configs/dit.py and configs/dit_moe.py."""
import ml_collections

from jaxgen import config_base
from jaxgen.errors import UserError

# DiT sizes: name -> (depth, width, heads); G is DiT-MoE's giant size.
SIZES = {'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16), 'XL': (28, 1152, 16),
         'G': (40, 1408, 16)}


def objective(name):
  if name == 'rectified_flow':
    # The reference feeds t in [0, 1] to the timestep embedder unscaled.
    return ml_collections.ConfigDict(dict(name=name, time_scale=1.0, logit_mean=0.0,
                                          logit_std=1.0))
  return ml_collections.ConfigDict(dict(name='ddpm', num_timesteps=1000, beta_start=1e-4,
                                        beta_end=2e-2, clip_x0=True))


def moe(num_experts=0, **overrides):
  """MoE fields of every MoE block; num_experts=0 means a dense DiT."""
  c = ml_collections.ConfigDict(dict(
      num_experts=num_experts, top_k=2, num_shared=2, expert_kind='swiglu', renormalize=False,
      dispatch='dropless', grouped_matmul='windows', window_factor=1.25, spill_factor=0.75,
      capacity_factor=1.25, balance_coef=0.005, record_routing=False, every=1))
  c.update(overrides)
  return c


def parse_arg(arg, config_name):
  """'variant,opt,...' -> (variant, objective name)."""
  variant, *opts = arg.split(',')
  unknown = set(opts) - {'ddpm'}
  if unknown:
    raise UserError(f'unknown option(s) {sorted(unknown)} in {config_name}:{arg}; '
                    'the only option is ",ddpm"')
  return variant, 'ddpm' if 'ddpm' in opts else 'rectified_flow'


def base(family_objective):
  """A DiT config on Fashion-MNIST with the given objective ('rectified_flow' | 'ddpm')."""
  c = config_base.base_config()
  c.family = 'dit'
  c.objective = objective(family_objective)
  c.model = ml_collections.ConfigDict(dict(
      patch_size=2, width=384, depth=12, num_heads=6, mlp_ratio=4.0, mlp_kind='gelu',
      class_dropout=0.1, qk_norm=False, dtype='float32', moe=moe()))
  c.sample = ml_collections.ConfigDict(dict(
      method='euler' if family_objective == 'rectified_flow' else 'ddim', num_steps=50,
      cfg_scale=1.5, per_class=8, seed=0))
  c.analysis = ml_collections.ConfigDict(dict(num_batches=4, num_timesteps=10))  # --mode=analyze
  return c


def tiny(c):
  # One block: the tests check wiring and arithmetic, and compile time grows with depth.
  c.model.update(patch_size=8, width=32, depth=1, num_heads=2)
  c.update(total_steps=4, batch_size=8, log_every=1, checkpoint_every=2, progress_bar=False,
           eval_batches=1)
  c.sample.update(num_steps=4, per_class=1)
  c.optim.update(lr=1e-3)


def demo(c):
  """~10 minutes on 2 CPU cores: class-recognisable Fashion-MNIST samples."""
  c.model.update(patch_size=4, width=128, depth=4, num_heads=4)
  c.update(total_steps=1000, batch_size=64, log_every=50, checkpoint_every=250,
           sample_every=500, eval_every=500)
  c.optim.update(lr=5e-4, warmup_steps=100, ema_decay=0.999)
  if c.objective.name == 'rectified_flow':
    c.objective.time_scale = 1000.0  # finer time features than the reference's unscaled t
  c.sample.update(num_steps=30, cfg_scale=2.0)


def paper_size(c, size, patch):
  """A paper size on ImageNet-256 SD-VAE latents (32x32x4, 1000 classes), paper recipe."""
  depth, width, heads = SIZES[size]
  c.model.update(patch_size=patch, width=width, depth=depth, num_heads=heads)
  c.data.update(name='imagenet2012', image_size=32, channels=4, num_classes=1000)
  c.update(total_steps=400_000, batch_size=256, log_every=100, checkpoint_every=5000,
           sample_every=20000)
  c.optim.update(lr=1e-4, grad_clip=0.0)
