"""The one noise stream of dps_fast: counter-based Philox4x32-10 normals, four per call.

Every backend draws the DDPM noise from the same function of ``(seed, step, stream, element)``,
so the torch, Triton and CUDA backends produce the same samples for the same seeds (up to float32
rounding of ``log``/``cos``/``sin``) and a sample never depends on its position in a batch, the
block size, the grid or the backend.

Layout. Element ``e`` (``0 <= e < numel``, the flat index within one sample) of the normals of
the sample with 64-bit seed ``s`` at step ``i`` on stream ``k`` is slot ``e % 4`` of Philox call
``e // 4``:

* key     = ``(s mod 2^32, (s >> 32) mod 2^32)``, the seed's low and high 32-bit words;
* counter = ``(e // 4, i mod 2^32, k, 0)``; stream ``k = 0`` (:data:`STREAM_STEP`) is the noise
  of step ``i``, ``k = 1`` (:data:`STREAM_INIT`) the initial state ``x_T``, ``k = 2``
  (:data:`STREAM_MEASUREMENT`) the noise of a noised measurement (MCG's ``y_{t-1}``,
  :mod:`dps_fast.methods.mcg`, and, at step 0 under the item's own key, the measurement noise
  ``reconstruct`` simulates), ``k = 3`` (:data:`STREAM_Q_SAMPLE`) the DPS2022 drop-in's
  ``q_sample`` noise of the measurement and ``k = 4 + j`` (:data:`STREAM_PERTURB` ``+ j``) its
  ps+ perturbation ``j`` (:mod:`dps_fast.compat.dps2022`). This list is the one home of the
  stream ids: a new use takes a new id here;
* the call returns the words ``(r0, r1, r2, r3)``; each pair is one Box-Muller draw,
  ``u1 = ((ra >> 8) + 1) / 2^24`` in (0, 1], ``u2 = (rb >> 8) / 2^24`` in [0, 1) (both exact in
  float32 and float64), ``rho = sqrt(-2 ln u1)``, ``theta = 2 pi u2``;
* slot 0 = ``rho(r0) cos theta(r1)``, slot 1 = ``rho(r0) sin theta(r1)``,
  slot 2 = ``rho(r2) cos theta(r3)``, slot 3 = ``rho(r2) sin theta(r3)``.

The last call of a sample whose ``numel`` is not a multiple of 4 has unused slots (dropped). The
arithmetic after the integer words is done in float64 for float64 output, else in float32 (``2 pi``
rounded to the compute dtype first), in every backend. A sample may have at most ``2^32 - 1``
elements.

This module is the pure-torch definition (int64 arithmetic, bit-exact against Random123's
known-answer vectors); the kernels in ``dps_fast.kernels`` and ``csrc/`` implement the same rounds
and the same layout, one Philox call per four elements.
"""

from __future__ import annotations

import math

import torch

__all__ = ["philox4x32", "philox_normal", "seeds_from", "STREAM_STEP", "STREAM_INIT", "STREAM_MEASUREMENT",
           "STREAM_Q_SAMPLE", "STREAM_PERTURB"]

STREAM_STEP = 0
STREAM_INIT = 1
STREAM_MEASUREMENT = 2
STREAM_Q_SAMPLE = 3
STREAM_PERTURB = 4  # the first of ps+'s perturbation streams 4, 5, ...

_M32 = 0xFFFFFFFF
PHILOX_A = 0xD2511F53
PHILOX_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
TWO_PI = 2.0 * math.pi
# theta = 2pi * u2 with u2 = (r >> 8) 2^-24 exact: scaling by a power of two commutes with
# rounding, so one multiply by (2pi rounded to the compute dtype) * 2^-24 gives the kernels' bits.
_TWO_PI_U = {dt: float(torch.tensor(TWO_PI, dtype=dt)) * 2.0**-24 for dt in (torch.float32, torch.float64)}


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


def _philox_pairs(
    c0: torch.Tensor, c1: int | torch.Tensor, c2: int, k0: torch.Tensor, k1: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`philox4x32` of the counters ``(c0, c1, c2, 0)`` with the 10 rounds of both
    multiplier lanes stacked, in few torch ops. ``c0``: ``[G]`` int64; ``c1``: an int or a
    one-element int64 tensor; ``k0, k1``: ``[N]``. Returns ``([r0, r2], [r1, r3])``, each
    ``[2, N, G]`` int64 holding uint32 values.

    Same words as :func:`philox4x32`, bit for bit (tests/test_noise.py), in ~60 tensor ops instead
    of ~160: per-op overhead, not arithmetic, dominated the noise of small states (0.72 ms of a
    1.4 ms step for 500 samples of d = 20 on one CPU thread, issue 9). The lanes hold ``(c0, c2)``
    (multiplied by ``(A, B)``) and ``(c1, c3)``; ``S`` swaps its lane order every round, so
    only every other round needs flips. Intermediate words may carry garbage above bit 31 (the
    high product bits, sign-extended); it is masked before every multiply and at the end.
    """
    n, g, dev = k0.shape[0], c0.shape[0], c0.device
    keys = torch.stack((k0, k1)).view(1, 2, n, 1)
    r = torch.arange(10, device=dev, dtype=torch.int64).view(10, 1, 1, 1)
    inc = torch.cat((r * PHILOX_KEY_A, r * PHILOX_KEY_B), 1)   # [10, 2, 1, 1]
    ks = (keys + inc) & _M32                                   # round r: (k0_r, k1_r)
    ks_swapped = ks.flip(1)
    mul = torch.full((2, 1, 1), PHILOX_A, device=dev, dtype=torch.int64)
    mul[1].fill_(PHILOX_B)                                     # (A, B): no host->device copy
    mul_swapped = mul.flip(0)
    s = torch.empty((2, n, g), device=dev, dtype=torch.int64)  # lanes (c0, c2)
    s[0] = c0
    s[1].fill_(c2 & _M32)
    t = torch.zeros((2, 1, 1), device=dev, dtype=torch.int64)  # lanes (c1, c3)
    if isinstance(c1, torch.Tensor):
        t[0].copy_(c1.reshape(1, 1) & _M32)
    else:
        t[0].fill_(c1 & _M32)
    for rnd in range(0, 10, 2):
        # s = (c0, c2): c2' = hi(A c0) ^ c3 ^ k1, c0' = hi(B c2) ^ c1 ^ k0; s' = (c2', c0')
        p = s * mul
        s = (p >> 32).bitwise_xor_(t.flip(0)).bitwise_xor_(ks_swapped[rnd]).bitwise_and_(_M32)
        t = p.flip(0)                                          # (lo(B c2), lo(A c0)) = (c1', c3')
        # s = (c2, c0): c0' = hi(B c2) ^ c1 ^ k0, c2' = hi(A c0) ^ c3 ^ k1; s' = (c0', c2')
        p = s * mul_swapped
        s = (p >> 32).bitwise_xor_(t).bitwise_xor_(ks[rnd + 1]).bitwise_and_(_M32)
        t = p                                                  # (lo(B c2), lo(A c0)) = (c1', c3')
    return s, t.bitwise_and_(_M32)


def philox_normal(
    seeds: torch.Tensor, numel: int, step: int | torch.Tensor, stream: int = STREAM_STEP,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normals ``[N, numel]`` for the samples whose seeds are ``seeds`` (int64 ``[N]``).

    Row ``n`` is a function of ``(seeds[n], step, stream)`` only (the layout is in the module
    docstring: one Philox call per four elements). ``step`` may be a one-element int64 tensor on
    the seeds' device (read without a host sync, for CUDA-graph replay).

    >>> z = philox_normal(torch.tensor([1, 2]), 5, step=3)
    >>> z.shape
    torch.Size([2, 5])
    """
    if seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise ValueError(f"seeds: expected an int64 tensor [N], got {seeds.dtype} of shape {tuple(seeds.shape)}")
    if numel >= 2**32:
        raise ValueError(f"numel: at most 2^32 - 1 elements per sample, got {numel}")
    dev, n = seeds.device, seeds.shape[0]
    calls = (numel + 3) // 4
    c0 = torch.arange(calls, device=dev, dtype=torch.int64)
    ra, rb = _philox_pairs(c0, step, stream, seeds & _M32, (seeds >> 32) & _M32)  # ([r0, r2], [r1, r3])
    work = torch.float64 if dtype == torch.float64 else torch.float32
    rho = (ra >> 8).to(work).add_(1.0).mul_(2.0**-24).log_().mul_(-2.0).sqrt_()
    theta = (rb >> 8).to(work).mul_(_TWO_PI_U[work])  # 2pi * u2 (see _TWO_PI_U)
    z = torch.empty((n, calls, 2, 2), device=dev, dtype=work)  # [N, call, pair, (cos, sin)]
    zv = z.permute(2, 3, 0, 1)
    torch.mul(torch.cos(theta), rho, out=zv[:, 0])
    torch.mul(torch.sin(theta), rho, out=zv[:, 1])
    z = z.view(n, 4 * calls)
    if 4 * calls != numel:
        z = z[:, :numel].contiguous()
    return z.to(dtype)


def seeds_from(generator: torch.Generator | None, n: int | tuple[int, int], seed: int | None = None) -> torch.Tensor:
    """Int64 sample seeds in [0, 2^62): from ``seed`` (deterministic) or a torch generator.

    ``n`` is a count (returns ``[n]``) or a shape ``(B, S)`` (returns ``[B, S]``: S samples for
    each of B measurements). With ``seed``, sample ``(b, s)`` gets ``philox(key=seed,
    counter=(s, b, 0x5EED, 0))``: a function of ``(seed, b, s)`` only, so changing the number of
    samples or measurements never changes the samples that remain. A count ``n`` is row ``b = 0``.

    >>> a, b = seeds_from(None, (2, 3), seed=7), seeds_from(None, (3, 5), seed=7)
    >>> bool(torch.equal(a, b[:2, :3])), bool(torch.equal(a[0], seeds_from(None, 3, seed=7)))
    (True, True)
    """
    shape = (n,) if isinstance(n, int) else tuple(n)
    if len(shape) not in (1, 2) or not all(isinstance(k, int) and k >= 0 for k in shape):
        raise ValueError(f"n: expected a count or a shape (B, S) of non-negative ints, got {n!r}")
    if seed is not None:
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        rows, cols = (1,) + shape if len(shape) == 1 else shape
        s = torch.arange(cols, dtype=torch.int64).expand(rows, cols)
        b = torch.arange(rows, dtype=torch.int64).view(rows, 1).expand(rows, cols)
        zero = torch.zeros_like(s)
        r0, r1, _, _ = philox4x32(s & _M32, b & _M32, zero + 0x5EED, zero,
                                  torch.full_like(s, seed & _M32), torch.full_like(s, (seed >> 32) & _M32))
        return (((r1 & 0x3FFFFFFF) << 32) | r0).reshape(shape)
    return torch.randint(0, 2**62, shape, generator=generator, dtype=torch.int64)
