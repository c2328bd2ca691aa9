"""``dps-fast reconstruct``: DPS over a dataset, with resumable atomic outputs, memory-aware
batching and torchrun sharding.

>>> from dps_fast.reconstruct import reconstruct, psnr, ssim
"""

from .distributed import merge
from .metrics import psnr, ssim
from .runner import ReconstructSummary, reconstruct

__all__ = ["reconstruct", "ReconstructSummary", "merge", "psnr", "ssim"]
