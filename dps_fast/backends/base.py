"""The one interface the sampler calls: ``Backend.step``.

A step is: network forward -> Tweedie + residual (``prep``) -> input-only VJP -> fused update.
:class:`FusedBackend` implements it once over an *op set* (the module ``torch_ops``,
``triton_ops`` or ``cuda_ops``, all with the same signatures); :class:`ReferenceBackend` instead
differentiates the whole step with autograd, as the papers write it, and exists to test the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Optional, Union

import torch

from ..noise import STREAM_STEP, philox_normal
from ..operators.base import Measurement, Operator, weighted_norm2
from ..operators.masks import pixel_terms
from ..profiling import nvtx_range
from ..schedule import Coef
from . import torch_ops

__all__ = ["Backend", "FusedBackend", "ReferenceBackend", "StepProblem", "StepOutput"]


@dataclass
class StepProblem:
    """Everything that stays fixed over the steps of one ``sample`` call (``N = B * S`` rows)."""

    net: "object"                  # dps_fast.models.wrapper.ScoreNetwork
    operator: Operator
    meas: Measurement              # y repeated to [N, *out] (and the weight Lambda of a Poisson likelihood)
    table: torch.Tensor            # [K, Coef.COUNT] on the state's device and dtype
    t: torch.Tensor                # [K, N] int64 network timesteps
    zeta: torch.Tensor             # [N]
    normalized: torch.Tensor       # [N] bool: "normalized" guidance for this row
    inv_two_sigma2: float          # 1 / (2 sigma_n^2) (unused by normalized rows)
    clip: Optional[tuple[float, float]]
    variance: str
    seeds: torch.Tensor            # [N] int64
    channels: int                  # C of the state; the model may return 2C (learned range)

    def gscale(self, rnorm2: torch.Tensor) -> torch.Tensor:
        """Per-row factor of ``g = grad ||r||^2``: ``zeta/(2 sigma^2)`` or ``zeta/(2 ||r||)``."""
        normed = self.zeta * 0.5 * torch.rsqrt(rnorm2.clamp_min(1e-30))
        return torch.where(self.normalized, normed, self.zeta * self.inv_two_sigma2)


@dataclass
class StepOutput:
    x: Optional[torch.Tensor]      # x_{t-1}, None on a final (no-update) step
    x0hat: torch.Tensor
    rnorm2: torch.Tensor           # [N] ||A x0hat - y||^2
    nfe: int


class Backend:
    name = "base"

    def step(self, p: StepProblem, x: torch.Tensor, i: int, noise: Optional[torch.Tensor] = None,
             final: bool = False, in_place: bool = False,
             step: Optional[Union[int, torch.Tensor]] = None) -> StepOutput:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def _split(p: StepProblem, out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        c = p.channels
        if out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:] or out.shape[1] not in (c, 2 * c):
            raise ValueError(
                f"model: expected an output of shape {tuple(x.shape)} (or {2 * c} channels for a "
                f"learned variance), got {tuple(out.shape)}")
        if p.variance == "learned_range":
            if out.shape[1] != 2 * c:
                raise ValueError(f"model: variance='learned_range' needs {2 * c} output channels, got {out.shape[1]}")
            return out[:, :c], out[:, c:]
        return (out[:, :c] if out.shape[1] != c else out), None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FusedBackend(Backend):
    """Forward with a graph, residual outside autograd, ONE input-only VJP, a fused update."""

    def __init__(self, ops: ModuleType, name: str) -> None:
        self.ops = ops
        self.name = name

    def prep(self, p: StepProblem, x: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x0hat, w, rnorm2)`` with ``w`` the clip-masked guidance cotangent
        ``J_A(x0hat)^T Lambda (A(x0hat) - y)`` (``A^H Lambda r`` for a linear ``A``) and
        ``rnorm2 = ||A(x0hat) - y||^2_Lambda``. The operator owns its math: mask operators give
        the (weighted) mask and ``y`` for the fused elementwise pass, blurs run their spectral
        stage on this backend's op set, anything else answers ``residual`` (one VJP of ``A``)."""
        op, clip = p.operator, p.clip
        if op.kind == "mask":
            mask, y = pixel_terms(op, x, p.meas)
            return self.ops.prep_elementwise(x, eps, coefs, clip, y, mask)
        x0hat = self.ops.tweedie(x, eps, coefs, clip)
        if op.kind == "blur":
            w, rnorm2 = op.residual(x0hat, p.meas, ops=self.ops)
        else:
            w, rnorm2 = op.residual(x0hat, p.meas)
        return x0hat, self.ops.apply_clip_mask(w, x0hat, clip), rnorm2

    def step(self, p: StepProblem, x: torch.Tensor, i: int, noise: Optional[torch.Tensor] = None,
             final: bool = False, in_place: bool = False,
             step: Optional[Union[int, torch.Tensor]] = None) -> StepOutput:
        """One guided step at table row ``i``; ``step`` (default ``i``) is the noise counter, an int
        or a one-element int64 device tensor (CUDA-graph replay reads it on the device)."""
        coefs = p.table[i]
        with nvtx_range("forward"):
            x_in, out = p.net.forward(x, p.t[i], graph=not final)
        eps_g, v = self._split(p, out, x)
        eps = eps_g.detach()
        with nvtx_range("operator"):
            x0hat, w, rnorm2 = self.prep(p, x, eps, coefs)
        if final:
            return StepOutput(None, x0hat, rnorm2, 1)
        gscale = p.gscale(rnorm2)
        with nvtx_range("vjp"):
            u = p.net.vjp(eps_g, x_in, w)
        with nvtx_range("update"):
            x_next = self.ops.dps_update(
                x, eps, w, u, gscale, coefs, i if step is None else step, p.clip, p.variance,
                None if v is None else v.detach(), p.seeds, noise, out=x if in_place else None)
        return StepOutput(x_next, x0hat, rnorm2, 2)


class ReferenceBackend(Backend):
    """Autograd through the whole step (network, Tweedie, clamp, operator, norm), as in the papers."""

    name = "reference"

    def step(self, p: StepProblem, x: torch.Tensor, i: int, noise: Optional[torch.Tensor] = None,
             final: bool = False, in_place: bool = False,
             step: Optional[Union[int, torch.Tensor]] = None) -> StepOutput:
        coefs = p.table[i]
        x_in, out = p.net.forward(x, p.t[i], graph=True)
        eps, v = self._split(p, out, x)
        x0 = coefs[Coef.SQRT_RECIP_ABAR] * x_in - coefs[Coef.SQRT_RECIPM1_ABAR] * eps
        if p.clip is not None:
            x0 = x0.clamp(p.clip[0], p.clip[1])
        r = p.operator.forward(x0) - p.meas.y
        rnorm2 = weighted_norm2(r, p.meas.weight)
        x0hat = x0.detach()
        if final:
            return StepOutput(None, x0hat, rnorm2.detach(), 1)
        loss = torch.where(p.normalized, p.zeta * rnorm2.clamp_min(1e-30).sqrt(),
                           p.zeta * p.inv_two_sigma2 * rnorm2).sum()
        (grad,) = torch.autograd.grad(loss, x_in)
        if noise is None:
            noise = philox_normal(p.seeds, x[0].numel(), i if step is None else step, STREAM_STEP, x.dtype).view_as(x)
        sigma = torch_ops.step_sigma(coefs, p.variance, None if v is None else v.detach())
        x_next = coefs[Coef.COEF_X0] * x0hat + coefs[Coef.COEF_XT] * x + sigma * noise - grad
        if in_place:
            x_next = x.copy_(x_next)
        return StepOutput(x_next, x0hat, rnorm2.detach(), 2)
