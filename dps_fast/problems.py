"""Inverse problems with exact posteriors that the commands share: the demo's 1-D deblurring
problem (``dps-fast demo``, ``dps-fast explore`` and the ``demo-deblur`` row of ``dps-fast
fidelity`` all run it), kept here so that no command imports another command's module.

A two-component Gaussian-mixture prior on signals of length 64 (smooth bumps around two
different mean shapes), a circular Gaussian blur of width 3 px and measurement noise
``sigma_n^2 = 0.01``.

Example:
    >>> p = demo_problem()
    >>> p.x0.shape, p.y.shape, p.sigma_n
    (torch.Size([1, 1, 64]), torch.Size([1, 1, 64]), 0.1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .operators import GaussianBlur
from .priors import GaussianMixturePrior

__all__ = ["DemoProblem", "demo_problem"]


@dataclass
class DemoProblem:
    prior: GaussianMixturePrior
    operator: GaussianBlur
    x0: torch.Tensor          # [1, 1, d] truth
    y: torch.Tensor           # [1, 1, d] measurement
    sigma_n: float
    A: torch.Tensor           # [d, d] dense blur matrix (for the exact posterior)


def demo_problem(d: int = 64, sigma_b: float = 3.0, sigma_n: float = 0.1, seed: int = 0) -> DemoProblem:
    """The demo's prior, operator, truth and measurement (float64, deterministic in ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.arange(d, dtype=torch.float64)
    dist = (s[:, None] - s[None, :]).abs()
    dist = torch.minimum(dist, d - dist)  # periodic, like the circular blur
    cov = 0.25 * torch.exp(-0.5 * (dist / 3.0) ** 2) + 1e-3 * torch.eye(d, dtype=torch.float64)
    bump = torch.exp(-0.5 * ((s - d / 3) / 5.0) ** 2)
    step = torch.where((s > d / 2) & (s < 0.8 * d), 0.8, -0.2).to(torch.float64)
    prior = GaussianMixturePrior(torch.tensor([0.5, 0.5], dtype=torch.float64),
                                 torch.stack([bump, step]), torch.stack([cov, cov]))
    op = GaussianBlur(sigma_b)
    x0 = prior.sample(1, generator=g)
    A = op.as_matrix((1, d))
    y = op(x0) + sigma_n * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return DemoProblem(prior, op, x0, y, sigma_n, A)
