"""Generative objectives and their compiled samplers, chosen by name in the config."""
from jaxgen.objectives.ddpm import DDPM
from jaxgen.objectives.rectified_flow import RectifiedFlow

OBJECTIVES = {'rectified_flow': RectifiedFlow, 'ddpm': DDPM}


def make_objective(cfg):
  if cfg.name not in OBJECTIVES:
    raise ValueError(f'unknown objective {cfg.name!r}: choose one of {sorted(OBJECTIVES)}')
  return OBJECTIVES[cfg.name](cfg)
