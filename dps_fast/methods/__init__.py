"""Likelihood approximations beside DPS, on the same engine: :class:`MCG`, :class:`PiGDM`, :class:`DDRM`.

Each is a sibling of :class:`~dps_fast.DPS` on the shared :class:`~dps_fast.engine.Engine`: the
same ``sample``/``step`` API and result type (:class:`~dps_fast.DPSResult`), the same validation,
seeds, chain loop, progress, trajectory and divergence checks. Operators enter through their implicit SVD
(:mod:`dps_fast.methods.svd`); an unsupported operator is a TypeError that names it.

>>> from dps_fast.methods import DDRM, MCG, PiGDM
"""

from .ddrm import DDRM
from .mcg import MCG, MCG_OPERATORS
from .pigdm import PiGDM
from .registry import METHODS, MethodSpec, get_method, register
from .svd import SUPPORTED, SVDView, svd_view

__all__ = ["METHODS", "MethodSpec", "get_method", "register", "MCG", "PiGDM", "DDRM", "MCG_OPERATORS", "SUPPORTED", "SVDView", "svd_view"]
