"""The ``cuda`` backend: torch_ops' functions, computed by the CUDA extension (csrc/).

Every function has the signature of its :mod:`dps_fast.backends.torch_ops` namesake (the
contract, and the reference the kernels are tested against). The kernels run when the extension
is loaded (:func:`is_available`) and the inputs are CUDA tensors of a supported dtype; otherwise the
call is answered by torch_ops, so CPU tensors keep working. Load the extension when the backend is
chosen (``is_available()``), not inside a ``torch.compile``'d region: the first load may JIT-build.

Supported dtypes: ``dps_update`` float32/float64/float16/bfloat16 (float32 arithmetic for all but
float64; ``coefs`` and ``gscale`` are passed to the kernel in that arithmetic type, never rounded
to a 16-bit state dtype); ``spectral_residual`` complex64/complex128; ``blur_normal_residual``
float32/float64. ``eps`` and ``v`` are read in place when each sample is contiguous (the channel
halves of a learned-variance model output), other inputs are made contiguous.
``tweedie``, ``clip_mask``, ``apply_clip_mask``, ``prep_elementwise``, ``parseval_weights`` and
``step_sigma`` are torch_ops' own (single elementwise torch ops already).

Example:
    >>> from dps_fast.backends import cuda_ops
    >>> if cuda_ops.is_available():
    ...     x_next = cuda_ops.dps_update(x, eps, w, u, gscale, table[i], i, clip=(-1.0, 1.0), seeds=seeds)
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _cuda
from ..noise import STREAM_STEP
from ..schedule import VARIANCE_CODES
from . import torch_ops
from .torch_ops import (  # noqa: F401  re-exported: same functions on every backend
    Clip, apply_clip_mask, clip_mask, parseval_weights, prep_elementwise, step_sigma, tweedie,
)

__all__ = [
    "is_available", "tweedie", "clip_mask", "apply_clip_mask", "prep_elementwise", "spectral_residual",
    "parseval_weights", "blur_normal_residual", "dps_update", "step_sigma", "philox_normal",
]

_UPDATE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_FFT_DTYPES = (torch.float32, torch.float64)
_SPECTRAL_DTYPES = (torch.complex64, torch.complex128)


_ready: Optional[bool] = None  # a plain bool, so compiled code reads a constant after the first load


def is_available() -> bool:
    """Whether the CUDA kernels are loaded (loads, or JIT-builds, them on the first call)."""
    global _ready
    if _ready is None:
        _ready = _cuda.load_extension() is not None
    return _ready


def _use_kernel(t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    return t.is_cuda and t.dtype in dtypes and is_available()


def dps_update(
    x: torch.Tensor, eps: torch.Tensor, w: torch.Tensor, u: torch.Tensor, gscale: torch.Tensor,
    coefs: torch.Tensor, step: int, clip: Clip = None, variance: str = "fixed_small",
    v: Optional[torch.Tensor] = None, seeds: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
    *, x0hat_out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One guided DDPM step in one kernel pass; see :func:`torch_ops.dps_update`.

    Shapes: ``x, eps, w, u`` (and ``v``, ``noise``) ``[N, *S]``; ``gscale``, ``seeds`` ``[N]``
    (``gscale`` is used in float32, float64 for a float64 state);
    ``coefs`` one ``[Coef.COUNT]`` table row. ``out`` may be ``x`` (in-place). ``x0hat_out``
    (keyword-only, CUDA path only) also receives the clamped Tweedie estimate.
    """
    if isinstance(step, torch.Tensor):
        raise TypeError("step: the CUDA extension takes the step as an int; a device step tensor (used by "
                        "CUDA-graph replay) needs backend='triton' or 'torch'")
    code = VARIANCE_CODES.get(variance)
    if code is None:
        raise ValueError(f"variance: expected one of {sorted(VARIANCE_CODES)}, got {variance!r}")
    if code == VARIANCE_CODES["learned_range"] and v is None:
        raise ValueError("v: learned_range variance needs the model's variance channels, got None")
    if noise is None and seeds is None:
        raise ValueError("seeds: needed when noise is None")
    torch_ops.check_coefs_dtype(coefs)
    if not _use_kernel(x, _UPDATE_DTYPES):
        x0 = torch_ops.tweedie(x, eps, coefs, clip) if x0hat_out is not None else None  # before out= overwrites x
        res = torch_ops.dps_update(x, eps, w, u, gscale, coefs, step, clip, variance, v, seeds, noise, out)
        if x0 is not None:
            x0hat_out.copy_(x0)
        return res
    if x.dim() < 1:
        raise ValueError("x: expected [N, *S], got a 0-d tensor")
    dt, dev = x.dtype, x.device
    acc = torch.float64 if dt == torch.float64 else torch.float32  # the kernels' arithmetic type

    def prep(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=dev, dtype=dt).contiguous()

    def rows(t: torch.Tensor) -> torch.Tensor:
        # read in place when each sample is contiguous: the binding takes the sample stride
        t = t.to(device=dev, dtype=dt)
        return t if torch_ops.sample_stride(t) is not None else t.contiguous()

    lo, hi = (float(clip[0]), float(clip[1])) if clip is not None else (0.0, 0.0)
    x_in = x.contiguous()
    target = out if out is not None and out.is_contiguous() and out.dtype == dt and out.shape == x.shape else None
    if target is None:
        target = torch.empty_like(x_in)
    x0_target = x0hat_out
    if x0hat_out is not None and not (x0hat_out.is_contiguous() and x0hat_out.dtype == dt):
        x0_target = torch.empty_like(x_in)
    torch.ops.dps_fast.dps_update(
        x_in, rows(eps), prep(w), prep(u), gscale.to(device=dev, dtype=acc).reshape(-1).contiguous(),
        coefs.to(device=dev, dtype=acc).reshape(-1).contiguous(), int(step),
        clip is not None, lo, hi, code,
        rows(v) if code == VARIANCE_CODES["learned_range"] else None,
        seeds.to(device=dev, dtype=torch.int64).contiguous() if noise is None else None,
        prep(noise) if noise is not None else None,
        target, x0_target,
    )
    if x0hat_out is not None and x0_target is not x0hat_out:
        x0hat_out.copy_(x0_target)
    if out is not None and target is not out:
        return out.copy_(target)
    return target


def spectral_residual(
    X: torch.Tensor, K: torch.Tensor, Y: torch.Tensor, n_last: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``W = conj(K)(K X - Y)`` and Parseval ``rnorm2`` ``[N]``; see :func:`torch_ops.spectral_residual`.

    ``X``, ``Y`` ``[N, C, *F]`` complex, ``K`` ``[*F]``; deterministic (no atomics).
    """
    if not _use_kernel(X, _SPECTRAL_DTYPES) or X.dim() < 3:
        return torch_ops.spectral_residual(X, K, Y, n_last)
    return torch.ops.dps_fast.spectral_residual(
        X.contiguous(), K.to(device=X.device, dtype=X.dtype).contiguous(),
        Y.to(dtype=X.dtype).contiguous(), int(n_last),
    )


def blur_normal_residual(
    x0hat: torch.Tensor, K: torch.Tensor, Y: torch.Tensor, ndim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A^H(A x0hat - y)`` ``[N, C, *S]`` and ``||A x0hat - y||^2`` ``[N]`` of a circular blur:
    cuFFT R2C, the spectral kernel, cuFFT C2R; see :func:`torch_ops.blur_normal_residual`."""
    if ndim not in (1, 2, 3):
        raise ValueError(f"ndim: expected 1, 2 or 3 signal axes, got {ndim!r}")
    if x0hat.dim() != ndim + 2:
        raise ValueError(f"x0hat: expected [N, C, *S] with {ndim} signal axes, got shape {tuple(x0hat.shape)}")
    if not _use_kernel(x0hat, _FFT_DTYPES):
        return torch_ops.blur_normal_residual(x0hat, K, Y, ndim)
    ctype = torch.complex128 if x0hat.dtype == torch.float64 else torch.complex64
    return torch.ops.dps_fast.blur_normal_residual(
        x0hat.contiguous(), K.to(device=x0hat.device, dtype=ctype).contiguous(),
        Y.to(dtype=ctype).contiguous(), int(ndim),
    )


def philox_normal(
    seeds: torch.Tensor, numel: int, step: int, stream: int = STREAM_STEP,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """:func:`dps_fast.noise.philox_normal` ``[N, numel]`` drawn by a kernel (e.g. the initial x_T)."""
    if dtype in _UPDATE_DTYPES and _use_kernel(seeds, (torch.int64,)):
        if seeds.dtype != torch.int64 or seeds.dim() != 1:
            raise ValueError(f"seeds: expected an int64 tensor [N], got {seeds.dtype} of shape {tuple(seeds.shape)}")
        if not 0 <= numel < 2**32:
            raise ValueError(f"numel: expected 0 <= numel < 2^32, got {numel}")
        return torch.ops.dps_fast.philox_normal(seeds.contiguous(), int(numel), int(step), int(stream), dtype)
    from ..noise import philox_normal as reference

    return reference(seeds, numel, step, stream, dtype)
