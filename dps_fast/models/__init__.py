"""Score networks: the ADM (guided-diffusion) UNet, an adapter for diffusers UNets, and the
network wrapper that gives DPS its forward + input-only VJP.

Importing this package never imports diffusers; :func:`from_diffusers` does, on first call.
"""

from dps_fast.models.adm import ADM_CONFIGS, ADMUNet
from dps_fast.models.diffusers_adapter import from_diffusers
from dps_fast.models.wrapper import ScoreNetwork, frozen_weights

__all__ = ["ADMUNet", "ADM_CONFIGS", "from_diffusers", "ScoreNetwork", "frozen_weights"]
