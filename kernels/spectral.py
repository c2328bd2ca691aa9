"""Spectral stage of the FFT blur's normal residual: ``W = conj(K) (K X - Y)`` and the
Parseval-weighted per-sample partial sums of ``|K X - Y|^2``, in one pass over the half spectra.

Complex tensors arrive as ``torch.view_as_real`` views (interleaved re/im); a block loads
``[BLOCK, 2]`` tiles and splits them, so each complex number is one contiguous 8/16-byte access.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import device_guard, elementwise_config, per_sample_grid

__all__ = ["spectral_residual"]


@triton.jit
def _spectral_kernel(x_ptr, k_ptr, y_ptr, w_ptr, part_ptr, P, KP, F_LAST, nblocks,
                     EVEN: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    if F64:
        ct = tl.float64
    else:
        ct = tl.float32
    pid = tl.program_id(0).to(tl.int64)
    n = pid // nblocks
    # index within the sample in int32 (P < 2^31, checked by the caller): the two modulos
    # below are 32-bit remainders instead of 64-bit ones.
    j = (pid - n * nblocks).to(tl.int32) * BLOCK + tl.arange(0, BLOCK)
    m = j < P
    two = tl.arange(0, 2)
    m2 = m[:, None] & (two[None, :] < 2)
    o2 = (n * P + j)[:, None] * 2 + two[None, :]
    k2 = (j % KP)[:, None] * 2 + two[None, :]
    xr, xi = tl.split(tl.load(x_ptr + o2, mask=m2, other=0.0).to(ct))
    yr, yi = tl.split(tl.load(y_ptr + o2, mask=m2, other=0.0).to(ct))
    kr, ki = tl.split(tl.load(k_ptr + k2, mask=m2, other=0.0).to(ct))
    rr = kr * xr - ki * xi - yr
    ri = kr * xi + ki * xr - yi
    wr = kr * rr + ki * ri
    wi = kr * ri - ki * rr
    tl.store(w_ptr + o2, tl.join(wr, wi).to(w_ptr.dtype.element_ty), mask=m2)
    fl = j % F_LAST
    if EVEN:
        edge = (fl == 0) | (fl == F_LAST - 1)
    else:
        edge = fl == 0
    wt = tl.where(edge, 1.0, 2.0).to(ct)
    e = tl.where(m, wt * (rr * rr + ri * ri), 0.0)
    tl.store(part_ptr + pid, tl.sum(e, axis=0))


def spectral_residual(X: torch.Tensor, K: torch.Tensor, Y: torch.Tensor, W: torch.Tensor,
                      n_last: int) -> torch.Tensor:
    """Fill ``W`` and return partial sums ``[N, nblocks]`` of the weighted ``|R|^2`` (real dtype
    of the spectra). ``X, Y, W`` are contiguous complex ``[N, ...]`` of ``P`` numbers per sample;
    ``K`` contiguous complex, broadcast by index ``j % K.numel()`` within a sample."""
    n = X.shape[0]
    p = X.numel() // n if n else 0
    real = X.real.dtype
    if X.numel() == 0:
        return torch.zeros(n, 1, dtype=real, device=X.device)
    if p >= 2**31:
        raise ValueError(f"X: at most 2^31 - 1 frequencies per sample, got {p}")
    cfg = elementwise_config(p)
    nblocks, grid = per_sample_grid(n, p, cfg.block)
    partial = torch.empty(n, nblocks, dtype=real, device=X.device)
    with device_guard(X):
        _spectral_kernel[grid](
            torch.view_as_real(X), torch.view_as_real(K), torch.view_as_real(Y), torch.view_as_real(W),
            partial, p, K.numel(), X.shape[-1], nblocks,
            EVEN=n_last % 2 == 0, F64=real == torch.float64, BLOCK=cfg.block, num_warps=cfg.num_warps)
    return partial
