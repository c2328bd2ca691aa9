"""dps_fast: Diffusion Posterior Sampling, exact to the formula and fused for GPUs.

>>> from dps_fast import DPS, NoiseSchedule, operators, priors
"""

__version__ = "0.1.0"

from . import operators, priors
from .noise import philox_normal
from .reconstruct import reconstruct
from .sampler import DPS, DPSResult, NonFiniteError
from . import methods
from .methods import DDRM, MCG, PiGDM
from .schedule import Coef, NoiseSchedule

__all__ = [
    "DPS", "DPSResult", "NonFiniteError", "NoiseSchedule", "Coef", "operators", "priors", "philox_normal",
    "reconstruct", "methods", "MCG", "PiGDM", "DDRM",
]
