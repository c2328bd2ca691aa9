"""Pixel-mask operators: ``Identity`` (denoising) and ``Inpainting``.

Both are ``A = diag(m)`` and take the backends' fused path (``kind = "mask"``): Tweedie, the
residual, ``w = m (m x0hat - y)`` and ``||m x0hat - y||^2`` in one pass. A weighted measurement
(Poisson, ``Lambda``) stays on that path: with ``m' = m sqrt(Lambda)`` and ``y' = sqrt(Lambda) y``
the same pass gives ``w = m Lambda (m x0hat - y)`` and ``||m x0hat - y||^2_Lambda`` exactly
(:func:`pixel_terms`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .base import LinearOperator, Measurement, check_signal

__all__ = ["Identity", "Inpainting", "pixel_terms"]


def pixel_terms(op: LinearOperator, x: torch.Tensor, meas: Measurement
                ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """``(mask, y)`` for the fused path of any ``kind = "mask"`` operator (its ``pixel_mask(x)``
    gives ``m``, or None for the identity): ``(m, y)``, or with a weight ``Lambda``
    ``(m sqrt(Lambda), sqrt(Lambda) y)`` (``[N, *S]``, computed once per measurement and dtype)."""
    if meas.weight is None:
        return op.pixel_mask(x), meas.y
    key = ("pixel_terms", x.device, x.dtype)
    terms = meas.extra.get(key)
    if terms is None:
        s = meas.weight.sqrt().to(x.dtype)
        m = op.pixel_mask(x)
        terms = (s if m is None else s * m, s * meas.y.to(x.dtype))
        meas.extra[key] = terms
    return terms


class Identity(LinearOperator):
    """``A = I``: denoising. ``A^H = I``.

    Example:
        >>> Identity()(torch.ones(1, 1, 3)).tolist()
        [[[1.0, 1.0, 1.0]]]
    """

    kind = "mask"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_signal(x)
        return x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def pixel_mask(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def __repr__(self) -> str:
        return "Identity()"


class Inpainting(LinearOperator):
    """``A x = m * x`` with a fixed binary (or weighted) mask ``m``: missing pixels read as 0.

    Args:
        mask: ``[*S]`` or ``[C, *S]`` (1 where observed), broadcast over the batch.

    Example:
        >>> A = Inpainting.box((32, 32), box=(8, 8))
        >>> A(torch.ones(1, 3, 32, 32)).sum().item()
        2880.0
    """

    kind = "mask"

    def __init__(self, mask: torch.Tensor) -> None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
        if mask.dim() < 1 or mask.dim() > 3:
            raise ValueError(f"mask: expected [L], [H, W] or [C, *S], got shape {tuple(mask.shape)}")
        self.mask = mask.detach().to(torch.float64)
        self._cache: dict = {}

    @classmethod
    def box(cls, shape: Sequence[int], box: Sequence[int], top_left: Optional[Sequence[int]] = None) -> "Inpainting":
        """Mask out one box of size ``box`` (centred unless ``top_left`` is given)."""
        shape, box = tuple(shape), tuple(box)
        if len(shape) != len(box):
            hint = (f"; for one box shared by the channels pass shape={shape[-len(box):]}"
                    if 0 < len(box) < len(shape) else "")
            raise ValueError(f"box: expected one size per axis of shape {shape} ({len(shape)} sizes), got {len(box)}: "
                             f"{box}{hint}")
        if any(b > s or b < 0 for b, s in zip(box, shape)):
            raise ValueError(f"box: expected a size within the image {shape}, got {box}")
        if top_left is not None and len(tuple(top_left)) != len(shape):
            raise ValueError(f"top_left: expected one index per axis of shape {shape} ({len(shape)} indices), "
                             f"got {tuple(top_left)}")
        start = tuple(top_left) if top_left is not None else tuple((s - b) // 2 for s, b in zip(shape, box))
        m = torch.ones(shape, dtype=torch.float64)
        m[tuple(slice(a, a + b) for a, b in zip(start, box))] = 0.0
        return cls(m)

    @classmethod
    def random(cls, shape: Sequence[int], missing: float, seed: int = 0) -> "Inpainting":
        """Drop each pixel independently with probability ``missing`` (seeded, shared by channels)."""
        if not 0.0 <= missing < 1.0:
            raise ValueError(f"missing: expected a fraction in [0, 1), got {missing}")
        g = torch.Generator().manual_seed(seed)
        return cls((torch.rand(tuple(shape), generator=g, dtype=torch.float64) >= missing).to(torch.float64))

    def pixel_mask(self, x: torch.Tensor) -> torch.Tensor:
        """The mask on ``x``'s device and dtype, shaped to broadcast against one sample."""
        key = (x.device, x.dtype)
        m = self._cache.get(key)
        if m is None:
            m = self.mask.to(device=x.device, dtype=x.dtype)
            self._cache[key] = m
        sample = x.shape[1:]
        if m.shape != sample[-m.dim():] and m.shape != sample:
            raise ValueError(f"x: mask of shape {tuple(m.shape)} does not fit samples of shape {tuple(sample)}")
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_signal(x)
        return x * self.pixel_mask(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.pixel_mask(y)

    def __repr__(self) -> str:
        return f"Inpainting(mask={tuple(self.mask.shape)}, observed={self.mask.mean().item():.2f})"
