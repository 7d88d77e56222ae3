r"""Class-conditional DiT on Fashion-MNIST (or ImageNet latents) with rectified flow or DDPM.

  python -m jaxgen.main --config=configs/dit.py:demo --workdir=workdirs/dit_demo

Variants: `tiny` (tests, seconds), `demo` (README main job, ~10 min on 2 CPU
cores), and the paper's sizes `S/2 S/4 S/8 B/2 ... XL/8` (ImageNet-256 SD-VAE
latent shape: 32x32x4, 1000 classes). Append `,ddpm` for DDPM epsilon-prediction
instead of rectified flow, e.g. `configs/dit.py:tiny,ddpm`. Override anything on
the command line, e.g. `--config.total_steps=200 --config.mesh.fsdp=4
--config.model.dtype=bfloat16`.
"""
from jaxgen.errors import UserError
from jaxgen.families import dit_config


def get_config(arg='demo'):
  variant, objective = dit_config.parse_arg(arg, 'configs/dit.py')
  c = dit_config.base(objective)
  if variant == 'tiny':
    dit_config.tiny(c)
  elif variant == 'demo':
    dit_config.demo(c)
  else:
    size, _, patch = variant.partition('/')
    if size not in ('S', 'B', 'L', 'XL') or patch not in ('2', '4', '8'):
      raise UserError(f'unknown DiT variant {variant!r}: use tiny, demo or S|B|L|XL/2|4|8 '
                      '(e.g. configs/dit.py:B/2)')
    dit_config.paper_size(c, size, int(patch))
  return c
