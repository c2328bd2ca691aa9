"""Likelihood approximations beside DPS, on the same engine: :class:`MCG`, :class:`PiGDM`, :class:`DDRM`.

Each is a class with :class:`~dps_fast.DPS`'s ``sample``/``step`` API and result type
(:class:`~dps_fast.DPSResult`); the chain loop, seeds, progress, trajectory and non-finite checks
are :func:`dps_fast.chain.run_chain`, shared with DPS. Operators enter through their implicit SVD
(:mod:`dps_fast.methods.svd`); an unsupported operator is a TypeError that names it.

>>> from dps_fast.methods import DDRM, MCG, PiGDM
"""

from .base import ChainMethod
from .ddrm import DDRM
from .mcg import MCG, MCG_OPERATORS
from .pigdm import PiGDM
from .svd import SUPPORTED, SVDView, svd_view

__all__ = ["ChainMethod", "MCG", "PiGDM", "DDRM", "MCG_OPERATORS", "SUPPORTED", "SVDView", "svd_view"]
