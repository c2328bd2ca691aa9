"""The baseline: one DPS step exactly as the original DPS code runs it (a baseline, not a feature).

Mirrors ``guided_diffusion/condition_methods.py::PosteriorSampling`` + ``p_sample`` of the DPS
repository as its users run it: weights with ``requires_grad=True`` (so autograd keeps what the
weight gradients would need), autograd through the whole step (network, Tweedie, clamp, operator,
norm), ONE norm over the whole batch, ``clip_denoised`` clamping, and a per-step ``.item()`` of the
distance (a host sync). ADM attention in that code base always recomputes under
``checkpoint(..., True)``; :func:`force_reference_attention` reproduces that on our ADMUNet.
"""

from __future__ import annotations

from typing import Callable

import torch

from dps_fast.schedule import Coef


def force_reference_attention(model: torch.nn.Module) -> None:
    """Make every ADM attention block recompute under activation checkpointing, as guided-diffusion
    hard-codes (``checkpoint(self._forward, (x,), self.parameters(), True)``)."""
    from dps_fast.models.adm import AttentionBlock

    for m in model.modules():
        if isinstance(m, AttentionBlock):
            m.use_checkpoint = True


def original_dps_step(model: Callable, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, A: Callable,
                      coefs: torch.Tensor, zeta: float, noise: torch.Tensor, clip: bool = True) -> tuple[torch.Tensor, float]:
    """One step of the original code: returns ``(x_{t-1}, distance)`` (``distance.item()`` syncs)."""
    c = x.shape[1]
    x = x.detach().requires_grad_(True)
    out = model(x, t)
    eps = out[:, :c]
    x0 = coefs[Coef.SQRT_RECIP_ABAR] * x - coefs[Coef.SQRT_RECIPM1_ABAR] * eps
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = coefs[Coef.COEF_X0] * x0 + coefs[Coef.COEF_XT] * x
    sample = mean + coefs[Coef.SIGMA_SMALL] * noise
    difference = y - A(x0)
    norm = torch.linalg.norm(difference)           # one norm over the whole batch
    norm_grad = torch.autograd.grad(outputs=norm, inputs=x)[0]
    sample = sample - norm_grad * zeta
    return sample.detach(), norm.item()
