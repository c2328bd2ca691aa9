"""FFT-based blur operators with **circular** boundary: ``Blur``, ``GaussianBlur``, ``MotionBlur``.

``A x = k (*) x`` is a circular convolution (the image wraps around at its edges), so it is
diagonal in Fourier space: ``A x = irfftn(K * rfftn(x))``. This makes ``A^H`` exact and lets
``normal_residual`` cost two FFTs: ``irfftn(|K|^2 X - conj(K) Y)`` with ``Y = rfftn(y)``
precomputed once per measurement. The kernel's centre tap (index ``k // 2`` per axis) sits at
pixel offset 0, so a symmetric kernel does not shift the image.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .base import LinearOperator, Measurement, check_signal

__all__ = ["Blur", "GaussianBlur", "MotionBlur", "gaussian_kernel1d", "motion_kernel"]


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


class Blur(LinearOperator):
    """Circular convolution with a user kernel.

    Args:
        kernel: ``[k]`` for 1-D signals ``[B, C, L]`` or ``[kh, kw]`` for images ``[B, C, H, W]``.
            A kernel larger than the signal wraps around (taps are summed modulo the size).

    Example:
        >>> A = Blur(torch.tensor([0.25, 0.5, 0.25]))
        >>> A(torch.eye(5).reshape(5, 1, 5))[1, 0].round(decimals=6).tolist()
        [0.25, 0.5, 0.25, 0.0, 0.0]
    """

    kind = "blur"

    def __init__(self, kernel: torch.Tensor) -> None:
        if not isinstance(kernel, torch.Tensor):
            raise TypeError(f"kernel: expected a torch.Tensor, got {type(kernel).__name__}")
        if kernel.dim() not in (1, 2) or kernel.numel() == 0:
            raise ValueError(f"kernel: expected [k] or [kh, kw], got shape {tuple(kernel.shape)}")
        if not torch.isfinite(kernel).all():
            raise ValueError("kernel: expected finite values, got NaN or inf")
        self._kernel = kernel.detach().to(torch.float64).cpu()
        self._cache: dict = {}

    def kernel(self, ndim: int) -> torch.Tensor:
        """The kernel for signals with ``ndim`` axes (float64, CPU)."""
        if self._kernel.dim() != ndim:
            raise ValueError(
                f"x: a {self._kernel.dim()}-D kernel needs {self._kernel.dim()}-D signals, got {ndim}-D")
        return self._kernel

    def transfer(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``K = rfftn(kernel placed at offsets (j - k//2) mod n)``, ``[*F]`` complex, cached."""
        key = (tuple(shape), torch.device(device), dtype)
        K = self._cache.get(key)
        if K is None:
            k = self.kernel(len(shape))
            grid = torch.zeros(shape, dtype=torch.float64)
            idx = torch.meshgrid(*[(torch.arange(n) - n // 2) % s for n, s in zip(k.shape, shape)], indexing="ij")
            grid.index_put_(idx, k, accumulate=True)
            K = torch.fft.rfftn(grid).to(device=device, dtype=_complex_of(dtype))
            self._cache[key] = K
        return K

    def _fft_dims(self, x: torch.Tensor) -> tuple[int, ...]:
        return tuple(range(-check_signal(x), 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = self._fft_dims(x)
        K = self.transfer(x.shape[2:], x.device, x.dtype)
        return torch.fft.irfftn(K * torch.fft.rfftn(x, dim=dims), s=x.shape[2:], dim=dims).to(x.dtype)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        dims = self._fft_dims(y)
        K = self.transfer(y.shape[2:], y.device, y.dtype)
        return torch.fft.irfftn(K.conj() * torch.fft.rfftn(y, dim=dims), s=y.shape[2:], dim=dims).to(y.dtype)

    def normal_residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``A^H(A x - y)`` with two FFTs of ``x``-sized data and one of ``y``."""
        return self.residual(x, self.prepare(y))[0]

    def prepare(self, y: torch.Tensor) -> Measurement:
        dims = self._fft_dims(y)
        K = self.transfer(y.shape[2:], y.device, y.dtype)
        return Measurement(y, {"K": K, "Y": torch.fft.rfftn(y, dim=dims), "ndim": len(dims)})

    def residual(self, x: torch.Tensor, meas: Measurement) -> tuple[torch.Tensor, torch.Tensor]:
        from ..backends import torch_ops

        return torch_ops.blur_normal_residual(x, meas.extra["K"], meas.extra["Y"], meas.extra["ndim"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kernel={tuple(self._kernel.shape)})"


def gaussian_kernel1d(sigma: float, kernel_size: int) -> torch.Tensor:
    """Normalised samples of ``exp(-j^2 / (2 sigma^2))`` at ``j = -(k//2) .. k - 1 - k//2``."""
    j = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    k = torch.exp(-0.5 * (j / sigma) ** 2)
    return k / k.sum()


class GaussianBlur(Blur):
    """Circular Gaussian blur of width ``sigma`` pixels, 1-D or 2-D (separable) by the input.

    ``kernel_size`` defaults to ``2 * ceil(4 sigma) + 1`` (taps beyond 4 sigma are below 3.4e-4
    of the peak).
    """

    def __init__(self, sigma: float, kernel_size: Optional[int] = None) -> None:
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma: expected a positive float, got {sigma!r}")
        if kernel_size is None:
            kernel_size = 2 * math.ceil(4 * sigma) + 1
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size: expected a positive int, got {kernel_size!r}")
        self.sigma = float(sigma)
        self.kernel_size = kernel_size
        self._k1 = gaussian_kernel1d(self.sigma, kernel_size)
        super().__init__(self._k1)

    def kernel(self, ndim: int) -> torch.Tensor:
        return self._k1 if ndim == 1 else torch.outer(self._k1, self._k1)

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma}, kernel_size={self.kernel_size})"


def motion_kernel(kernel_size: int, intensity: float, seed: int = 0) -> torch.Tensor:
    """A random camera-shake kernel ``[k, k]`` (sum 1): a random trajectory with inertia.

    A particle moves ``4 k`` steps; its velocity follows a random walk whose jitter and
    probability of sudden jerks grow with ``intensity`` in [0, 1] (0: a straight line). The path
    is scaled into the ``k x k`` grid and splatted with bilinear weights.
    """
    g = torch.Generator().manual_seed(seed)
    n = 4 * kernel_size
    angle = float(torch.rand((), generator=g, dtype=torch.float64)) * 2 * math.pi
    v = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
    pos = torch.zeros(n, 2, dtype=torch.float64)
    for t in range(1, n):
        dv = torch.randn(2, generator=g, dtype=torch.float64) * (0.5 * intensity)
        if float(torch.rand((), generator=g)) < 0.05 * intensity:
            dv = dv * 6.0
        v = v + dv - 0.1 * pos[t - 1] * intensity / kernel_size
        v = v / v.norm().clamp_min(1e-12)
        pos[t] = pos[t - 1] + v
    pos = pos - pos.mean(0)
    extent = pos.abs().max().clamp_min(1e-12)
    pos = pos / extent * (kernel_size - 1) / 2 + (kernel_size - 1) / 2
    k = torch.zeros(kernel_size, kernel_size, dtype=torch.float64)
    i0 = pos.floor().long().clamp(0, kernel_size - 1)
    f = pos - i0
    i1 = (i0 + 1).clamp(max=kernel_size - 1)
    for (a, b), wgt in (((i0[:, 0], i0[:, 1]), (1 - f[:, 0]) * (1 - f[:, 1])),
                        ((i1[:, 0], i0[:, 1]), f[:, 0] * (1 - f[:, 1])),
                        ((i0[:, 0], i1[:, 1]), (1 - f[:, 0]) * f[:, 1]),
                        ((i1[:, 0], i1[:, 1]), f[:, 0] * f[:, 1])):
        k.index_put_((a, b), wgt, accumulate=True)
    return k / k.sum()


class MotionBlur(Blur):
    """Circular blur with a seeded random-trajectory (camera shake) kernel, 2-D images only.

    Example:
        >>> A = MotionBlur(kernel_size=9, intensity=0.5, seed=1)
        >>> A(torch.ones(1, 1, 16, 16)).mean().item()  # kernels sum to 1
        1.0
    """

    def __init__(self, kernel_size: int = 61, intensity: float = 0.5, seed: int = 0) -> None:
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size: expected a positive int, got {kernel_size!r}")
        if not 0.0 <= intensity <= 1.0:
            raise ValueError(f"intensity: expected a value in [0, 1], got {intensity!r}")
        self.kernel_size, self.intensity, self.seed = kernel_size, float(intensity), seed
        super().__init__(motion_kernel(kernel_size, intensity, seed))

    def __repr__(self) -> str:
        return f"MotionBlur(kernel_size={self.kernel_size}, intensity={self.intensity}, seed={self.seed})"
