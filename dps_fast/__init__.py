"""dps_fast: Diffusion Posterior Sampling, exact to the formula and fused for GPUs.

>>> from dps_fast import DPS, NoiseSchedule, operators, priors
"""

__version__ = "0.1.0"

from . import operators, priors
from .noise import philox_normal
from .sampler import DPS, DPSResult, NonFiniteError
from . import methods
from .methods import DDRM, MCG, PiGDM
from .schedule import Coef, NoiseSchedule
from .engine import Engine


def __getattr__(name: str):
    # reconstruct (and its I/O stack) loads on first use: importing dps_fast stays light, and the
    # reconstruct modules can read __version__ from here without an import circle
    if name == "reconstruct":
        from .reconstruct import reconstruct

        globals()["reconstruct"] = reconstruct  # the function, not the subpackage the import bound here
        return reconstruct  # (after a direct import of a submodule the attribute is the subpackage,
        # which is callable as the function: dps_fast/reconstruct/__init__.py)
    raise AttributeError(f"module 'dps_fast' has no attribute {name!r}")


__all__ = [
    "DPS", "DPSResult", "NonFiniteError", "NoiseSchedule", "Coef", "operators", "priors", "philox_normal",
    "reconstruct", "methods", "MCG", "PiGDM", "DDRM", "Engine",
]
