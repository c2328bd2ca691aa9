"""Philox4x32-10 and the Box-Muller normals of :mod:`dps_fast.noise`, as Triton device functions.

Same rounds, constants and layout as ``dps_fast.noise`` (bit-exact on the uint32 words): key
``(lo, hi)`` of the sample's int64 seed; element ``e`` of a sample is slot ``e % 4`` of the call
with counter ``(e // 4, step, stream, 0)``, whose words ``(r0, r1)`` give slots 0 (cos) and 1
(sin) and ``(r2, r3)`` slots 2 and 3 of a Box-Muller pair each. Kernels work on ``[ROWS, 4]``
tiles (one row = one call = 4 contiguous elements), so every Philox call feeds four elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import device_guard, elementwise_config, per_sample_grid
from .prep import cast_to

__all__ = ["philox4x32_10", "seed_key", "box_muller", "philox_normal4", "normal_tile", "sample_tile",
           "philox_words", "normal"]


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """10 Philox4x32 rounds on uint32 blocks ``c0..c3`` with uint32 key words ``k0, k1``."""
    PHILOX_A: tl.constexpr = 0xD2511F53
    PHILOX_B: tl.constexpr = 0xCD9E8D57
    PHILOX_KEY_A: tl.constexpr = 0x9E3779B9
    PHILOX_KEY_B: tl.constexpr = 0xBB67AE85
    for _ in tl.static_range(10):
        hi_b = tl.umulhi(c2, PHILOX_B)
        lo_b = c2 * PHILOX_B
        hi_a = tl.umulhi(c0, PHILOX_A)
        lo_a = c0 * PHILOX_A
        c0 = hi_b ^ c1 ^ k0
        c1 = lo_b
        c2 = hi_a ^ c3 ^ k1
        c3 = lo_a
        k0 = k0 + PHILOX_KEY_A
        k1 = k1 + PHILOX_KEY_B
    return c0, c1, c2, c3


@triton.jit
def seed_key(seed):
    """``(lo, hi)`` uint32 key words of an int64 seed (truncation keeps the low word)."""
    return seed.to(tl.uint32), (seed >> 32).to(tl.uint32)


@triton.jit
def box_muller(ra, rb, F64: tl.constexpr):
    """``(rho cos theta, rho sin theta)`` of one pair of uint32 words: ``u1 = ((ra >> 8) + 1)
    2^-24``, ``u2 = (rb >> 8) 2^-24``, ``rho = sqrt(-2 ln u1)``, ``theta = 2 pi u2``; float64
    when ``F64`` else float32, as ``dps_fast.noise.philox_normal`` computes them."""
    if F64:
        ct = tl.float64
    else:
        ct = tl.float32
    # 2^-24 is exact in float32; 2 pi is built in the compute dtype (a Python float literal
    # would be rounded to float32 first).
    u1 = ((ra >> 8) + 1).to(ct) * 5.9604644775390625e-08
    u2 = (rb >> 8).to(ct) * 5.9604644775390625e-08
    two_pi = tl.full([], 6.283185307179586, ct)
    rho = tl.sqrt(-2.0 * tl.log(u1))
    theta = two_pi * u2
    return rho * tl.cos(theta), rho * tl.sin(theta)


@triton.jit
def philox_normal4(call, step, stream, k0, k1, F64: tl.constexpr):
    """The four normals (slots 0..3) of the Philox calls ``call`` (an integer block of counters
    ``e // 4``) of one sample: ``step``/``stream`` integer scalars, ``k0, k1`` the uint32 key
    words. Returns four blocks shaped like ``call``."""
    c0 = call.to(tl.uint32)
    zero = c0 * 0
    c1 = zero + step.to(tl.uint32)
    c2 = zero + stream
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, zero, k0, k1)
    z0, z1 = box_muller(r0, r1, F64)
    z2, z3 = box_muller(r2, r3, F64)
    return z0, z1, z2, z3


@triton.jit
def normal_tile(call, slot, step, stream, k0, k1, F64: tl.constexpr):
    """The normals of a ``[R, 4]`` tile of elements ``e = 4 call + slot`` (``call``: ``[R]``
    counters, ``slot``: ``[4]`` = 0..3): ONE Philox call per row, its four outputs spread over
    the row's columns with selects (no data movement across threads: a row's 4 elements are
    contiguous in memory and held by one thread for vectorized loads)."""
    z0, z1, z2, z3 = philox_normal4(call, step, stream, k0, k1, F64)
    s = slot[None, :]
    z = tl.where(s == 0, z0[:, None], z1[:, None])
    z = tl.where(s == 2, z2[:, None], z)
    return tl.where(s == 3, z3[:, None], z)


@triton.jit
def sample_tile(S, nblocks, ROWS: tl.constexpr):
    """This program's ``[ROWS, 4]`` tile of one sample on the flat (sample x block) grid: the
    sample ``n``, the Philox counters ``call`` ``[ROWS]`` of its rows, the slots ``[4]``, the
    element indices ``j = 4 call + slot`` within the sample and their mask ``j < S``."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // nblocks
    call = (pid - n * nblocks) * ROWS + tl.arange(0, ROWS)
    slot = tl.arange(0, 4)
    j = call[:, None] * 4 + slot[None, :]
    return n, call, slot, j, j < S


@triton.jit
def _philox_words_kernel(c0_ptr, c1_ptr, c2_ptr, c3_ptr, k0_ptr, k1_ptr, out_ptr, numel,
                         BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    c0 = tl.load(c0_ptr + offs, mask=m, other=0).to(tl.uint32)
    c1 = tl.load(c1_ptr + offs, mask=m, other=0).to(tl.uint32)
    c2 = tl.load(c2_ptr + offs, mask=m, other=0).to(tl.uint32)
    c3 = tl.load(c3_ptr + offs, mask=m, other=0).to(tl.uint32)
    k0 = tl.load(k0_ptr + offs, mask=m, other=0).to(tl.uint32)
    k1 = tl.load(k1_ptr + offs, mask=m, other=0).to(tl.uint32)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + offs, r0.to(tl.int64), mask=m)
    tl.store(out_ptr + numel + offs, r1.to(tl.int64), mask=m)
    tl.store(out_ptr + 2 * numel + offs, r2.to(tl.int64), mask=m)
    tl.store(out_ptr + 3 * numel + offs, r3.to(tl.int64), mask=m)


@triton.jit(do_not_specialize=["step", "stream"])
def _normal_kernel(seeds_ptr, out_ptr, S, nblocks, step, stream,
                   F64: tl.constexpr, ROWS: tl.constexpr):
    n, call, slot, j, m = sample_tile(S, nblocks, ROWS)
    k0, k1 = seed_key(tl.load(seeds_ptr + n))
    z = normal_tile(call, slot, step, stream, k0, k1, F64)
    tl.store(out_ptr + n * S + j, cast_to(z, out_ptr), mask=m)


def philox_words(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
                 k0: torch.Tensor, k1: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The 4 output words of :func:`philox4x32_10` for equal-shape int64 tensors holding uint32
    values (the layout of ``dps_fast.noise.philox4x32``); returns 4 int64 tensors."""
    ins = [t.contiguous().reshape(-1) for t in (c0, c1, c2, c3, k0, k1)]
    numel = ins[0].numel()
    out = torch.empty(4, numel, dtype=torch.int64, device=ins[0].device)
    if numel:
        cfg = elementwise_config(numel)
        with device_guard(ins[0]):
            _philox_words_kernel[(triton.cdiv(numel, cfg.block),)](
                *ins, out, numel, BLOCK=cfg.block, num_warps=cfg.num_warps)
    return tuple(w.view(c0.shape) for w in out)


def normal(seeds: torch.Tensor, numel: int, step: int, stream: int, dtype: torch.dtype) -> torch.Tensor:
    """``[N, numel]`` normals equal to ``dps_fast.noise.philox_normal(seeds, numel, step, stream,
    dtype)``, generated on the seeds' device (float64 math for float64, else float32)."""
    n = seeds.numel()
    out = torch.empty(n, numel, dtype=dtype, device=seeds.device)
    if n and numel:
        cfg = elementwise_config(numel)
        nblocks, grid = per_sample_grid(n, numel, cfg.block)
        with device_guard(seeds):
            _normal_kernel[grid](
                seeds.contiguous(), out, numel, nblocks, step & 0xFFFFFFFF, stream & 0xFFFFFFFF,
                F64=dtype == torch.float64, ROWS=cfg.block // 4, num_warps=cfg.num_warps)
    return out
