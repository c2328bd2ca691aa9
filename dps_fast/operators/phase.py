"""Fourier phase retrieval: ``y = |F(pad(x))|``, a nonlinear operator.

``pad`` zero-pads every signal axis by ``p = int(oversample / 8 * n)`` pixels on each side and
``F`` is the unitary DFT (``norm="ortho"``) with the zero frequency shifted to the centre
(``fftshift``), so ``y`` is ``[B, C, n + 2p, ...]`` and real. This is the original DPS code's
``PhaseRetrievalOperator`` (DPS2022 ``guided_diffusion/measurements.py``: ``F.pad`` by
``int(oversample / 8 * 256)``, then ``fft2_m(...).abs()``, a centred orthonormal FFT); that code
hard-codes 256 pixels in the padding, which ``int(oversample / 8 * n)`` equals for 256-pixel
images; pass ``pad=`` to fix the padding for other sizes. (The centring shift of the input
inside ``fft2_m`` multiplies the spectrum by a phase and leaves the magnitude unchanged.)

Guidance: with ``Z = F pad(x)`` and ``r = |Z| - y`` (weighted ``Lambda r`` for Poisson), the VJP
is ``J^T r = crop(Re(F^H (r * Z / |Z|)))`` (``Z / |Z|`` := 0 where ``Z = 0``, the subgradient
autograd uses too): two FFTs per step, no autograd graph.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .base import Measurement, Operator, check_signal, weighted_norm2

__all__ = ["PhaseRetrieval"]


class PhaseRetrieval(Operator):
    """``y = fftshift(|fftn(zero_pad(x), norm="ortho")|)`` over the 1 or 2 signal axes.

    Args:
        oversample: padding ``int(oversample / 8 * n)`` per side and axis (the DPS code's formula;
            2.0 pads a 256-pixel image by 64).
        pad: a fixed padding per side instead (e.g. ``pad=64`` reproduces the DPS code on any size).

    Example:
        >>> A = PhaseRetrieval(oversample=2.0)
        >>> A(torch.ones(1, 1, 8, 8)).shape        # 8 + 2 * int(2 / 8 * 8) = 12
        torch.Size([1, 1, 12, 12])
        >>> A.linear
        False
    """

    linear = False

    def __init__(self, oversample: float = 2.0, pad: Optional[int] = None) -> None:
        if isinstance(oversample, bool) or not isinstance(oversample, (int, float)) or not (
                math.isfinite(oversample) and oversample >= 0):
            raise ValueError(f"oversample: expected a finite number >= 0, got {oversample!r}")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 0):
            raise ValueError(f"pad: expected None or an int >= 0, got {pad!r}")
        self.oversample = float(oversample)
        self.pad = pad

    def pad_size(self, n: int) -> int:
        """Zero padding per side of an axis of length ``n``."""
        return self.pad if self.pad is not None else int(self.oversample / 8.0 * n)

    def _pad_arg(self, shape: tuple[int, ...]) -> list[int]:
        out: list[int] = []
        for n in reversed(shape):
            p = self.pad_size(n)
            out += [p, p]
        return out

    def _spectrum(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        nd = check_signal(x)
        dims = tuple(range(-nd, 0))
        xp = torch.nn.functional.pad(x, self._pad_arg(tuple(x.shape[2:])))
        return torch.fft.fftn(xp, dim=dims, norm="ortho"), dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Z, dims = self._spectrum(x)
        return torch.fft.fftshift(Z.abs(), dim=dims)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(input_shape[:2]) + tuple(n + 2 * self.pad_size(n) for n in input_shape[2:])

    def input_shape(self, output_shape: tuple[int, ...]) -> tuple[int, ...]:
        sizes = []
        for m in output_shape[2:]:
            # n + 2 * pad_size(n) grows strictly with n: at most one n gives m
            lo = max(1, int(m / (1.0 + self.oversample / 4.0)) - 3) if self.pad is None else max(1, m - 2 * self.pad)
            n = next((n for n in range(lo, m + 1) if n + 2 * self.pad_size(n) == m), None)
            if n is None:
                raise ValueError(f"y: no signal length n gives a measurement of length {m} for {self!r} "
                                 f"(n + 2 * pad(n) = {m}); got y of shape {tuple(output_shape)}")
            sizes.append(n)
        return tuple(output_shape[:2]) + tuple(sizes)

    # ---- what the sampler uses ------------------------------------------------------------
    def prepare(self, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> Measurement:
        meas = super().prepare(y, weight)
        nd = check_signal(y, "y")
        dims = tuple(range(-nd, 0))
        meas.extra["y0"] = torch.fft.ifftshift(y, dim=dims)  # in the FFT's own (unshifted) order
        if meas.weight is not None:
            meas.extra["weight0"] = torch.fft.ifftshift(meas.weight, dim=dims)
        return meas

    def residual(self, x: torch.Tensor, meas: Measurement) -> tuple[torch.Tensor, torch.Tensor]:
        """``(J^T Lambda r, ||r||^2_Lambda)`` in closed form: two FFTs of the padded size."""
        Z, dims = self._spectrum(x.detach())
        r = Z.abs() - meas.extra["y0"]  # prepare() stores y (and its weight) in the FFT's order
        weight = meas.extra.get("weight0")
        rw = r if weight is None else r * weight
        g = torch.fft.ifftn(rw * torch.sgn(Z), dim=dims, norm="ortho").real
        for d, n in enumerate(x.shape[2:]):
            g = g.narrow(2 + d, self.pad_size(n), n)
        return g.to(x.dtype).contiguous(), weighted_norm2(r, weight)

    def __repr__(self) -> str:
        return f"PhaseRetrieval(oversample={self.oversample}" + ("" if self.pad is None else f", pad={self.pad}") + ")"
