"""A dense matrix operator, for small problems and tests."""

from __future__ import annotations

import torch

from .base import LinearOperator

__all__ = ["Matrix"]


class Matrix(LinearOperator):
    """``A x = x @ A^T`` on ``[B, C, d]`` tensors, with ``A`` a dense ``[m, d]`` matrix.

    Example:
        >>> A = Matrix(torch.ones(2, 3))
        >>> A(torch.ones(1, 1, 3)).tolist()
        [[[3.0, 3.0]]]
    """

    def __init__(self, A: torch.Tensor) -> None:
        if not isinstance(A, torch.Tensor):
            raise TypeError(f"A: expected a torch.Tensor, got {type(A).__name__}")
        if A.dim() != 2:
            raise ValueError(f"A: expected a matrix [m, d], got shape {tuple(A.shape)}")
        self.A = A.detach()
        self._cache: dict = {}

    def _mat(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        m = self._cache.get(key)
        if m is None:
            m = self.A.to(device=x.device, dtype=x.dtype if x.is_complex() or not self.A.is_complex() else self.A.dtype)
            self._cache[key] = m
        return m

    def _check(self, x: torch.Tensor, size: int, name: str) -> None:
        if x.dim() != 3 or x.shape[-1] != size:
            raise ValueError(f"{name}: expected [B, C, {size}], got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x, self.A.shape[1], "x")
        return x @ self._mat(x).transpose(0, 1)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self._check(y, self.A.shape[0], "y")
        return y @ self._mat(y).conj()

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(input_shape[:-1]) + (self.A.shape[0],)

    def input_shape(self, output_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(output_shape[:-1]) + (self.A.shape[1],)

    def output_is_complex(self) -> bool:
        return self.A.is_complex()

    def __repr__(self) -> str:
        return f"Matrix({tuple(self.A.shape)})"
