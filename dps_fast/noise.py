"""The one noise stream of dps_fast: counter-based Philox4x32-10 normals.

Every backend draws the DDPM noise from the same function of ``(seed, step, element)``, so the
torch, Triton and CUDA backends produce the same samples for the same seeds (up to float32
rounding of ``log``/``cos``) and a sample never depends on its position in a batch:

* key    = the sample's 64-bit seed, split into two 32-bit words ``(lo, hi)``;
* counter = ``(element index within the sample, step i, stream, 0)``, stream 0 for the noise of
  step ``i``, stream 1 for the initial state ``x_T`` and stream 2 for the noise of a noised
  measurement (MCG's ``y_{t-1}``, :mod:`dps_fast.methods.mcg`);
* ``z = sqrt(-2 ln u1) cos(2 pi u2)`` with ``u1 = ((r0 >> 8) + 1) / 2^24`` in (0, 1] and
  ``u2 = (r1 >> 8) / 2^24`` in [0, 1): both exact in float32 and float64.

This module is the pure-torch definition (int64 arithmetic, bit-exact against Random123's
known-answer vectors); the kernels in ``dps_fast.kernels`` and ``csrc/`` implement the same
rounds. Noise for one sample never needs more than ``2^32`` elements.
"""

from __future__ import annotations

import math

import torch

__all__ = ["philox4x32", "philox_normal", "seeds_from", "STREAM_STEP", "STREAM_INIT", "STREAM_MEASUREMENT"]

STREAM_STEP = 0
STREAM_INIT = 1
STREAM_MEASUREMENT = 2

_M32 = 0xFFFFFFFF
PHILOX_A = 0xD2511F53
PHILOX_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
TWO_PI = 2.0 * math.pi


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product ``a * b`` for ``a, b`` < 2^32 in int64.

    The int64 product wraps modulo 2^64 (two's complement) when it exceeds 2^63; bits 32..63 and
    0..31 of the wrapped value are exactly those of the true product, which the masks extract
    (checked against Random123's known answers and Python integers in tests/test_noise.py).
    """
    p = b * a
    return (p >> 32) & _M32, p & _M32


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
    k0: torch.Tensor, k1: torch.Tensor, rounds: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 on int64 tensors holding uint32 values (broadcasting). Returns 4 words."""
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(PHILOX_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def philox_normal(
    seeds: torch.Tensor, numel: int, step: int | torch.Tensor, stream: int = STREAM_STEP,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normals ``[N, numel]`` for the samples whose seeds are ``seeds`` (int64 ``[N]``).

    Row ``n`` is a function of ``(seeds[n], step, stream)`` only. ``step`` may be a one-element
    int64 tensor on the seeds' device (read without a host sync, for CUDA-graph replay).

    >>> z = philox_normal(torch.tensor([1, 2]), 5, step=3)
    >>> z.shape
    torch.Size([2, 5])
    """
    if seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise ValueError(f"seeds: expected an int64 tensor [N], got {seeds.dtype} of shape {tuple(seeds.shape)}")
    if numel >= 2**32:
        raise ValueError(f"numel: at most 2^32 - 1 elements per sample, got {numel}")
    dev = seeds.device
    k0 = (seeds & _M32).unsqueeze(1)
    k1 = ((seeds >> 32) & _M32).unsqueeze(1)
    c0 = torch.arange(numel, device=dev, dtype=torch.int64).unsqueeze(0)
    if isinstance(step, torch.Tensor):
        c1 = step.reshape(1, 1).to(device=dev, dtype=torch.int64) & _M32
    else:
        c1 = torch.full((1, 1), step & _M32, device=dev, dtype=torch.int64)
    c2 = torch.full((1, 1), stream & _M32, device=dev, dtype=torch.int64)
    c3 = torch.zeros((1, 1), device=dev, dtype=torch.int64)
    r0, r1, _, _ = philox4x32(c0, c1, c2, c3, k0, k1)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    u1 = ((r0 >> 8) + 1).to(work) * (2.0**-24)
    u2 = (r1 >> 8).to(work) * (2.0**-24)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(TWO_PI * u2)
    return z.to(dtype)


def seeds_from(generator: torch.Generator | None, n: int, seed: int | None = None) -> torch.Tensor:
    """``n`` int64 sample seeds in [0, 2^62): from ``seed`` (deterministic) or a torch generator.

    ``seed`` gives sample ``j`` the seed ``philox(seed, j)``, so sample ``j`` of a run with seed ``s``
    is the same whatever ``n`` is.
    """
    if seed is not None:
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        j = torch.arange(n, dtype=torch.int64)
        zero = torch.zeros_like(j)
        r0, r1, _, _ = philox4x32(j & _M32, j >> 32, zero + 0x5EED, zero,
                                  torch.full_like(j, seed & _M32), torch.full_like(j, (seed >> 32) & _M32))
        return ((r1 & 0x3FFFFFFF) << 32) | r0
    return torch.randint(0, 2**62, (n,), generator=generator, dtype=torch.int64)
