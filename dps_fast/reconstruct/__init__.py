"""``dps-fast reconstruct``: posterior sampling over a dataset, with resumable atomic outputs,
memory-aware batching and torchrun sharding.

>>> from dps_fast.reconstruct import reconstruct, psnr, ssim

``dps_fast.reconstruct`` is loaded lazily by the package face (``import dps_fast`` does not import
it) and is both this subpackage and, called, :func:`reconstruct`: ``dps_fast.reconstruct(...)``
works whichever was imported first (importing a submodule such as ``dps_fast.reconstruct.cli``
binds the package attribute to this module).
"""

import sys
import types
from typing import Any

from .distributed import merge
from .metrics import psnr, ssim
from .runner import NothingReconstructed, ReconstructSummary, reconstruct

__all__ = ["reconstruct", "ReconstructSummary", "NothingReconstructed", "merge", "psnr", "ssim"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> ReconstructSummary:
        """:func:`reconstruct` (same arguments)."""
        return reconstruct(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
