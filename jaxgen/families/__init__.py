"""Model families plug into the one training loop through the `Family` interface."""
import importlib

from jaxgen.errors import UserError

# family name -> module defining `Family`; imported lazily so one family's
# dependencies never slow down another's start-up.
_FAMILIES = {'dit': 'jaxgen.families.dit', 'lm': 'jaxgen.families.lm',
             'vitvqgan': 'jaxgen.families.vitvqgan', 'vim': 'jaxgen.families.vim',
             'kl_vae': 'jaxgen.families.kl_vae', 'flextok': 'jaxgen.families.flextok'}


def get_family(config):
  name = config.family
  if name not in _FAMILIES:
    raise UserError(f'unknown family {name!r}: choose one of {sorted(_FAMILIES)}')
  return importlib.import_module(_FAMILIES[name]).Family(config)
