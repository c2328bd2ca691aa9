"""Philox4x32-10 and the Box-Muller normal of :mod:`dps_fast.noise`, as Triton device functions.

Same rounds, constants and counter layout as ``dps_fast.noise.philox4x32`` (bit-exact on the
uint32 words): key ``(lo, hi)`` of the sample's int64 seed, counter ``(element, step, stream, 0)``,
``z = sqrt(-2 ln u1) cos(2 pi u2)``, ``u1 = ((r0 >> 8) + 1) 2^-24``, ``u2 = (r1 >> 8) 2^-24``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import elementwise_config
from .prep import cast_to

__all__ = ["philox4x32_10", "seed_key", "philox_normal", "philox_words", "normal"]


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
def philox_normal(idx, step, stream, k0, k1, F64: tl.constexpr):
    """Standard normals at element indices ``idx`` (int block) of one sample.

    ``step``/``stream`` are integer scalars, ``k0, k1`` the uint32 key words. float64 when
    ``F64`` else float32, as ``dps_fast.noise.philox_normal`` computes them.
    """
    c0 = idx.to(tl.uint32)
    zero = c0 * 0
    c1 = zero + step.to(tl.uint32)
    c2 = zero + stream
    r0, r1, _, _ = philox4x32_10(c0, c1, c2, zero, k0, k1)
    if F64:
        ct = tl.float64
    else:
        ct = tl.float32
    # 2^-24 is exact in float32; 2 pi is built in the compute dtype (a Python float literal
    # would be rounded to float32 first).
    u1 = ((r0 >> 8) + 1).to(ct) * 5.9604644775390625e-08
    u2 = (r1 >> 8).to(ct) * 5.9604644775390625e-08
    two_pi = tl.full([], 6.283185307179586, ct)
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(two_pi * u2)


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
                   F64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // nblocks
    j = (pid - n * nblocks) * BLOCK + tl.arange(0, BLOCK)
    m = j < S
    k0, k1 = seed_key(tl.load(seeds_ptr + n))
    z = philox_normal(j, step, stream, k0, k1, F64)
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
        nblocks = triton.cdiv(numel, cfg.block)
        _normal_kernel[(n * nblocks,)](
            seeds.contiguous(), out, numel, nblocks, step & 0xFFFFFFFF, stream & 0xFFFFFFFF,
            F64=dtype == torch.float64, BLOCK=cfg.block, num_warps=cfg.num_warps)
    return out
