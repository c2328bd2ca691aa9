"""The singular value decomposition ``A = U diag(s) V^T`` of each built-in operator, used implicitly.

MCG's projection, PiGDM's regularized pseudo-inverse and DDRM's spectral update are all functions
of ``A^T A`` applied in the basis ``V`` where it is diagonal. For the built-in operators that basis
is cheap to apply without a matrix:

===================  =========================================  ======================================
operator             ``V^T x`` (the *spectral* coordinates)     singular values ``s``
===================  =========================================  ======================================
``Identity``         ``x``                                      1
``Inpainting(m)``    ``x``                                      ``|m|`` (``U^T y = sign(m) y``)
circular ``Blur``    ``rfftn(x, norm="ortho")``                 ``|K|``, ``U^T y = conj(K)/|K| Y``
``SuperResolution``  orthonormal DCT-II inside each f^d block   ``f^{-d/2}`` on the block's constant
                                                                coefficient, 0 on the others
``SubsampledFourier`` ``rfftn(x, norm="ortho")``                ``sqrt((m_k^2 + m_{-k}^2) / 2)``
``Matrix(A)``        ``x @ V`` (``torch.linalg.svd``)           the singular values, 0-padded to d
===================  =========================================  ======================================

Spectral coordinates are real, or complex rfft coefficients of a real signal; every update below
multiplies them by real functions of ``s`` that are even in the frequency, so ``V`` of the result
is real and the algebra is that of a real orthonormal basis (cosines and sines).

For ``SubsampledFourier`` on real signals the measurement of ``X_k`` also fixes ``X_{-k} =
conj(X_k)``: on the real 2-D subspace of the frequency pair ``(k, -k)``, ``A^T A = (m_k^2 +
m_{-k}^2) / 2``, and ``U^T y = (m_k y_k + m_{-k} conj(y_{-k})) / (2 s)`` in rfft units.

Singular values below ``rcond * max(s)`` are treated as zero (DDRM's reference code zeroes those
below 1e-3 the same way), which keeps ``U^T y / s`` bounded for a blur whose transfer function
decays to ~1e-19 at high frequencies.

Example:
    >>> from dps_fast import operators
    >>> view = svd_view(operators.SuperResolution(2), "DDRM")
    >>> x = torch.randn(3, 1, 4, 6, dtype=torch.float64)
    >>> bool(torch.allclose(view.v(view.vt(x), x.shape), x))
    True
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from ..operators import Blur, GaussianBlur, Identity, Inpainting, Matrix, MotionBlur, SubsampledFourier, SuperResolution
from ..operators.base import LinearOperator

__all__ = ["SVDView", "svd_view", "SUPPORTED", "measured_spectrum", "regularized_pinv", "project"]


def _fft_dims(x_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(range(-(len(x_shape) - 2), 0))


def _cutoff(s: torch.Tensor, rcond: float) -> torch.Tensor:
    """``s`` with values below ``rcond * max(s)`` set to 0 (a 0-d max: no host sync)."""
    if rcond <= 0:
        return s
    return torch.where(s > rcond * s.max(), s, torch.zeros_like(s))


class SVDView:
    """``A = U diag(s) V^T`` applied implicitly (see the module docstring for each operator).

    ``vt(x)`` maps ``[N, *x]`` to spectral coordinates, ``v(c, x_shape)`` maps them back,
    ``singular(x)`` gives ``s`` broadcastable to ``vt(x)`` (rcond cut-off applied), and ``ut(y,
    x_shape)`` gives ``U^T y`` in the spectral layout, zero where ``s == 0``.

    What depends only on the operator, the sample shape, dtype and device (``s``, DCT matrices,
    masks) is built once and cached: the methods call these every step, and on CUDA a rebuilt
    host tensor would be a host-to-device copy per step.
    """

    def __init__(self, operator: LinearOperator, rcond: float = 0.0) -> None:
        self.operator = operator
        self.rcond = float(rcond)
        self._cache: dict = {}

    def _cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = build()
        return value

    def vt(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def v(self, c: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def singular(self, x: torch.Tensor) -> torch.Tensor:
        """``s`` for samples shaped like ``x[0]`` (cached per sample shape, dtype and device)."""
        return self._cached(("s", tuple(x.shape[1:]), x.dtype, x.device), lambda: self._singular(x))

    def _singular(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def ut(self, y: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.operator!r}, rcond={self.rcond})"


class _IdentitySVD(SVDView):
    def vt(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def v(self, c: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
        return c

    def _singular(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones((), dtype=x.dtype, device=x.device)

    def ut(self, y: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
        return y


class _MaskSVD(_IdentitySVD):
    """``A = diag(m)``: ``V = I``, ``s = |m|``, ``U = diag(sign(m))``."""

    def _singular(self, x: torch.Tensor) -> torch.Tensor:
        return _cutoff(self.operator.pixel_mask(x).abs(), self.rcond)

    def ut(self, y: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
        m = self.operator.pixel_mask(y)
        return torch.where(self.singular(y) > 0, torch.sign(m) * y, torch.zeros_like(y))


class _FourierSVD(SVDView):
    """Operators diagonal in the orthonormal real FFT: ``V^T x = rfftn(x, norm="ortho")``."""

    def vt(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfftn(x, dim=_fft_dims(tuple(x.shape)), norm="ortho")

    def v(self, c: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
        dims = _fft_dims(tuple(x_shape))
        return torch.fft.irfftn(c, s=tuple(x_shape[2:]), dim=dims, norm="ortho")


class _BlurSVD(_FourierSVD):
    """Circular blur ``A = F^H diag(K) F``: ``s = |K|``, ``U^T y = conj(K) / |K| rfftn(y)``."""

    def _transfer(self, x: torch.Tensor) -> torch.Tensor:
        return self.operator.transfer(tuple(x.shape[2:]), x.device, x.dtype)

    def _singular(self, x: torch.Tensor) -> torch.Tensor:
        return _cutoff(self._transfer(x).abs(), self.rcond)

    def ut(self, y: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
        K = self._transfer(y)
        s = self.singular(y)
        phase = torch.where(s > 0, K.conj() / K.abs().clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(K))
        return phase * self.vt(y)


class _FourierMaskSVD(_FourierSVD):
    """``A x = m * fftn(x, norm="ortho")`` on real ``x`` (see the module docstring)."""

    def _masks(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cached(("masks", like.real.dtype, like.device), lambda: self._build_masks(like))

    def _build_masks(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.operator.mask.to(device=like.device, dtype=like.real.dtype)
        dims = tuple(range(m.dim()))
        m_neg = torch.roll(torch.flip(m, dims), shifts=(1,) * m.dim(), dims=dims)  # m_neg[k] = m[-k mod n]
        half = m.shape[-1] // 2 + 1
        return m[..., :half], m_neg[..., :half]

    def _singular(self, x: torch.Tensor) -> torch.Tensor:
        m, m_neg = self._masks(x)
        return _cutoff(((m.square() + m_neg.square()) * 0.5).sqrt(), self.rcond)

    def ut(self, y: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
        m, m_neg = self._masks(y)
        half = m.shape[-1]
        dims = tuple(range(-m.dim(), 0))
        y_neg = torch.roll(torch.flip(y, dims), shifts=(1,) * m.dim(), dims=dims)
        num = m * y[..., :half] + m_neg * y_neg[..., :half].conj()
        s = self.singular(y.real)
        return torch.where(s > 0, num / (2.0 * s).clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(num))


def dct_matrix(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Orthonormal DCT-II ``[n, n]``; row 0 is the constant ``1/sqrt(n)``."""
    j = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi * (j.view(1, -1) + 0.5) * j.view(-1, 1) / n) * math.sqrt(2.0 / n)
    d[0] = 1.0 / math.sqrt(n)
    return d.to(device=device, dtype=dtype)


class _BoxSVD(SVDView):
    """Block means of ``f^d`` pixels: per block ``A = 1^T / f^d = f^{-d/2} v_0^T`` with the
    constant unit vector ``v_0``; ``V`` is the separable orthonormal DCT-II of each block."""

    def _blocks(self, x_shape: tuple[int, ...]) -> list[int]:
        f = self.operator.factor
        shape = list(x_shape[:2])
        for s in x_shape[2:]:
            shape += [s // f, f]
        return shape

    def _dct(self, like: torch.Tensor) -> torch.Tensor:
        return self._cached(("dct", like.dtype, like.device),
                            lambda: dct_matrix(self.operator.factor, like.dtype, like.device))

    def vt(self, x: torch.Tensor) -> torch.Tensor:
        d = self._dct(x)
        c = x.reshape(self._blocks(tuple(x.shape)))
        for ax in range(3, c.dim(), 2):
            c = torch.movedim(torch.movedim(c, ax, -1) @ d.T, -1, ax)
        return c

    def v(self, c: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
        d = self._dct(c)
        for ax in range(3, c.dim(), 2):
            c = torch.movedim(torch.movedim(c, ax, -1) @ d, -1, ax)
        return c.reshape(x_shape)

    def _singular(self, x: torch.Tensor) -> torch.Tensor:
        nd = x.dim() - 2
        f = self.operator.factor
        s = torch.zeros([1, 1] + [1, f] * nd, dtype=x.dtype, device=x.device)
        s[(0, 0) + (0, 0) * nd] = float(f) ** (-nd / 2.0)
        return s

    def ut(self, y: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
        nd = y.dim() - 2
        out = torch.zeros(self._blocks(tuple(x_shape)), dtype=y.dtype, device=y.device)
        out[(slice(None), slice(None)) + (slice(None), 0) * nd] = y
        return out


class _MatrixSVD(SVDView):
    """``A = U diag(s) V^T`` by ``torch.linalg.svd`` (float64, once per dtype and device)."""

    def __init__(self, operator: LinearOperator, rcond: float = 0.0) -> None:
        super().__init__(operator, rcond)
        a = operator.A.detach().to(device="cpu", dtype=torch.float64)
        u, s, vh = torch.linalg.svd(a, full_matrices=True)
        d = a.shape[1]
        s_full = torch.zeros(d, dtype=torch.float64)
        s_full[: s.numel()] = s
        self._host = (u, _cutoff(s_full, self.rcond), vh)

    def _parts(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._cached(("parts", like.device, like.dtype),
                            lambda: tuple(t.to(device=like.device, dtype=like.dtype) for t in self._host))

    def vt(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self._parts(x)[2].T

    def v(self, c: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
        return c @ self._parts(c)[2]

    def _singular(self, x: torch.Tensor) -> torch.Tensor:
        return self._parts(x)[1]

    def ut(self, y: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
        u, s, _ = self._parts(y)
        uy = y @ u  # [N, C, m]
        d, m = s.numel(), uy.shape[-1]
        uy = uy[..., :d] if m >= d else torch.cat([uy, uy.new_zeros(uy.shape[:-1] + (d - m,))], -1)
        return torch.where(s > 0, uy, torch.zeros_like(uy))


#: The operator classes each method supports (exact types: a subclass may change the boundary or kernel).
SUPPORTED: dict[type, type] = {
    Identity: _IdentitySVD, Inpainting: _MaskSVD, Blur: _BlurSVD, GaussianBlur: _BlurSVD, MotionBlur: _BlurSVD,
    SuperResolution: _BoxSVD, SubsampledFourier: _FourierMaskSVD, Matrix: _MatrixSVD,
}


def svd_view(operator: LinearOperator, method: str, allowed: Optional[tuple[type, ...]] = None,
             rcond: float = 0.0, reason: str = "") -> SVDView:
    """The implicit SVD of ``operator`` for ``method``, or a TypeError naming the operator.

    ``allowed`` narrows :data:`SUPPORTED` (e.g. MCG's cheap projections); ``reason`` is appended to
    the error.
    """
    kinds = tuple(SUPPORTED) if allowed is None else allowed
    cls = type(operator)
    ok = cls in kinds and cls in SUPPORTED
    # operators a later version gives a non-circular boundary, a non-box kernel or a complex domain
    if ok and getattr(operator, "boundary", "circular") != "circular":
        ok = False
    if ok and cls is SuperResolution and getattr(operator, "filter", "box") != "box":
        ok = False  # the block DCT below is the SVD of box averaging only
    if ok and cls is SubsampledFourier and not operator.real:
        ok = False
    if ok and cls is Matrix and operator.A.is_complex():
        ok = False
    if not ok:
        names = ", ".join(sorted({k.__name__ + ("(real=True)" if k is SubsampledFourier else "")
                                  + (" (circular)" if issubclass(k, Blur) else "")
                                  + (" (box)" if k is SuperResolution else "") for k in kinds}))
        raise TypeError(f"operator: {method} supports {names}; got {operator!r}{reason}")
    return SUPPORTED[cls](operator, rcond)


def measured_spectrum(view: SVDView, operator: LinearOperator, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """What MCG and DDRM precompute once per run from ``y`` ``[N, *out]``, in ``V``'s basis: the
    singular values ``s`` (``[N, *x]``-broadcastable), ``s_safe`` (``s`` with zeros replaced by 1),
    ``uty = U^T y`` and ``ybar = U^T y / s`` on the measured coordinates (0 elsewhere)."""
    x_shape = tuple(operator.input_shape(tuple(y.shape)))
    like = torch.zeros((), dtype=y.real.dtype, device=y.device).expand(x_shape)
    s = view.singular(like)
    uty = view.ut(y, x_shape)
    s_safe = torch.where(s > 0, s, torch.ones_like(s))
    return {"s": s, "s_safe": s_safe, "uty": uty, "ybar": torch.where(s > 0, uty / s_safe, torch.zeros_like(uty))}


def regularized_pinv(view: SVDView, x0hat: torch.Tensor, uty: torch.Tensor, r2: float, sigma2: float) -> torch.Tensor:
    """``A^T (r2 A A^T + sigma2 I)^{-1} (y - A x0hat) = V [s (U^T y - s V^T x0hat) / (r2 s^2 + sigma2)]``.

    With ``sigma2 = 0`` this is ``A^+ (y - A x0hat) / r2`` (zero on the null space). ``uty`` is
    ``view.ut(y, x0hat.shape)``; shapes ``[N, *x]``.
    """
    s = view.singular(x0hat)
    den = r2 * s.square() + sigma2
    gain = torch.where(s > 0, s / torch.where(s > 0, den, torch.ones_like(den)), torch.zeros_like(s))
    return view.v(gain * (uty - s * view.vt(x0hat)), tuple(x0hat.shape))


def project(view: SVDView, x: torch.Tensor, ybar: torch.Tensor) -> torch.Tensor:
    """``x - A^+(A x - y')`` where ``ybar = U^T y' / s`` (spectral, on ``s > 0``): the point of
    ``{x : A x = y'}`` nearest to ``x``. ``[N, *x]`` in and out."""
    s = view.singular(x)
    return view.v(torch.where(s > 0, ybar, view.vt(x)), tuple(x.shape))
