"""Super-resolution: average pooling by an integer factor, with its exact adjoint."""

from __future__ import annotations

import torch

from .base import LinearOperator, check_signal

__all__ = ["SuperResolution"]


class SuperResolution(LinearOperator):
    """``A x`` = mean over non-overlapping ``factor`` blocks (per axis, 1-D or 2-D).

    ``A^H y`` spreads each value over its block divided by the block size, so
    ``<A x, y> = <x, A^H y>`` exactly. Signal sizes must be divisible by ``factor``.

    Example:
        >>> SuperResolution(2)(torch.arange(4.).reshape(1, 1, 4)).tolist()
        [[[0.5, 2.5]]]
    """

    def __init__(self, factor: int) -> None:
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor: expected a positive int, got {factor!r}")
        self.factor = factor

    def _check(self, x: torch.Tensor, name: str) -> int:
        nd = check_signal(x, name)
        bad = [s for s in x.shape[2:] if s % self.factor] if name == "x" else []
        if bad:
            raise ValueError(f"x: signal sizes must be divisible by factor={self.factor}, got {tuple(x.shape[2:])}")
        return nd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = self._check(x, "x")
        f = self.factor
        shape = list(x.shape[:2])
        for s in x.shape[2:]:
            shape += [s // f, f]
        return x.reshape(shape).mean(dim=tuple(range(3, 3 + 2 * nd, 2)))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        nd = self._check(y, "y")
        out = y / self.factor**nd
        for ax in range(2, 2 + nd):
            out = out.repeat_interleave(self.factor, dim=ax)
        return out

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(input_shape[:2]) + tuple(s // self.factor for s in input_shape[2:])

    def input_shape(self, output_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(output_shape[:2]) + tuple(s * self.factor for s in output_shape[2:])

    def __repr__(self) -> str:
        return f"SuperResolution(factor={self.factor})"
