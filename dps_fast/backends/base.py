"""The one interface the sampler calls: ``Backend.step``.

A step is: network forward -> Tweedie + residual (``prep``) -> input-only VJP -> fused update.
:class:`FusedBackend` implements it once over an *op set* (the module ``torch_ops``,
``triton_ops`` or ``cuda_ops``, all with the same signatures); :class:`ReferenceBackend` instead
differentiates the whole step with autograd, as the papers write it, and exists to test the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Optional, Union

import torch

from ..noise import STREAM_STEP, philox_normal
from ..operators.base import Measurement, Operator, weighted_norm2
from ..operators.masks import pixel_terms
from ..profiling import nvtx_range
from ..schedule import Coef
from . import torch_ops

__all__ = ["Backend", "FusedBackend", "ReferenceBackend", "StepProblem", "StepOutput", "Guide"]


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


#: A method's guidance for :meth:`FusedBackend.step`: ``guide(p, x, eps, coefs, i, final)`` returns
#: ``(x0hat, w, rnorm2, gscale)``: Tweedie's ``x0hat``, the clip-masked cotangent ``w`` of the
#: network VJP, ``||A x0hat - y||^2`` per row and the per-row factor of the update (the step
#: subtracts ``2 gscale (d x0hat / d x_t)^T w``); ``w`` and ``gscale`` are None when ``final``.
Guide = Callable[[StepProblem, torch.Tensor, torch.Tensor, torch.Tensor, int, bool],
                 tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]]


class Backend:
    name = "base"

    def step(self, p: StepProblem, x: torch.Tensor, i: int, noise: Optional[torch.Tensor] = None,
             final: bool = False, in_place: bool = False,
             step: Optional[Union[int, torch.Tensor]] = None) -> StepOutput:  # pragma: no cover
        raise NotImplementedError

    #: The fused op set whose pure-torch definitions this backend's arithmetic follows.
    ops: ModuleType = torch_ops

    @staticmethod
    def split_output(p: StepProblem, out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(eps, v)`` of the network output ``out`` for the state ``x``: ``v`` holds the variance
        channels of a learned-range model (None otherwise); a wrong shape is a ValueError."""
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

    def forward(self, p: StepProblem, x: torch.Tensor, i: int, graph: bool
                ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The network at step ``i``: ``(x_in, eps, v)``; with ``graph`` ``eps`` carries the graph
        to ``x_in`` for one VJP (``p.net.vjp(eps, x_in, w)``), else it is detached."""
        with nvtx_range("forward"):
            x_in, out = p.net.forward(x, p.t[i], graph=graph)
        eps, v = self.split_output(p, out, x)
        return x_in, eps, v

    def fused(self) -> "FusedBackend":
        """The fused step of this backend's op set (for a method's :data:`Guide`): itself for a
        :class:`FusedBackend`, the ``torch`` op set's for the autograd reference."""
        return FusedBackend(torch_ops, "torch")

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

    def fused(self) -> "FusedBackend":
        return self

    def dps_guide(self, p: StepProblem, x: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor, i: int,
                  final: bool) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        """DPS's :data:`Guide`: :meth:`prep` and ``p.gscale`` (the likelihood ``||A x0hat - y||^2``)."""
        with nvtx_range("operator"):
            x0hat, w, rnorm2 = self.prep(p, x, eps, coefs)
        if final:
            return x0hat, None, rnorm2, None
        return x0hat, w, rnorm2, p.gscale(rnorm2)

    def step(self, p: StepProblem, x: torch.Tensor, i: int, noise: Optional[torch.Tensor] = None,
             final: bool = False, in_place: bool = False,
             step: Optional[Union[int, torch.Tensor]] = None, guide: Optional[Guide] = None) -> StepOutput:
        """One guided step at table row ``i``; ``step`` (default ``i``) is the noise counter, an int
        or a one-element int64 device tensor (CUDA-graph replay reads it on the device).

        ``guide`` (default :meth:`dps_guide`) supplies the cotangent and the update's factor: the
        hook through which another likelihood approximation (PiGDM) runs this same step, its one
        VJP and its fused update."""
        coefs = p.table[i]
        x_in, eps_g, v = self.forward(p, x, i, graph=not final)
        eps = eps_g.detach()
        x0hat, w, rnorm2, gscale = (guide or self.dps_guide)(p, x, eps, coefs, i, final)
        if final:
            return StepOutput(None, x0hat, rnorm2, 1)
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
        x_in, eps, v = self.forward(p, x, i, graph=True)
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
