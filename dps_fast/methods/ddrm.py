"""Denoising Diffusion Restoration Models (DDRM; Kawar, Elad, Ermon, Song, NeurIPS 2022) on the DPS engine.

DDRM works in the spectral coordinates of ``A = U diag(s) V^T`` (:mod:`dps_fast.methods.svd`), in
the variance-exploding scale ``xbar_t = x_t / sqrt(abar_t)`` with noise level
``sigma_t = sqrt((1 - abar_t) / abar_t)``. With ``c = V^T x``, ``ybar = U^T y / s`` (where
``s > 0``), ``c0 = V^T x0hat``, ``e = V^T eps_theta(x_t)`` and fresh noise ``z``, one step
``t -> t' = t-1`` (``sigma' = sigma_{t-1}``, ``sigma_y = sigma_n``) is, per coordinate:

* ``s = 0`` (unmeasured): ``c' = c0 + sqrt(1 - eta^2) sigma' e + eta sigma' z``;
* ``s sigma' <= sigma_y`` (the measurement is noisier than x_{t-1}):
  ``c' = c0 + sqrt(1 - eta^2) sigma' (U^T y - s c0) / sigma_y + eta sigma' z``;
* ``s sigma' > sigma_y``:
  ``c' = eta_b ybar + (1 - eta_b) c0 + sqrt(sigma'^2 - sigma_y^2 eta_b^2 / s^2) z``;

and ``x_{t-1} = sqrt(abar_{t-1}) V c'`` (the paper's eq. 7-8 in the form of its reference code,
which writes ``(xbar_t - x0hat) / sigma_t`` as ``eps_theta``). The chain starts from
``q(x_T | y)``: ``c_T = ybar + sqrt(sigma_T^2 - sigma_y^2 / s^2) z`` where ``s sigma_T > sigma_y``,
else ``sigma_T z``, and ``x_T = sqrt(abar_T) V c_T`` (the reference code divides by ``sigma_T``
instead of multiplying by ``sqrt(abar_T) = 1/sqrt(1 + sigma_T^2)``, equal to 2e-5 at T = 1000).
Each step is one forward pass and no VJP (``nfe = K``); the sample is ``x0hat(x_1)``, which is
also what the update gives at ``sigma' = 0``. With nothing measured (``s = 0`` everywhere) DDRM
is the unconditional DDIM-type sampler ``x_{t-1} = sqrt(abar_{t-1}) x0hat + sqrt(1 - abar_{t-1})
(sqrt(1 - eta^2) eps_theta + eta z)``.

All noise is the Philox stream (``x_T``: stream 1, step ``i``: stream 0, in pixel space, rotated
by ``V^T``), so DDRM samples are reproducible per seed like DPS's.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from typing_extensions import Unpack

from ..backends import Backend, StepOutput, StepProblem
from ..engine import Engine, EngineOptions
from ..noise import STREAM_STEP, philox_normal
from ..operators.base import LinearOperator
from ..profiling import nvtx_range
from ..schedule import Coef, NoiseSchedule
from .base import check_float, residual
from .svd import measured_spectrum, svd_view

__all__ = ["DDRM"]


class DDRM(Engine):
    """DDRM's SVD-space update: no network VJP, few steps (``NoiseSchedule.linear(1000).respace(20)``).

    Args:
        model, schedule, operator: as :class:`~dps_fast.DPS`; ``operator`` is one of
            :data:`dps_fast.methods.svd.SUPPORTED` (TypeError otherwise).
        eta: noise of the unmeasured and noisily measured coordinates, in [0, 1] (paper: 0.85).
        eta_b: weight of the measurement on well-measured coordinates, in [0, 1] (paper: 1).
        sigma_n: measurement noise std ``sigma_y``, >= 0.
        rcond: singular values below ``rcond * max(s)`` count as zero (DDRM's code uses 1e-3).
        **options: the engine's (:class:`~dps_fast.engine.Engine`): ``backend``, ``compile``,
            ``autocast``, ``channels_last``, ``check_every``, ``checkpointing`` (only the network
            forward is used).

    Example:
        >>> from dps_fast import NoiseSchedule, operators, priors
        >>> from dps_fast.methods import DDRM
        >>> prior = priors.GaussianPrior(torch.zeros(4), torch.eye(4))
        >>> sched = NoiseSchedule.linear(1000).respace(20)
        >>> ddrm = DDRM(prior.eps_model(sched), sched, operators.Identity(), sigma_n=0.1)
        >>> res = ddrm.sample(torch.ones(1, 1, 4), num_samples=2, seed=0)
        >>> res.samples.shape, res.nfe
        (torch.Size([1, 2, 1, 4]), 20)
    """

    name = "DDRM"
    unused_options = ("clip_x0", "variance", "cuda_graph", "noise")

    def __init__(
        self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
        operator: LinearOperator, eta: float = 0.85, eta_b: float = 1.0, sigma_n: float = 0.05,
        rcond: float = 1e-3, **options: Unpack[EngineOptions],
    ) -> None:
        self.eta = check_float(eta, "eta", 0.0, 1.0)
        self.eta_b = check_float(eta_b, "eta_b", 0.0, 1.0)
        sigma_n = check_float(sigma_n, "sigma_n")
        rcond = check_float(rcond, "rcond", 0.0, 1.0)
        super().__init__(model, schedule, operator, sigma_n=sigma_n, **options)
        self.view = svd_view(operator, "DDRM", rcond=rcond)
        self.rcond = rcond

    @classmethod
    def check_operator(cls, operator: LinearOperator) -> None:
        svd_view(operator, "DDRM")

    def hint(self) -> str:
        return "the network's eps is not finite here (DDRM has no guidance step to shrink)"

    def _sigma(self, i: int) -> tuple[float, float]:
        """``(sqrt(abar_i), sigma_i)`` of step ``i``; ``i = -1`` is the clean end (1, 0)."""
        if i < 0:
            return 1.0, 0.0
        sa = self.schedule.coef(i, Coef.SQRT_ABAR)
        return sa, math.sqrt(1.0 - sa * sa) / sa

    def setup(self, backend: Backend, p: StepProblem) -> dict:
        return measured_spectrum(self.view, self.operator, p.meas.y)

    def init_state(self, p: StepProblem, x: torch.Tensor, state: dict) -> None:
        sa, sig = self._sigma(self.schedule.num_steps - 1)
        s, s_safe, sy = state["s"], state["s_safe"], self.sigma_n
        e = self.view.vt(x)
        measured = s * sig > sy
        spread = (sig * sig - (sy / s_safe).square()).clamp_min(0.0).sqrt()
        c = torch.where(measured, state["ybar"] + spread * e, sig * e)
        x.copy_(sa * self.view.v(c, tuple(x.shape)))

    def advance(self, backend: Backend, p: StepProblem, x: torch.Tensor, i: int, state: dict,
                noise: Optional[torch.Tensor] = None, final: bool = False) -> StepOutput:
        _, eps, _ = backend.forward(p, x, i, graph=False)
        x0hat = backend.ops.tweedie(x, eps, p.table[i], None)
        rnorm2 = residual(p, x0hat)
        if final:
            return StepOutput(None, x0hat, rnorm2, 1)
        if noise is None:
            noise = philox_normal(p.seeds, x[0].numel(), i, STREAM_STEP, x.dtype).view_as(x)
        sa_next, sig = self._sigma(i - 1)
        eta, eta_b, sy = self.eta, self.eta_b, self.sigma_n
        s, s_safe = state["s"], state["s_safe"]
        with nvtx_range("update"):
            c0, e, z = self.view.vt(x0hat), self.view.vt(eps), self.view.vt(noise)
            missing = c0 + math.sqrt(1.0 - eta * eta) * sig * e + eta * sig * z
            if sy > 0:
                after = c0 + (math.sqrt(1.0 - eta * eta) * sig / sy) * (state["uty"] - s * c0) + eta * sig * z
            else:
                after = missing  # never selected: with sigma_y = 0 every measured coordinate is "before"
            spread = (sig * sig - (sy * eta_b / s_safe).square()).clamp_min(0.0).sqrt()
            before = eta_b * state["ybar"] + (1.0 - eta_b) * c0 + spread * z
            c = torch.where(s > 0, torch.where(s * sig > sy, before, after), missing)
            x.copy_(sa_next * self.view.v(c, tuple(x.shape)))
        return StepOutput(x, x0hat, rnorm2, 1)

    def extra_repr(self) -> str:
        return f"eta={self.eta}, eta_b={self.eta_b}"
