"""Subsampled Fourier measurements (MRI-style): ``A x = mask * fftn(x, norm="ortho")``."""

from __future__ import annotations

import torch

from .base import LinearOperator, check_signal

__all__ = ["SubsampledFourier"]


class SubsampledFourier(LinearOperator):
    """Unitary FFT over the signal axes followed by a k-space sampling mask; complex output.

    With a complex domain ``A^H y = ifftn(mask * y, norm="ortho")``. With ``real=True`` (the
    default: diffusion states are real) the domain is real and the adjoint for the real inner
    product ``Re <A x, y>`` is the real part of that.

    Args:
        mask: ``[L]`` or ``[H, W]`` sampling pattern (1 = acquired), broadcast over batch/channels.
        real: whether the signals are real.
    """

    def __init__(self, mask: torch.Tensor, real: bool = True) -> None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
        if mask.dim() not in (1, 2):
            raise ValueError(f"mask: expected [L] or [H, W], got shape {tuple(mask.shape)}")
        self.mask = mask.detach().to(torch.float64)
        self.real = real
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _m(self, x: torch.Tensor) -> torch.Tensor:
        """The mask on ``x``'s device in its real dtype, copied there once and cached per
        (device, dtype): a copy per call is a host-to-device transfer per step (a host sync, and
        not capturable in a CUDA graph)."""
        if tuple(x.shape[2:]) != tuple(self.mask.shape):
            raise ValueError(f"x: expected signals of shape {tuple(self.mask.shape)}, got {tuple(x.shape[2:])}")
        key = (x.device, x.real.dtype)
        m = self._cache.get(key)
        if m is None:
            m = self.mask.to(device=x.device, dtype=x.real.dtype)
            self._cache[key] = m
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = check_signal(x)
        return self._m(x) * torch.fft.fftn(x, dim=tuple(range(-nd, 0)), norm="ortho")

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        nd = check_signal(y, "y")
        out = torch.fft.ifftn(self._m(y) * y, dim=tuple(range(-nd, 0)), norm="ortho")
        return out.real if self.real else out

    def output_is_complex(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"SubsampledFourier(mask={tuple(self.mask.shape)}, sampled={self.mask.mean().item():.2f})"
