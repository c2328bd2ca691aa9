"""Launch configuration of every dps_fast Triton kernel, keyed on the problem size.

All kernels are memory-bound one-pass elementwise kernels over ``[N, S]`` (``N`` samples of
``S`` elements), launched on a 1-D grid of ``N * cdiv(S, BLOCK)`` programs so that a program
never straddles two samples (per-sample scalars stay scalars).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import triton

__all__ = ["LaunchConfig", "elementwise_config", "per_sample_grid", "interpreting"]

# Per-program element counts. On a GPU 1024 elements on 4 warps (8 per thread) is the usual
# sweet spot for streaming kernels with moderate arithmetic (the Philox update does ~40 integer
# multiplies per element). Under the CPU interpreter every program costs a fixed Python
# overhead, so larger blocks are simply faster there.
_GPU_MAX_BLOCK = 1024
_INTERPRET_MAX_BLOCK = 8192
_MIN_BLOCK = 32


class LaunchConfig(NamedTuple):
    block: int
    num_warps: int


def interpreting() -> bool:
    """True when Triton runs under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=256)
def _config(numel: int, interpret: bool) -> LaunchConfig:
    cap = _INTERPRET_MAX_BLOCK if interpret else _GPU_MAX_BLOCK
    block = max(_MIN_BLOCK, min(cap, triton.next_power_of_2(max(int(numel), 1))))
    num_warps = 1 if block <= 128 else 2 if block <= 256 else 4 if block <= 1024 else 8
    return LaunchConfig(block, num_warps)


def elementwise_config(numel: int) -> LaunchConfig:
    """Block size and warps for a streaming kernel over ``numel`` elements (per sample when the
    kernel is per-sample). Small problems get the smallest power of two that covers them."""
    return _config(int(numel), interpreting())


def per_sample_grid(n: int, s: int, block: int) -> tuple[int, tuple[int]]:
    """``(nblocks, grid)`` for ``n`` samples of ``s`` elements: program ``p`` handles sample
    ``p // nblocks``, block ``p % nblocks`` (a 1-D grid: axis 0 allows 2^31 - 1 programs)."""
    nblocks = triton.cdiv(s, block)
    return nblocks, (n * nblocks,)
