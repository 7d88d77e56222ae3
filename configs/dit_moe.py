r"""DiT-MoE: sparse DiT with shared + routed experts and an expert-level balance loss.

  python -m jaxgen.main --config=configs/dit_moe.py:demo --workdir=workdirs/dit_moe_demo
  python -m jaxgen.main --config=configs/dit_moe.py:XL/2-8E2A --mode=info

Variants: `tiny`, `demo` (Fashion-MNIST), and the paper's S/2-8E2A, S/2-16E2A,
B/2-8E2A, L/2-8E2A, XL/2-8E2A, G/2-16E2A (ImageNet-256 latent shape). Append
`,ddpm` for DDPM. Useful overrides: --config.model.moe.dispatch=dropless|capacity|dense,
--config.model.moe.grouped_matmul=windows|blocks|ragged_dot (dropless),
--config.model.moe.window_factor=1.5 (windows of 1.5x the mean load),
--config.model.moe.spill_factor=0 (no spill: an overflowing window runs the blocked matmul),
--config.model.moe.every=2 (MoE in every other block), --config.mesh.expert=4.
"""
import re

from jaxgen.errors import UserError
from jaxgen.families import dit_config

PAPER = re.compile(r'^(S|B|L|XL|G)/(2|4|8)-(\d+)E(\d+)A$')


def get_config(arg='demo'):
  variant, objective = dit_config.parse_arg(arg, 'configs/dit_moe.py')
  c = dit_config.base(objective)
  if variant == 'tiny':
    dit_config.tiny(c)
    c.model.depth = 2  # two MoE layers for the routing analysis (and MoE every other block)
    c.model.moe = dit_config.moe(4, num_shared=1)
  elif variant == 'demo':
    dit_config.demo(c)
    # Sized for ~10 minutes on 2 CPU cores: experts of hidden 2D (mlp_ratio), one shared
    # expert, batch 32. Dropless, as the reference: once the balance loss has evened the
    # loads (~140 steps) every expert's tokens fit its window (or the spill) and a step is as
    # fast as capacity dispatch, which would drop ~10% of the assignments here.
    c.model.update(mlp_ratio=2.0)
    c.model.moe = dit_config.moe(8, num_shared=1)
    c.update(batch_size=32, total_steps=1500, checkpoint_every=500, sample_every=750,
             eval_every=750)
  else:
    m = PAPER.match(variant)
    if not m:
      raise UserError(f'unknown DiT-MoE variant {variant!r}: use tiny, demo, S/2-8E2A, '
                      'S/2-16E2A, B/2-8E2A, L/2-8E2A, XL/2-8E2A or G/2-16E2A')
    size, patch, experts, active = m.groups()
    dit_config.paper_size(c, size, int(patch))
    c.model.moe = dit_config.moe(int(experts), top_k=int(active))
    c.model.qk_norm = size in ('XL', 'G')  # the reference stabilises its large models
    c.optim.update(lr=1e-4, weight_decay=0.0, ema_decay=0.9999)
  return c
