"""A single Gaussian prior ``N(mean, cov)``: a one-component :class:`GaussianMixturePrior`.

Its exact ``eps`` is ``sqrt(1 - abar) C_t^{-1} (x_t - sqrt(abar) mean)`` with
``C_t = abar cov + (1 - abar) I``, and its posterior under ``y = A x0 + N(0, s^2 I)`` is the
Gaussian ``N(m, (cov^{-1} + A^T A / s^2)^{-1})`` (returned as a one-component :class:`Posterior`).
"""

from __future__ import annotations

from typing import Any

import torch

from .mixture import GaussianMixturePrior, as_real_tensor

__all__ = ["GaussianPrior"]


class GaussianPrior(GaussianMixturePrior):
    """``p(x0) = N(mean, cov)`` on ``R^d``, stored in float64 on the CPU.

    Args:
        mean: ``[d]``.
        cov: ``[d, d]`` symmetric positive definite.

    Example:
        >>> p = GaussianPrior(torch.zeros(4), 2.0 * torch.eye(4))
        >>> p.sample(3).shape
        torch.Size([3, 1, 4])
    """

    def __init__(self, mean: Any, cov: Any) -> None:
        mu = as_real_tensor(mean, "mean")
        cv = as_real_tensor(cov, "cov")
        if mu.dim() != 1 or mu.numel() < 1:
            raise ValueError(f"mean: expected shape [d] with d >= 1, got {tuple(mu.shape)}")
        d = mu.numel()
        if cv.shape != (d, d):
            raise ValueError(f"cov: expected shape [d={d}, d={d}], got {tuple(cv.shape)}")
        try:
            super().__init__(torch.ones(1, dtype=torch.float64), mu.unsqueeze(0), cv.unsqueeze(0))
        except ValueError as exc:  # name the argument the caller passed, not the mixture's
            raise ValueError(str(exc).replace("covs:", "cov:", 1).replace(", got component 0", ", got")) from None

    @property
    def mean(self) -> torch.Tensor:
        """``[d]`` float64."""
        return self.means[0]

    @property
    def cov(self) -> torch.Tensor:
        """``[d, d]`` float64 (symmetrised)."""
        return self.covs[0]

    def __repr__(self) -> str:
        return f"GaussianPrior(dim={self.dim})"
