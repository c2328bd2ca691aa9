"""Super-resolution: downsampling by an integer factor with a box or an antialiased bicubic filter.

* ``filter="box"``: the mean over non-overlapping ``factor`` blocks; ``A^H`` spreads each value
  over its block divided by the block size.
* ``filter="bicubic"``: MATLAB ``imresize(x, 1/factor)`` (bicubic, ``antialiasing`` on), the
  kernel of the original DPS code's resizer (DPS2022 ``util/resizer.py``, Shocher's ``Resizer``
  with ``kernel=None``). Per axis, output pixel ``i = 1..n/s`` (1-based, ``s = factor``) sits at
  input coordinate ``u = i s + (1 - s) / 2``; it takes the ``ceil(4 s) + 2`` input pixels
  ``j = floor(u - 2 s) + 0, 1, ...`` with weights ``cubic((u - j) / s) / s`` (Keys' cubic,
  ``a = -0.5``, stretched by ``s``: the antialiasing), normalised to sum 1; indices outside
  ``1..n`` are mirrored half-sample-symmetrically (``0 -> 1``, ``n + 1 -> n``). Each axis is a
  sparse ``[n/s, n]`` matrix ``M``; ``A x = M_h x M_w^T`` and the exact adjoint is
  ``A^H y = M_h^T y M_w`` (two small GEMMs per axis).

Relation to the DPS code: ``SuperResolution(s, filter="bicubic")`` equals DPS2022's
``SuperResolutionOperator(in_shape, s).forward`` (which computes in float32); its ``transpose``
is nearest-neighbour upsampling (``F.interpolate``), not the adjoint used here. Signal sizes must
be divisible by ``factor`` (the DPS resizer would shift a non-divisible grid; this operator
refuses it with an error).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import LinearOperator, check_signal

__all__ = ["SuperResolution", "FILTERS", "bicubic_matrix"]

FILTERS = ("box", "bicubic")


def _cubic(t: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with ``a = -0.5`` (MATLAB's ``cubic``)."""
    a = t.abs()
    a2, a3 = a * a, a * a * a
    return torch.where(a <= 1, 1.5 * a3 - 2.5 * a2 + 1,
                       torch.where(a <= 2, -0.5 * a3 + 2.5 * a2 - 4 * a + 2, torch.zeros_like(a)))


def bicubic_matrix(n: int, factor: int) -> torch.Tensor:
    """The ``[n // factor, n]`` float64 matrix of MATLAB's antialiased bicubic downsampling along one axis.

    Example:
        >>> M = bicubic_matrix(8, 2)
        >>> M.shape, bool(torch.allclose(M.sum(1), torch.ones(4, dtype=torch.float64)))
        (torch.Size([4, 8]), True)
    """
    s = float(factor)
    m = n // factor
    u = torch.arange(1, m + 1, dtype=torch.float64) * s + 0.5 * (1 - s)
    width = 4.0 * s
    taps = int(math.ceil(width)) + 2
    ind = torch.floor(u - width / 2)[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]  # 1-based
    w = _cubic((u[:, None] - ind) / s) / s
    w = w / w.sum(1, keepdim=True)
    mirror = torch.cat([torch.arange(n), torch.arange(n - 1, -1, -1)])
    col = mirror[torch.remainder(ind.long() - 1, 2 * n)]
    rows = torch.arange(m)[:, None].expand_as(col)
    M = torch.zeros(m, n, dtype=torch.float64)
    M.index_put_((rows.reshape(-1), col.reshape(-1)), w.reshape(-1), accumulate=True)
    return M


class SuperResolution(LinearOperator):
    """Downsampling by ``factor`` per signal axis (1-D or 2-D) with the exact adjoint.

    Args:
        factor: positive integer; signal sizes must be divisible by it.
        filter: ``"box"`` (block mean, the default) or ``"bicubic"`` (MATLAB/DPS antialiased bicubic).

    Example:
        >>> SuperResolution(2)(torch.arange(4.).reshape(1, 1, 4)).tolist()
        [[[0.5, 2.5]]]
        >>> SuperResolution(2, filter="bicubic")(torch.ones(1, 1, 8, 8)).shape
        torch.Size([1, 1, 4, 4])
    """

    def __init__(self, factor: int, filter: str = "box") -> None:
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor: expected a positive int, got {factor!r}")
        if filter not in FILTERS:
            raise ValueError(f"filter: expected one of {FILTERS}, got {filter!r}")
        self.factor = factor
        self.filter = filter
        self._cache: dict = {}

    def _check(self, x: torch.Tensor, name: str) -> int:
        nd = check_signal(x, name)
        bad = [s for s in x.shape[2:] if s % self.factor] if name == "x" else []
        if bad:
            raise ValueError(f"x: signal sizes must be divisible by factor={self.factor}, got {tuple(x.shape[2:])} "
                             f"(a measurement y of shape {tuple(x.shape[2:])} // {self.factor} would not be "
                             f"an exact downsampling)")
        return nd

    def matrix(self, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The bicubic ``[n // factor, n]`` matrix of one axis on ``device``/``dtype`` (cached)."""
        key = (n, torch.device(device), dtype)
        M = self._cache.get(key)
        if M is None:
            M = bicubic_matrix(n, self.factor).to(device=device, dtype=dtype)
            self._cache[key] = M
        return M

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = self._check(x, "x")
        f = self.factor
        if self.filter == "bicubic":
            out = x @ self.matrix(x.shape[-1], x.device, x.dtype).T
            if nd == 2:
                out = self.matrix(x.shape[-2], x.device, x.dtype) @ out
            return out
        shape = list(x.shape[:2])
        for s in x.shape[2:]:
            shape += [s // f, f]
        return x.reshape(shape).mean(dim=tuple(range(3, 3 + 2 * nd, 2)))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        nd = self._check(y, "y")
        if self.filter == "bicubic":
            f = self.factor
            out = y @ self.matrix(y.shape[-1] * f, y.device, y.dtype)
            if nd == 2:
                out = self.matrix(y.shape[-2] * f, y.device, y.dtype).T @ out
            return out
        out = y / self.factor**nd
        for ax in range(2, 2 + nd):
            out = out.repeat_interleave(self.factor, dim=ax)
        return out

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(input_shape[:2]) + tuple(s // self.factor for s in input_shape[2:])

    def input_shape(self, output_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(output_shape[:2]) + tuple(s * self.factor for s in output_shape[2:])

    def describe(self) -> dict[str, Any]:
        return {"filter": self.filter}

    def __repr__(self) -> str:
        f = "" if self.filter == "box" else f", filter={self.filter!r}"
        return f"SuperResolution(factor={self.factor}{f})"
