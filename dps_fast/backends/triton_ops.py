"""Triton backend: the ops of :mod:`dps_fast.backends.torch_ops`, fused into one-pass kernels.

Every function has exactly the signature and semantics of its ``torch_ops`` namesake (the
reference the tests compare against), with these documented differences:

* outputs follow the *state* dtype (``x``, ``x0hat``, the spectra) whatever the dtypes of the
  other inputs (torch would promote mixed dtypes); per-sample sums ``rnorm2`` are float32 for
  float32/bfloat16 states and float64 for float64 states;
* arithmetic is float32 for float32 and bfloat16 states (bfloat16 only at load/store) and
  float64 for float64 states, so a bfloat16 update is more accurate than torch run in bfloat16;
* the in-kernel noise is the Philox stream of :mod:`dps_fast.noise` (equal to
  ``philox_normal`` up to float32 rounding of ``log``/``sin``/``cos``) and is not rounded to bfloat16.

* ``coefs`` must be float32 or float64 (one row of ``NoiseSchedule.table(torch.float32)``, or
  float64 for float64 states), whatever the state dtype: a bfloat16 row would round
  ``sqrt(1/abar)`` (~157 at t = 999) by up to 0.2%, an error of ~0.4% in x0hat.

Tensors may be non-contiguous (they are copied to contiguous memory, never misread), except that
``eps`` and ``v`` are read in place whenever each sample is contiguous (e.g. the channel halves
``out[:, :C]``, ``out[:, C:]`` of a learned-variance model output): the kernels take their
per-sample stride. ``out`` may be ``x`` itself. Kernels launch on the device of their state
tensor (``kernels.launch.device_guard``), whatever the current device. Per-sample reductions are
deterministic: kernels write one partial sum per (sample, block) and torch adds them; no atomics.

Example:
    >>> from dps_fast.schedule import NoiseSchedule
    >>> coefs = NoiseSchedule.linear(10).table(torch.float32, "cuda")[5]
    >>> x, eps = torch.randn(2, 2, 3, 8, 8, device="cuda").unbind(0)
    >>> x0hat = tweedie(x, eps, coefs, clip=(-1.0, 1.0))     # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import math
import operator
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..schedule import VARIANCES, Coef
from . import torch_ops

__all__ = [
    "tweedie", "apply_clip_mask", "prep_elementwise", "spectral_residual",
    "blur_normal_residual", "dps_update",
]

Clip = Optional[tuple[float, float]]


def _import_kernels() -> None:
    """Make ``dps_fast.kernels`` importable: installed, it is a subpackage (pyproject maps the
    top-level ``kernels/`` folder to it); in a source checkout run without installing, the same
    folder is registered under that name."""
    try:
        import dps_fast.kernels  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "dps_fast.kernels":
            raise
        root = Path(__file__).resolve().parents[2] / "kernels"
        if not (root / "__init__.py").is_file():
            raise
        spec = importlib.util.spec_from_file_location(
            "dps_fast.kernels", root / "__init__.py", submodule_search_locations=[str(root)])
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load the Triton kernels from {root}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["dps_fast.kernels"] = mod
        spec.loader.exec_module(mod)
        setattr(sys.modules["dps_fast"], "kernels", mod)


_import_kernels()

from dps_fast.kernels import launch as _launch  # noqa: E402
from dps_fast.kernels import prep as _prep  # noqa: E402
from dps_fast.kernels import spectral as _spectral  # noqa: E402
from dps_fast.kernels import update as _update  # noqa: E402

STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_COMPLEX_DTYPES = (torch.complex64, torch.complex128)


# ---- input checks -----------------------------------------------------------------------
def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _tensor(name: str, t: object, dtypes: Sequence[torch.dtype] = STATE_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_names(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    return t


def _state(name: str, t: object, dtypes: Sequence[torch.dtype] = STATE_DTYPES) -> torch.Tensor:
    """A tensor the kernels will run on: right type, and a device Triton can run on."""
    t = _tensor(name, t, dtypes)
    if t.device.type != "cuda" and not _launch.interpreting():
        raise ValueError(
            f"{name}: the triton backend runs on CUDA tensors (or any device under "
            f"TRITON_INTERPRET=1), got a tensor on {t.device}")
    if t.dim() < 1:
        raise ValueError(f"{name}: expected a batched tensor [N, ...], got a 0-d tensor")
    return t


def _like(name: str, t: object, ref: torch.Tensor, ref_name: str,
          dtypes: Sequence[torch.dtype] = STATE_DTYPES) -> torch.Tensor:
    t = _tensor(name, t, dtypes)
    if t.shape != ref.shape:
        raise ValueError(f"{name}: expected the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    _same_device(name, t, ref, ref_name)
    return t


def _same_device(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref_name}'s device {ref.device}, got {t.device}")


def _coefs(coefs: object, x: torch.Tensor) -> torch.Tensor:
    if isinstance(coefs, torch.Tensor):
        torch_ops.check_coefs_dtype(coefs)  # the dtype refusal (and its message) of every kernel op set
    c = _tensor("coefs", coefs, (torch.float32, torch.float64))
    if c.shape != (Coef.COUNT,):
        raise ValueError(
            f"coefs: expected one row [Coef.COUNT] = [{Coef.COUNT}] of NoiseSchedule.table, "
            f"got shape {tuple(c.shape)}")
    _same_device("coefs", c, x, "x")
    return c.contiguous()


def _clip(clip: object) -> Clip:
    if clip is None:
        return None
    try:
        lo, hi = clip  # type: ignore[misc]
        return float(lo), float(hi)
    except (TypeError, ValueError):
        raise TypeError(f"clip: expected None or a pair (lo, hi) of floats, got {clip!r}") from None


def _per_sample(name: str, t: object, n: int, x: torch.Tensor,
                dtypes: Sequence[torch.dtype]) -> torch.Tensor:
    t = _tensor(name, t, dtypes)
    _same_device(name, t, x, "x")
    if t.numel() == n:
        return t.reshape(n).contiguous()
    if t.numel() == 1 and t.dtype != torch.int64:
        return t.reshape(1).expand(n).contiguous()
    raise ValueError(f"{name}: expected one value per sample [N] = [{n}], got shape {tuple(t.shape)}")


def _c(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(t, sample stride)`` when every sample ``t[n]`` is contiguous (the kernels then read
    ``t`` in place, e.g. a channel slice of a model output), else ``(contiguous copy, S)``."""
    sn = torch_ops.sample_stride(t)
    if sn is None:
        return t.contiguous(), _samples(t)[1]
    return t, sn


def _writable_in_place(out: torch.Tensor, inputs: Sequence[torch.Tensor]) -> bool:
    """``out`` can be written by an elementwise kernel that reads ``inputs``: contiguous, and
    sharing memory with an input only element for element (``out is x``)."""
    if not out.is_contiguous():
        return False
    base = out.untyped_storage().data_ptr()
    for t in inputs:
        if t.untyped_storage().data_ptr() == base and not (
            t.data_ptr() == out.data_ptr() and t.dtype == out.dtype and t.shape == out.shape
            and t.is_contiguous()
        ):
            return False
    return True


def _samples(x: torch.Tensor) -> tuple[int, int]:
    n = x.shape[0]
    return n, (x.numel() // n if n else 0)


# ---- ops --------------------------------------------------------------------------------
def tweedie(x: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor, clip: Clip = None) -> torch.Tensor:
    """Tweedie's estimate ``x0hat = (x - sqrt(1-abar) eps) / sqrt(abar)``, clamped to ``clip``.

    ``x, eps``: ``[N, *S]``; ``coefs``: ``[Coef.COUNT]``; returns ``[N, *S]`` in ``x``'s dtype.
    """
    x = _state("x", x)
    eps = _like("eps", eps, x, "x")
    coefs, clip = _coefs(coefs, x), _clip(clip)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    eps, eps_sn = _rows(eps)
    _prep.tweedie(_c(x), eps, coefs, out, clip, eps_sn)
    return out


def apply_clip_mask(w: torch.Tensor, x0hat: torch.Tensor, clip: Clip) -> torch.Tensor:
    """``w * clip_mask(x0hat)`` in place on ``w`` (returned); ``w`` unchanged without a clip."""
    w = _state("w", w)
    x0hat = _like("x0hat", x0hat, w, "w")
    clip = _clip(clip)
    if clip is None:
        return w
    x0c = _c(x0hat)
    if _writable_in_place(w, [x0c]):
        _prep.apply_clip_mask(w, x0c, clip)
    else:
        tmp = w.contiguous() if not w.is_contiguous() else w.clone()
        _prep.apply_clip_mask(tmp, x0c, clip)
        w.copy_(tmp)
    return w


def prep_elementwise(
    x: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor, clip: Clip,
    y: torch.Tensor, mask: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tweedie + residual for a pixel-mask operator (``A = diag(m)``; identity: ``mask=None``).

    Returns ``x0hat``, ``w = clipmask * m * (m * x0hat - y)`` (both ``[N, *S]`` in ``x``'s
    dtype) and ``rnorm2[n] = ||m * x0hat - y||^2`` ``[N]``. ``y`` has ``x``'s shape; ``mask``
    (bool or float) broadcasts against one sample (``[*S]``, ``[1, *S]``) or is ``[N, *S]``.
    """
    x = _state("x", x)
    eps = _like("eps", eps, x, "x")
    y = _like("y", y, x, "x")
    coefs, clip = _coefs(coefs, x), _clip(clip)
    n, s = _samples(x)
    m = None
    per_sample_mask = False
    if mask is not None:
        mask = _tensor("mask", mask, (torch.bool,) + STATE_DTYPES + (torch.float16,))
        _same_device("mask", mask, x, "x")
        m = mask
        sample_shape = x.shape[1:]
        if m.dim() == x.dim() and m.shape[0] == n and n != 1:
            per_sample_mask = True
            sample_shape = x.shape
        elif m.dim() == x.dim():
            m = m[0] if m.shape[0] == 1 else m
        try:
            m = m.expand(sample_shape)
        except RuntimeError:
            raise ValueError(
                f"mask: expected a shape that broadcasts against one sample {tuple(x.shape[1:])} "
                f"([*S] or [1, *S]) or [N, *S], got {tuple(mask.shape)}") from None
        m = _c(m)
        if m.dtype == torch.bool:
            m = m.view(torch.uint8)
    x0hat = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    w = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    eps, eps_sn = _rows(eps)
    partial = _prep.prep_elementwise(_c(x), eps, coefs, clip, _c(y), m, x0hat, w,
                                     mask_per_sample=per_sample_mask, eps_sn=eps_sn)
    return x0hat, w, partial.sum(1)


def spectral_residual(
    X: torch.Tensor, K: torch.Tensor, Y: torch.Tensor, n_last: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spectral stage of the FFT blur's normal residual, fused.

    ``X``: ``[N, C, *F]`` complex (``rfftn(x0hat)``); ``K``: ``[*F]`` complex transfer function
    (or ``[C, *F]``), broadcast over N and C; ``Y``: ``[N, C, *F]`` (``rfftn(y)``); ``n_last``:
    the signal length of the last axis. Returns ``W = conj(K) (K X - Y)`` (new complex tensor)
    and ``rnorm2[n] = ||A x0hat - y||^2`` by Parseval (real, ``[N]``).
    """
    X = _state("X", X, _COMPLEX_DTYPES)
    if X.dim() < 3:
        raise ValueError(f"X: expected a half spectrum [N, C, *F], got shape {tuple(X.shape)}")
    Y = _like("Y", Y, X, "X", (X.dtype,))
    K = _tensor("K", K, (X.dtype,))
    _same_device("K", K, X, "X")
    n_last = operator.index(n_last)
    if n_last < 1 or X.shape[-1] != n_last // 2 + 1:
        raise ValueError(
            f"n_last: expected the signal length whose half spectrum has X.shape[-1] = "
            f"{X.shape[-1]} bins (n_last // 2 + 1), got {n_last}")
    freq = tuple(X.shape[2:])
    k = K
    while k.dim() > len(freq) and k.shape[0] == 1:
        k = k.squeeze(0)
    try:
        k = k.expand(freq) if k.dim() <= len(freq) else k.expand(X.shape[1:])
    except RuntimeError:
        raise ValueError(
            f"K: expected a transfer function [*F] = {freq} (or [C, *F]) broadcast over N and C, "
            f"got shape {tuple(K.shape)}") from None
    W = torch.empty(X.shape, dtype=X.dtype, device=X.device)
    partial = _spectral.spectral_residual(_c(X), _c(k), _c(Y), W, n_last)
    npix = n_last * math.prod(X.shape[2:-1])
    return W, partial.sum(1) / npix


def blur_normal_residual(
    x0hat: torch.Tensor, K: torch.Tensor, Y: torch.Tensor, ndim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A^H(A x0hat - y)`` and ``||A x0hat - y||^2`` per sample for a circular blur.

    ``x0hat``: ``[N, C, *S]`` real with ``ndim`` (1 or 2) signal axes; ``K``: ``[*F]`` transfer
    function (``F = S[:-1] + (S[-1] // 2 + 1,)``); ``Y = rfftn(y)`` ``[N, C, *F]``. Two FFTs
    (torch.fft) around the fused spectral kernel; bfloat16 states are transformed in float32
    (torch.fft has no bfloat16) and the residual is returned in the state dtype.
    """
    x0hat = _state("x0hat", x0hat)
    if ndim not in (1, 2) or isinstance(ndim, bool):
        raise ValueError(f"ndim: expected 1 or 2 signal axes, got {ndim!r}")
    if x0hat.dim() != ndim + 2:
        raise ValueError(
            f"x0hat: expected [N, C, *S] with {ndim} signal axes ({ndim + 2} dims), "
            f"got shape {tuple(x0hat.shape)}")
    xf = x0hat.float() if x0hat.dtype == torch.bfloat16 else x0hat
    spec = torch.complex128 if xf.dtype == torch.float64 else torch.complex64
    _tensor("Y", Y, (spec,))
    _tensor("K", K, (spec,))
    dims = tuple(range(-ndim, 0))
    X = torch.fft.rfftn(xf, dim=dims)
    W, rnorm2 = spectral_residual(X, K, Y, x0hat.shape[-1])
    r = torch.fft.irfftn(W, s=x0hat.shape[-ndim:], dim=dims)
    return r.to(x0hat.dtype), rnorm2


def dps_update(
    x: torch.Tensor, eps: torch.Tensor, w: torch.Tensor, u: torch.Tensor, gscale: torch.Tensor,
    coefs: torch.Tensor, step: int | torch.Tensor, clip: Clip = None, variance: str = "fixed_small",
    v: Optional[torch.Tensor] = None, seeds: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One guided DDPM step in one pass (see ``torch_ops.dps_update`` for the formula).

    ``x, eps, w, u`` (``v``, ``noise``): ``[N, *S]``; ``gscale``: ``[N]``; ``seeds``: int64
    ``[N]``; ``coefs``: ``[Coef.COUNT]`` row of step ``step``. Without ``noise`` the kernel draws
    the Philox stream of ``seeds`` at ``step`` itself (no noise tensor is materialised).
    ``out`` may be ``x`` (in-place update); the result has ``x``'s dtype unless ``out`` is given.
    """
    x = _state("x", x)
    eps = _like("eps", eps, x, "x")
    w = _like("w", w, x, "x")
    u = _like("u", u, x, "x")
    if variance not in VARIANCES:
        raise ValueError(f"variance: expected one of {VARIANCES}, got {variance!r}")
    if variance == "learned_range":
        if v is None:
            raise ValueError("v: learned_range variance needs the model's variance channels, got None")
        v, v_sn = _rows(_like("v", v, x, "x"))
    else:
        v, v_sn = None, None
    if isinstance(step, torch.Tensor):
        if step.dtype != torch.int64 or step.numel() != 1:
            raise TypeError(f"step: expected an int or a one-element int64 tensor, got {step.dtype} of shape "
                            f"{tuple(step.shape)}")
        _same_device("step", step, x, "x")
    else:
        try:
            step = operator.index(step)
        except TypeError:
            raise TypeError(f"step: expected an int or an int64 tensor, got {type(step).__name__}") from None
    coefs, clip = _coefs(coefs, x), _clip(clip)
    n, s = _samples(x)
    gscale = _per_sample("gscale", gscale, n, x, STATE_DTYPES + (torch.float16,))
    if noise is None:
        if seeds is None:
            raise ValueError("seeds: needed when noise is None")
        seeds = _tensor("seeds", seeds, (torch.int64,))
        if seeds.shape != (n,):
            raise ValueError(f"seeds: expected an int64 tensor [N] = [{n}], got shape {tuple(seeds.shape)}")
        _same_device("seeds", seeds, x, "x")
        seeds = _c(seeds)
        if s >= 2**32:
            raise ValueError(f"x: at most 2^32 - 1 elements per sample for the noise stream, got {s}")
    else:
        noise = _c(_like("noise", noise, x, "x"))
    if out is not None:
        out = _tensor("out", out)
        if out.shape != x.shape:
            raise ValueError(f"out: expected the shape of x {tuple(x.shape)}, got {tuple(out.shape)}")
        _same_device("out", out, x, "x")
    eps, eps_sn = _rows(eps)
    ins = [_c(x), eps, _c(w), _c(u)]
    extra = [t for t in (v, noise) if t is not None]
    if out is not None and _writable_in_place(out, ins + extra + [gscale, coefs]):
        target = out
    else:
        target = torch.empty(x.shape, dtype=out.dtype if out is not None else x.dtype, device=x.device)
    _update.dps_update(*ins, v, noise, gscale, seeds, coefs, target, step, clip, variance, eps_sn, v_sn)
    if out is not None and target is not out:
        return out.copy_(target)
    return target
