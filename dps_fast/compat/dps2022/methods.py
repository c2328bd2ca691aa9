"""The DPS code's conditioning formulas (``guided_diffusion/condition_methods.py``), per sample.

Every method gets ``x_prev`` (the state ``x_t``, a leaf with ``requires_grad``), ``x_t`` (the
unconditional sample ``x_{t-1}'`` of the reverse step, built from ``x_prev``), ``x_0_hat`` and the
measurement ``y``, and returns ``(x_{t-1}, distance [B] or None)``:

* ``ps``: ``x_{t-1} = x_t - scale * grad_{x_prev} ||y - A x0hat||`` (Gaussian noise) or
  ``- scale * grad mean_j(||y - A x0hat|| / |y_j|)`` (their Poisson branch);
* ``ps+``: the same with the norm averaged over ``num_sampling`` perturbations
  ``x0hat + 0.05 u_k``, ``u_k ~ U[0, 1)`` (uniform, as their code draws them);
* ``mcg``: the ``ps`` step followed by their projection ``project(x_{t-1}, noisy_y)``;
* ``projection``: ``project(x_t, noisy_y)``; ``vanilla``: ``x_t``.

Their code takes one norm over the whole batch (it only runs with batch size 1); here every norm
is per sample, which is the same formula at batch size 1 and keeps batched images independent.

Example:
    >>> x = torch.ones(1, 1, 3, requires_grad=True)
    >>> out, d = ps_step(x, x.detach() * 2, x * 0.5, torch.zeros(1, 1, 3), lambda v: v, 1.0, "gaussian")
    >>> d.shape
    torch.Size([1])
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

__all__ = ["residual_norms", "guidance_value", "ps_step", "ps_plus_step", "mcg_step", "vanilla_step", "PERTURB_SCALE"]

#: The amplitude of ps+'s perturbations in their code (``x0hat + 0.05 * torch.rand_like(x0hat)``).
PERTURB_SCALE = 0.05

Forward = Callable[[torch.Tensor], torch.Tensor]


def residual_norms(y: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
    """``||y_b - (A x)_b||`` per sample ``[B]`` (``torch.linalg.norm`` of each row's difference)."""
    d = (y - ax).flatten(1)
    return torch.linalg.vector_norm(d, dim=1)


def guidance_value(noise: str, y: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
    """The per-sample quantity whose gradient the ``ps`` step follows: the residual norm
    (gaussian, clean) or their Poisson branch ``mean_j(||y - A x0hat|| / |y_j|)``."""
    norm = residual_norms(y, ax)
    if noise in ("gaussian", "clean"):
        return norm
    if noise == "poisson":
        return (norm[:, None] / y.abs().flatten(1)).mean(1)
    raise ValueError(f"noise: expected 'gaussian', 'poisson' or 'clean', got {noise!r}")


def ps_step(x_prev: torch.Tensor, x_t: torch.Tensor, x_0_hat: torch.Tensor, y: torch.Tensor, forward: Forward,
            scale: float, noise: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Their ``PosteriorSampling.conditioning``: ``x_t - scale * grad_{x_prev} value``."""
    value = guidance_value(noise, y, forward(x_0_hat))
    (grad,) = torch.autograd.grad(value.sum(), x_prev)
    return x_t - grad * scale, value.detach()


def ps_plus_step(x_prev: torch.Tensor, x_t: torch.Tensor, x_0_hat: torch.Tensor, y: torch.Tensor, forward: Forward,
                 scale: float, uniforms: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Their ``PosteriorSamplingPlus.conditioning``: the residual norm averaged over
    ``x0hat + 0.05 u_k`` (``uniforms``: the ``num_sampling`` draws ``u_k``, shaped like x0hat)."""
    k = len(uniforms)
    if k < 1:
        raise ValueError("uniforms: expected num_sampling >= 1 perturbations, got none")
    total: Optional[torch.Tensor] = None
    for u in uniforms:  # their `norm += ...` from 0: the first term is exactly n_1 / k
        term = residual_norms(y, forward(x_0_hat + PERTURB_SCALE * u)) / k
        total = term if total is None else total + term
    (grad,) = torch.autograd.grad(total.sum(), x_prev)  # type: ignore[union-attr]
    return x_t - grad * scale, total.detach()  # type: ignore[union-attr]


def mcg_step(x_prev: torch.Tensor, x_t: torch.Tensor, x_0_hat: torch.Tensor, y: torch.Tensor, noisy_y: torch.Tensor,
             forward: Forward, project: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scale: float,
             noise: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Their ``ManifoldConstraintGradient.conditioning``: the ``ps`` step, then their projection
    onto the (noised) measurement."""
    x, value = ps_step(x_prev, x_t, x_0_hat, y, forward, scale, noise)
    return project(x, noisy_y), value


def vanilla_step(x_t: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Their ``Identity.conditioning``: no conditioning."""
    return x_t, None
