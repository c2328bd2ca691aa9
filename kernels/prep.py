"""Tweedie's ``x0hat``, the clamp's gradient mask, and the fused elementwise-operator residual
(``A = diag(m)``) with per-sample partial sums of ``||A x0hat - y||^2``.

``prep_elementwise`` replaces five torch passes (tweedie, mask multiply, residual, mask
multiply, square-sum) by one read of ``x, eps, y`` and one write of ``x0hat, w``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..schedule import Coef
from .launch import device_guard, elementwise_config, per_sample_grid

__all__ = ["cast_to", "clip_words", "tweedie", "apply_clip_mask", "prep_elementwise"]

_SQRT_RECIP_ABAR = tl.constexpr(Coef.SQRT_RECIP_ABAR)
_SQRT_RECIPM1_ABAR = tl.constexpr(Coef.SQRT_RECIPM1_ABAR)


@triton.jit
def cast_to(v, ptr):
    """``v`` in the element type of ``ptr``, rounding to nearest-even for bfloat16 explicitly
    (torch's rule; Triton's interpreter would truncate a plain ``.to(tl.bfloat16)``, so the
    rounding is spelled out in integer ops that behave the same compiled and interpreted)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        f = v.to(tl.float32)
        bits = f.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(f != f, 0x7FC0, r)
        out = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(ptr.dtype.element_ty)
    return out


@triton.jit
def clip_bound(b_hi, b_lo, F64: tl.constexpr):
    """A clip bound passed as two float32 words (``hi + lo``): exact to 2^-48 in float64 mode
    (Triton passes Python floats as float32), ``hi`` alone in float32 mode."""
    # tl.full accepts both a scalar tensor (compiled) and a Python float (interpreter)
    if F64:
        b = tl.full([], b_hi, tl.float64) + tl.full([], b_lo, tl.float64)
    else:
        b = tl.full([], b_hi, tl.float32)
    return b


@triton.jit
def tweedie_x0(x, eps, coefs_ptr, lo_hi, lo_lo, hi_hi, hi_lo, CLIP: tl.constexpr, F64: tl.constexpr):
    """``x0hat`` of ``x, eps`` (compute dtype) with the step's coefficients; NaN-preserving clamp
    (``torch.clamp`` semantics) when ``CLIP``. Returns ``(x0hat, clip_mask)`` (mask all-true
    without a clip)."""
    if F64:
        ct = tl.float64
    else:
        ct = tl.float32
    sra = tl.load(coefs_ptr + _SQRT_RECIP_ABAR).to(ct)
    srm1 = tl.load(coefs_ptr + _SQRT_RECIPM1_ABAR).to(ct)
    x0 = sra * x - srm1 * eps
    if CLIP:
        lo = clip_bound(lo_hi, lo_lo, F64)
        hi = clip_bound(hi_hi, hi_lo, F64)
        x0 = tl.where(x0 < lo, lo, x0)
        x0 = tl.where(x0 > hi, hi, x0)
        keep = (x0 > lo) & (x0 < hi)
    else:
        keep = x0 == x0
    return x0, keep


@triton.jit
def sample_block(S, nblocks, BLOCK: tl.constexpr):
    """This program's block of one sample on the flat (sample x block) grid: the sample ``n``,
    the element indices ``j`` within it (an in-place ``eps`` is read at ``n * eps_sn + j``), their
    mask ``j < S`` and flat offsets ``n * S + j``. (The update kernel tiles by Philox call instead:
    ``philox.sample_tile``, counter ``j // 4``.)"""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // nblocks
    j = (pid - n * nblocks) * BLOCK + tl.arange(0, BLOCK)
    return n, j, j < S, n * S + j


@triton.jit
def _tweedie_kernel(x_ptr, eps_ptr, coefs_ptr, out_ptr, S, nblocks, eps_sn, lo_hi, lo_lo, hi_hi, hi_lo,
                    CLIP: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    if F64:
        ct = tl.float64
    else:
        ct = tl.float32
    n, j, m, offs = sample_block(S, nblocks, BLOCK)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(ct)
    eps = tl.load(eps_ptr + n * eps_sn + j, mask=m, other=0.0).to(ct)
    x0, _ = tweedie_x0(x, eps, coefs_ptr, lo_hi, lo_lo, hi_hi, hi_lo, CLIP, F64)
    tl.store(out_ptr + offs, cast_to(x0, out_ptr), mask=m)


@triton.jit
def _clip_mask_kernel(w_ptr, x0_ptr, numel, lo_hi, lo_lo, hi_hi, hi_lo,
                      F64: tl.constexpr, BLOCK: tl.constexpr):
    if F64:
        ct = tl.float64
    else:
        ct = tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    x0 = tl.load(x0_ptr + offs, mask=m, other=0.0).to(ct)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(ct)
    keep = (x0 > clip_bound(lo_hi, lo_lo, F64)) & (x0 < clip_bound(hi_hi, hi_lo, F64))
    tl.store(w_ptr + offs, cast_to(w * keep.to(ct), w_ptr), mask=m)


@triton.jit
def _prep_kernel(x_ptr, eps_ptr, y_ptr, mask_ptr, coefs_ptr, x0_ptr, w_ptr, part_ptr,
                 S, nblocks, eps_sn, lo_hi, lo_lo, hi_hi, hi_lo,
                 CLIP: tl.constexpr, HAS_MASK: tl.constexpr, MASK_PER_SAMPLE: tl.constexpr,
                 F64: tl.constexpr, BLOCK: tl.constexpr):
    if F64:
        ct = tl.float64
    else:
        ct = tl.float32
    n, j, m, offs = sample_block(S, nblocks, BLOCK)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(ct)
    eps = tl.load(eps_ptr + n * eps_sn + j, mask=m, other=0.0).to(ct)
    y = tl.load(y_ptr + offs, mask=m, other=0.0).to(ct)
    x0, keep = tweedie_x0(x, eps, coefs_ptr, lo_hi, lo_lo, hi_hi, hi_lo, CLIP, F64)
    if HAS_MASK:
        if MASK_PER_SAMPLE:
            mk = tl.load(mask_ptr + offs, mask=m, other=0).to(ct)
        else:
            mk = tl.load(mask_ptr + j, mask=m, other=0).to(ct)
        r = x0 * mk - y
        w = r * mk
    else:
        r = x0 - y
        w = r
    if CLIP:
        w = w * keep.to(ct)
    tl.store(x0_ptr + offs, cast_to(x0, x0_ptr), mask=m)
    tl.store(w_ptr + offs, cast_to(w, w_ptr), mask=m)
    r = tl.where(m, r, 0.0)
    tl.store(part_ptr + tl.program_id(0).to(tl.int64), tl.sum(r * r, axis=0))


def clip_words(clip: tuple[float, float] | None) -> tuple[float, float, float, float]:
    """``(lo_hi, lo_lo, hi_hi, hi_lo)``: each clip bound split into two float32 words whose sum
    is the bound to 2^-48 (Triton passes Python floats to kernels as float32)."""
    if clip is None:
        return (0.0, 0.0, 0.0, 0.0)
    words: list[float] = []
    for b in clip:
        b = float(b)
        hi = torch.tensor(b, dtype=torch.float64).to(torch.float32).item()
        lo = torch.tensor(b - hi, dtype=torch.float64).to(torch.float32).item() if math.isfinite(hi) else 0.0
        words += [hi, lo]
    return tuple(words)  # type: ignore[return-value]


def tweedie(x: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor, out: torch.Tensor,
            clip: tuple[float, float] | None, eps_sn: int | None = None) -> None:
    """``out = clamp(x0hat)`` for contiguous ``[N, *S]`` ``x, out``; ``eps`` has ``x``'s shape and
    contiguous samples ``eps_sn`` elements apart (default ``S``: contiguous)."""
    n = x.shape[0]
    s = x.numel() // n if n else 0
    if x.numel() == 0:
        return
    cfg = elementwise_config(s)
    nblocks, grid = per_sample_grid(n, s, cfg.block)
    with device_guard(x):
        _tweedie_kernel[grid](
            x, eps, coefs, out, s, nblocks, s if eps_sn is None else eps_sn, *clip_words(clip),
            CLIP=clip is not None, F64=x.dtype == torch.float64, BLOCK=cfg.block, num_warps=cfg.num_warps)


def apply_clip_mask(w: torch.Tensor, x0hat: torch.Tensor, clip: tuple[float, float]) -> None:
    """``w *= (lo < x0hat < hi)`` in place for contiguous same-shape ``w, x0hat``."""
    numel = w.numel()
    if numel == 0:
        return
    cfg = elementwise_config(numel)
    with device_guard(w):
        _clip_mask_kernel[(triton.cdiv(numel, cfg.block),)](
            w, x0hat, numel, *clip_words(clip),
            F64=torch.float64 in (w.dtype, x0hat.dtype), BLOCK=cfg.block, num_warps=cfg.num_warps)


def prep_elementwise(x: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor,
                     clip: tuple[float, float] | None, y: torch.Tensor, mask: torch.Tensor | None,
                     x0hat: torch.Tensor, w: torch.Tensor, mask_per_sample: bool = False,
                     eps_sn: int | None = None) -> torch.Tensor:
    """Fill ``x0hat, w`` (contiguous, ``x``'s shape) and return the per-sample partial sums
    ``[N, nblocks]`` of ``r^2`` (float64 for float64 states, else float32). ``x, y`` contiguous;
    ``eps`` with contiguous samples ``eps_sn`` elements apart (default ``S``). ``mask`` is None
    or contiguous: one sample's ``S`` elements, or ``x``'s shape when ``mask_per_sample``."""
    n = x.shape[0]
    s = x.numel() // n if n else 0
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.numel() == 0:
        return torch.zeros(n, 1, dtype=acc, device=x.device)
    cfg = elementwise_config(s)
    nblocks, grid = per_sample_grid(n, s, cfg.block)
    partial = torch.empty(n, nblocks, dtype=acc, device=x.device)
    with device_guard(x):
        _prep_kernel[grid](
            x, eps, y, mask if mask is not None else x, coefs, x0hat, w, partial,
            s, nblocks, s if eps_sn is None else eps_sn, *clip_words(clip),
            CLIP=clip is not None, HAS_MASK=mask is not None, MASK_PER_SAMPLE=mask_per_sample,
            F64=x.dtype == torch.float64,
            BLOCK=cfg.block, num_warps=cfg.num_warps)
    return partial
