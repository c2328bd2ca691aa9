"""Fused guided DDPM step: Tweedie + posterior mean + noise + DPS gradient in one pass.

Reads ``x, eps, w, u`` (+ ``v`` for learned-range variance, + ``noise`` when given), writes
``x_{t-1}``; the noise is drawn in-kernel from the Philox stream when not given, so the
unfused sequence's extra noise tensor (one write + one read) disappears. A program works on a
``[ROWS, 4]`` tile whose rows are the Philox calls of :mod:`dps_fast.noise`: one call per four
elements (a full call per element kept the kernel compute-bound, issue 9). ``eps`` and ``v`` are
read with a per-sample stride, so the channel halves of a learned-variance model output
(``out[:, :C]``, ``out[:, C:]``) need no copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..schedule import VARIANCE_CODES, Coef
from .launch import device_guard, elementwise_config, per_sample_grid
from .philox import normal_tile, sample_tile, seed_key
from .prep import cast_to, clip_words, tweedie_x0

__all__ = ["dps_update"]


_SQRT_1M_ABAR = tl.constexpr(Coef.SQRT_1M_ABAR)
_SQRT_RECIP_ABAR = tl.constexpr(Coef.SQRT_RECIP_ABAR)
_COEF_X0 = tl.constexpr(Coef.COEF_X0)
_COEF_XT = tl.constexpr(Coef.COEF_XT)
_LOG_VAR_SMALL = tl.constexpr(Coef.LOG_VAR_SMALL)
_LOG_BETA = tl.constexpr(Coef.LOG_BETA)
_SIGMA_SMALL = tl.constexpr(Coef.SIGMA_SMALL)
_SIGMA_LARGE = tl.constexpr(Coef.SIGMA_LARGE)
_NONZERO = tl.constexpr(Coef.NONZERO)


@triton.jit(do_not_specialize=["step"])
def _dps_update_kernel(
    x_ptr, eps_ptr, w_ptr, u_ptr, v_ptr, z_ptr, gscale_ptr, seeds_ptr, coefs_ptr, out_ptr, step_ptr,
    S, nblocks, eps_sn, v_sn, step, lo_hi, lo_lo, hi_hi, hi_lo,
    CLIP: tl.constexpr, VARIANCE: tl.constexpr, PHILOX: tl.constexpr, F64: tl.constexpr,
    STEP_PTR: tl.constexpr, ROWS: tl.constexpr,
):
    if F64:
        ct = tl.float64
    else:
        ct = tl.float32
    # [ROWS, 4] tile: row r holds elements 4 r .. 4 r + 3 of the sample, the four outputs of
    # Philox call r (the noise layout of dps_fast.noise); rows are contiguous in memory.
    n, call, slot, j, m = sample_tile(S, nblocks, ROWS)
    offs = n * S + j

    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(ct)
    # eps and v may be channel slices of the model output ([N, 2C, ...]): samples eps_sn / v_sn
    # elements apart, each sample contiguous
    eps = tl.load(eps_ptr + n * eps_sn + j, mask=m, other=0.0).to(ct)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(ct)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(ct)
    x0, _ = tweedie_x0(x, eps, coefs_ptr, lo_hi, lo_lo, hi_hi, hi_lo, CLIP, F64)

    if VARIANCE == 0:
        sigma = tl.load(coefs_ptr + _SIGMA_SMALL).to(ct)
    elif VARIANCE == 1:
        sigma = tl.load(coefs_ptr + _SIGMA_LARGE).to(ct)
    else:
        v = tl.load(v_ptr + n * v_sn + j, mask=m, other=0.0).to(ct)
        f = (v + 1.0) * 0.5
        log_var = f * tl.load(coefs_ptr + _LOG_BETA).to(ct) + (1.0 - f) * tl.load(coefs_ptr + _LOG_VAR_SMALL).to(ct)
        sigma = tl.load(coefs_ptr + _NONZERO).to(ct) * tl.exp(0.5 * log_var)

    if PHILOX:
        k0, k1 = seed_key(tl.load(seeds_ptr + n))
        if STEP_PTR:  # the step counter lives on the device (CUDA-graph replay)
            z = normal_tile(call, slot, (tl.load(step_ptr) & 0xFFFFFFFF), 0, k0, k1, F64)
        else:
            z = normal_tile(call, slot, step, 0, k0, k1, F64)
    else:
        z = tl.load(z_ptr + offs, mask=m, other=0.0).to(ct)

    sra = tl.load(coefs_ptr + _SQRT_RECIP_ABAR).to(ct)
    g = (w - tl.load(coefs_ptr + _SQRT_1M_ABAR).to(ct) * u) * (2.0 * sra)
    gs = tl.load(gscale_ptr + n).to(ct)
    res = (tl.load(coefs_ptr + _COEF_X0).to(ct) * x0 + tl.load(coefs_ptr + _COEF_XT).to(ct) * x
           + sigma * z - gs * g)
    tl.store(out_ptr + offs, cast_to(res, out_ptr), mask=m)


def dps_update(
    x: torch.Tensor, eps: torch.Tensor, w: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None,
    noise: torch.Tensor | None, gscale: torch.Tensor, seeds: torch.Tensor | None,
    coefs: torch.Tensor, out: torch.Tensor, step: int | torch.Tensor, clip: tuple[float, float] | None,
    variance: str, eps_sn: int | None = None, v_sn: int | None = None,
) -> None:
    """Write ``out`` for ``[N, *S]`` tensors (checked by the caller): ``x, w, u, noise, out``
    contiguous; ``eps`` and ``v`` with contiguous samples ``eps_sn`` / ``v_sn`` elements apart
    (default ``S``), e.g. channel slices of a ``[N, 2C, ...]`` model output read in place.
    ``noise`` None means in-kernel Philox noise from ``seeds`` at ``step`` (stream 0); ``step``
    may be an int64 one-element device tensor, read by the kernel (so a captured CUDA graph can
    replay any step)."""
    n = x.shape[0]
    s = x.numel() // n if n else 0
    if x.numel() == 0:
        return
    cfg = elementwise_config(s)
    nblocks, grid = per_sample_grid(n, s, cfg.block)
    with device_guard(x):
        _dps_update_kernel[grid](
            x, eps, w, u, v if v is not None else x, noise if noise is not None else x,
            gscale, seeds if seeds is not None else gscale, coefs, out,
            step if isinstance(step, torch.Tensor) else seeds if seeds is not None else gscale,
            s, nblocks, s if eps_sn is None else eps_sn, s if v_sn is None else v_sn,
            0 if isinstance(step, torch.Tensor) else step & 0xFFFFFFFF, *clip_words(clip),
            CLIP=clip is not None, VARIANCE=VARIANCE_CODES[variance], PHILOX=noise is None,
            F64=x.dtype == torch.float64, STEP_PTR=isinstance(step, torch.Tensor), ROWS=cfg.block // 4,
            num_warps=cfg.num_warps,
        )
