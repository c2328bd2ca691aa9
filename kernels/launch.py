"""Launch configuration of every dps_fast Triton kernel, keyed on the problem size, and the
device guard every launch runs under.

All kernels are memory-bound one-pass elementwise kernels over ``[N, S]`` (``N`` samples of
``S`` elements), launched on a 1-D grid of ``N * cdiv(S, BLOCK)`` programs so that a program
never straddles two samples (per-sample scalars stay scalars).

A Triton launch goes to the *current* CUDA device and that device's current stream, not to the
device of its tensors: a state on ``cuda:1`` in a process whose current device is 0 would be
launched on device 0. Every host launcher therefore launches inside :func:`device_guard` of its
state tensor (the tensor's device made current, so its current stream is used too).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import ContextManager, NamedTuple, Union

import torch
import triton

__all__ = ["LaunchConfig", "elementwise_config", "per_sample_grid", "interpreting", "device_guard"]

# Per-program element counts. On a GPU 1024 elements on 4 warps (8 per thread) is the usual
# sweet spot for streaming kernels with moderate arithmetic (the Philox update does ~10 integer
# multiplies per element: one 40-multiply call per 4 elements; the sm_90 PTX shows <= 40 mul.hi
# per thread for 8 elements, tests/kernels). Under the CPU interpreter every program costs a
# fixed Python overhead, so larger blocks are simply faster there. Blocks are powers of two
# >= 32, so a per-sample program always covers whole Philox calls ([block / 4, 4] tiles).
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


def needs_device_guard(device: torch.device) -> bool:
    """Whether launching for tensors on ``device`` must first make it the current device (CUDA)."""
    return device.type == "cuda"


def device_guard(t: Union[torch.Tensor, torch.device]) -> ContextManager:
    """``torch.cuda.device(t.device)`` for a CUDA tensor (or device), else a no-op context.

    >>> with device_guard(x):                      # doctest: +SKIP
    ...     kernel[grid](x, ...)                   # runs on x.device and its current stream
    """
    device = t.device if isinstance(t, torch.Tensor) else torch.device(t)
    if needs_device_guard(device):
        return torch.cuda.device(device)
    return contextlib.nullcontext()
