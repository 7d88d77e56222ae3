"""DiT family: class-conditional DiT trained with rectified flow or DDPM."""
import jax
import jax.numpy as jnp

from jaxgen import objectives, sampling
from jaxgen.errors import UserError
from jaxgen.families.base import FamilyBase
from jaxgen.models import dit, moe as moe_lib


def moe_fields(model_cfg):
  """The MoE layer's fields from config.model.moe (checked), or None for a dense DiT."""
  moe = model_cfg.get('moe')
  if not moe or not moe.num_experts:
    return None
  fields = {k: v for k, v in moe.to_dict().items() if k != 'every'}
  try:
    moe_lib.MoE(**fields).check()
  except (TypeError, ValueError) as e:  # TypeError: a field the layer does not have
    raise UserError(f'config.model.moe: {e}') from None
  return fields


class Family(FamilyBase):
  """DiT, and DiT-MoE when config.model.moe.num_experts > 0."""

  def __init__(self, config):
    super().__init__(config)
    m, d = config.model, config.data
    self.moe = moe_fields(m)
    self.moe_every = m.moe.every if self.moe else 1
    self.model = dit.DiT(
        image_size=d.image_size, channels=d.channels, patch_size=m.patch_size, width=m.width,
        depth=m.depth, num_heads=m.num_heads, num_classes=d.num_classes,
        mlp_ratio=m.mlp_ratio, class_dropout=m.class_dropout, qk_norm=m.qk_norm,
        moe=self.moe, moe_every=self.moe_every, mlp_kind=m.mlp_kind, dtype=jnp.dtype(m.dtype))
    self.objective = objectives.make_objective(config.objective)
    self.image_shape = (d.image_size, d.image_size, d.channels)

  def init_params(self, rng):
    x = jnp.zeros((1, *self.image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    y = jnp.zeros((1,), jnp.int32)
    return self.model.init({'params': rng, 'dropout': rng}, x, t, y, train=False)['params']

  def loss(self, params, batch, rng, train):
    drop_rng, obj_rng = jax.random.split(rng)
    sown = {}

    def denoise(z, t):
      out, state = self.model.apply({'params': params}, z, t, batch['label'], train=train,
                                    rngs={'dropout': drop_rng}, mutable=['intermediates'])
      sown.update(state.get('intermediates', {}))
      return out

    loss, metrics = self.objective.loss(denoise, batch['image'], obj_rng)
    if self.moe:  # the expert-level balance loss joins the objective
      metrics = dict(metrics, diffusion_loss=loss, **moe_lib.routing_metrics(sown))
      loss = loss + moe_lib.aux_loss(sown)
    return loss, metrics

  def denoiser(self, params, labels, cfg_scale):
    apply = lambda z, t, y: self.model.apply({'params': params}, z, t, y)
    return sampling.classifier_free_guidance(apply, labels, self.config.data.num_classes,
                                             cfg_scale)

  def sample(self, params, rng, labels):
    s = self.config.sample
    noise_rng, step_rng = jax.random.split(rng)
    noise = jax.random.normal(noise_rng, (labels.shape[0], *self.image_shape), jnp.float32)
    out = self.objective.sample(self.denoiser(params, labels, s.cfg_scale), noise, step_rng,
                                num_steps=s.num_steps, method=s.method)
    return jnp.clip(out, -1, 1)

  def flops_per_example(self, train=True):
    m, d = self.config.model, self.config.data
    return dit.flops_per_example(image_size=d.image_size, patch_size=m.patch_size,
                                 width=m.width, depth=m.depth, mlp_ratio=m.mlp_ratio,
                                 channels=d.channels, moe=self.moe, moe_every=self.moe_every,
                                 mlp_kind=m.mlp_kind, train=train)

  def activated_params(self, total):
    m = self.config.model
    return total - dit.inactive_params(width=m.width, depth=m.depth, mlp_ratio=m.mlp_ratio,
                                       moe=self.moe, moe_every=self.moe_every)
