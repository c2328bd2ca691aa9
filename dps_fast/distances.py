"""Distances between point clouds: the sliced Wasserstein-2 distance that the demo, ``explore`` and
``fidelity`` all score samples with (one definition, so their numbers are comparable).

Example:
    >>> x = torch.randn(500, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> round(sliced_w2(x, x + 0.5), 6), round(sliced_w2(x, x[:250]), 2)  # in 1-D a shift by 0.5 is 0.5
    (0.5, 0.06)
"""

from __future__ import annotations

import torch

__all__ = ["SlicedReference", "sliced_w2"]

F64 = torch.float64


def _check_cloud(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or len(x) < 1:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a point cloud [n, d] with n >= 1, got {got}")


class SlicedReference:
    """A point cloud ``points [m, d]`` with its projections on ``n_dirs`` seeded random unit
    directions, sorted once: comparing many clouds with one large reference (20000 x 256
    projections take ~1 s to sort) sorts it only here."""

    def __init__(self, points: torch.Tensor, n_dirs: int = 256, seed: int = 0) -> None:
        _check_cloud("b", points)
        if not (isinstance(n_dirs, int) and n_dirs >= 1):
            raise ValueError(f"n_dirs: expected an int >= 1, got {n_dirs!r}")
        g = torch.Generator().manual_seed(seed)
        dirs = torch.randn(points.shape[1], n_dirs, generator=g, dtype=F64)
        self.dirs = dirs / dirs.norm(dim=0, keepdim=True)  # [d, n_dirs]
        self.sorted = self.project(points)

    @property
    def dim(self) -> int:
        return int(self.dirs.shape[0])

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``[n_dirs, n]`` sorted projections of ``x [n, d]``."""
        return (self.dirs.T @ x.detach().to("cpu", F64).T).sort(1).values


def sliced_w2(a: torch.Tensor, b: "torch.Tensor | SlicedReference", n_dirs: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between point clouds ``a [n, d]`` and ``b [m, d]`` (or its
    :class:`SlicedReference`): the root mean over ``n_dirs`` seeded random unit directions of the
    1-D ``W_2^2`` of the projections. Equal sizes: sorted matching; otherwise ``a``'s sorted
    projections against ``b``'s quantiles at levels ``(k + 1/2) / n`` (linear interpolation)."""
    _check_cloud("a", a)
    ref = b if isinstance(b, SlicedReference) else SlicedReference(b, n_dirs, seed)
    if a.shape[1] != ref.dim:
        got = tuple(b.shape) if isinstance(b, torch.Tensor) else f"a reference of dimension {ref.dim}"
        raise ValueError(f"a, b: expected point clouds [n, d] and [m, d] of the same d, got {tuple(a.shape)} and {got}")
    pa, pb = ref.project(a), ref.sorted
    n, m = pa.shape[1], pb.shape[1]
    if m != n:
        pos = (torch.arange(n, dtype=F64) + 0.5) / n * (m - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=m - 1)
        frac = pos - lo
        pb = pb[:, lo] * (1 - frac) + pb[:, hi] * frac
    return float((pa - pb).square().mean().sqrt())
