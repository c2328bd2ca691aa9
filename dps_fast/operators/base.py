"""The operator interface: ``A(x)``, ``A.adjoint(y)``, ``A.normal_residual(x, y)``.

Every operator acts on batched tensors ``[B, C, L]`` (1-D signals) or ``[B, C, H, W]`` (images).
Backends may fuse an operator's work into their kernels; they recognise it by ``kind``:

* ``"mask"``: ``A = diag(m)`` in pixel space (``pixel_mask(x)`` gives ``m`` or None for identity);
* ``"blur"``: a circular convolution with transfer function ``transfer(shape, ...)``;
* ``"generic"``: anything else, through :meth:`LinearOperator.residual`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["LinearOperator", "Measurement", "check_signal", "residual_norm2"]


def check_signal(x: torch.Tensor, name: str = "x") -> int:
    """Validate a ``[B, C, L]`` or ``[B, C, H, W]`` tensor; return its number of signal axes."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(f"{name}: expected [B, C, L] or [B, C, H, W], got shape {tuple(x.shape)}")
    return x.dim() - 2


def residual_norm2(r: torch.Tensor) -> torch.Tensor:
    """``||r_n||^2`` per sample ``[N]`` of a real or complex residual ``[N, ...]``."""
    return (r.abs().square() if r.is_complex() else r.square()).flatten(1).sum(1)


@dataclass
class Measurement:
    """A measurement ``y`` ``[N, *out]`` prepared for repeated residual evaluations.

    ``extra`` holds what the operator precomputes once per measurement (e.g. ``rfftn(y)``).
    """

    y: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)


class LinearOperator:
    """Base class of the forward models ``y = A x + n``."""

    kind: str = "generic"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``A(x)`` for ``x`` of shape ``input_shape`` (batch axis included)."""
        return tuple(input_shape)

    def input_shape(self, output_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``x`` whose ``A(x)`` has ``output_shape`` (the sampler's state shape)."""
        return tuple(output_shape)

    def output_is_complex(self) -> bool:
        return False

    def normal_residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``A^H (A x - y)``, shaped like ``x``."""
        return self.adjoint(self.forward(x) - y)

    # ---- what the sampler uses ------------------------------------------------------------
    def prepare(self, y: torch.Tensor) -> Measurement:
        """Precompute what every residual evaluation for this ``y`` needs (once per run)."""
        return Measurement(y)

    def residual(self, x: torch.Tensor, meas: Measurement) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A^H(A x - y), ||A x - y||^2 per sample [N])``; operators override to fuse."""
        r = self.forward(x) - meas.y
        return self.adjoint(r), residual_norm2(r)

    def as_matrix(self, sample_shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense matrix ``[m, d]`` of ``A`` on one sample of shape ``sample_shape`` ([C, *S])."""
        d = 1
        for s in sample_shape:
            d *= s
        eye = torch.eye(d, dtype=dtype).reshape((d,) + tuple(sample_shape))
        return self.forward(eye).reshape(d, -1).transpose(0, 1).contiguous()
