"""Pseudoinverse-guided diffusion (PiGDM; Song, Vahdat, Mardani, Kautz, ICLR 2023) on the DPS engine.

PiGDM approximates ``p(x0 | x_t)`` by ``N(x0hat, r_t^2 I)`` with Tweedie's ``x0hat`` and
``r_t^2 = sigma_t^2 / (1 + sigma_t^2)`` in the paper's variance-exploding notation, i.e.
``r_t^2 = 1 - abar_t`` here (the exact posterior variance under a ``N(0, I)`` prior). Then
``p(y | x_t) ~ N(A x0hat, r_t^2 A A^T + sigma_n^2 I)`` and its score, holding the covariance fixed,
is the vector-Jacobian product

    g = (d x0hat / d x_t)^T h,    h = A^T (r_t^2 A A^T + sigma_n^2 I)^{-1} (y - A x0hat),

which for ``sigma_n = 0`` is ``h = (A^+ y - A^+ A x0hat) / r_t^2``, the paper's pseudo-inverse
guidance with its ``r_t^-2`` weight. With the SVD of ``A`` (:mod:`dps_fast.methods.svd`),
``h = V [s (U^T y - s V^T x0hat) / (r_t^2 s^2 + sigma_n^2)]``: elementwise for masks, in Fourier
space for circular blurs (regularized by ``sigma_n``) and subsampled Fourier data, per block for
box super-resolution, and by an explicit SVD for ``Matrix``.

The guided score ``s + zeta g`` (``zeta = 1``: the paper's estimate) enters the DDPM step through
Tweedie, ``x0hat_y = x0hat + (1 - abar_t) / sqrt(abar_t) zeta g``, so with ``c = COEF_X0 (1 - abar_t)
/ sqrt(abar_t)`` (``COEF_X0 = beta_t sqrt(abar_{t-1}) / (1 - abar_t)``):

    x_{t-1} = COEF_X0 x0hat + COEF_XT x_t + sigma_t z + zeta c g.

With ``variance="fixed_small"`` this is the paper's DDIM update with ``eta = 1`` (DDIM's mean and
variance then equal DDPM's). It is DPS's update with the cotangent ``w = h`` and the per-sample
factor ``gscale = -zeta c / 2`` (DPS subtracts ``2 gscale (d x0hat / d x_t)^T w``), so PiGDM runs the
backend's fused update kernel, its noise stream and ONE input-only VJP per step; the final step
returns ``x0hat(x_1)`` (``nfe = 2K - 1``).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

from ..backends import Backend, StepOutput, StepProblem
from ..divergence import describe_value
from ..operators.base import LinearOperator
from ..profiling import nvtx_range
from ..sampler import DPS
from ..schedule import Coef, NoiseSchedule
from .base import ChainMethod, check_float, ops_of, residual
from .svd import measured_spectrum, regularized_pinv, svd_view

__all__ = ["PiGDM"]


class PiGDM(ChainMethod):
    """Pseudo-inverse guidance with the ``r_t^2 = 1 - abar_t`` weighting and ``sigma_n`` regularization.

    Args:
        model, schedule, operator: as :class:`~dps_fast.DPS`; ``operator`` is one of
            :data:`dps_fast.methods.svd.SUPPORTED` (Identity, Inpainting, circular Blur,
            SuperResolution, SubsampledFourier, Matrix; TypeError otherwise).
        zeta: guidance scale (1 = the paper's likelihood score), a float or one per measurement.
        sigma_n: measurement noise std, >= 0 (0: the noiseless pseudo-inverse form).
        clip_x0: ``None`` or ``(lo, hi)``: clamp x0hat; the VJP respects the clamp as DPS's does.
        variance: the DDPM noise ("fixed_small" = DDIM with eta 1), as :class:`~dps_fast.DPS`.
        rcond: singular values below ``rcond * max(s)`` count as zero (bounds ``A^+`` of a blur
            when ``sigma_n = 0``).
        backend, compile, autocast, channels_last, check_every, checkpointing: as :class:`~dps_fast.DPS`.

    Example:
        >>> from dps_fast import NoiseSchedule, operators, priors
        >>> from dps_fast.methods import PiGDM
        >>> prior = priors.GaussianPrior(torch.zeros(4), torch.eye(4))
        >>> sched = NoiseSchedule.linear(1000).respace(20)
        >>> pigdm = PiGDM(prior.eps_model(sched), sched, operators.Identity(), sigma_n=0.1)
        >>> res = pigdm.sample(torch.ones(1, 1, 4), num_samples=2, seed=0)
        >>> res.samples.shape, res.nfe
        (torch.Size([1, 2, 1, 4]), 39)
    """

    name = "PiGDM"

    def __init__(
        self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
        operator: LinearOperator, zeta: Union[float, Sequence[float], torch.Tensor] = 1.0, sigma_n: float = 0.05,
        clip_x0: Optional[tuple[float, float]] = None, variance: Optional[str] = None, rcond: float = 1e-3,
        backend: str = "auto", compile: Optional[Union[bool, dict]] = None, autocast: Optional[torch.dtype] = None,
        channels_last: Optional[bool] = None, check_every: Optional[int] = None, checkpointing: Optional[bool] = None,
    ) -> None:
        sigma_n = check_float(sigma_n, "sigma_n")
        rcond = check_float(rcond, "rcond", 0.0, 1.0)
        # the engine's guidance mode is unused (PiGDM computes its own gscale); "normalized" only
        # spares sigma_n = 0 the check that "squared" DPS needs
        engine = DPS(model, schedule, operator, zeta=zeta, sigma_n=sigma_n, guidance="normalized", clip_x0=clip_x0,
                     variance=variance, backend=backend, compile=compile, autocast=autocast,
                     channels_last=channels_last, check_every=check_every, checkpointing=checkpointing)
        self.view = svd_view(operator, "PiGDM", rcond=rcond)
        super().__init__(engine)
        self.zeta = zeta
        self.rcond = rcond

    def _hint(self) -> str:
        return f"the guidance is too strong for this problem; try a smaller zeta (now {describe_value(self.zeta)})"

    def _setup(self, backend: Backend, p: StepProblem) -> dict:
        return {"uty": measured_spectrum(self.view, self.operator, p.meas.y)["uty"]}

    def _step(self, backend: Backend, p: StepProblem, x: torch.Tensor, i: int, state: dict,
              noise: Optional[torch.Tensor] = None, final: bool = False) -> StepOutput:
        ops = ops_of(backend)
        coefs = p.table[i]
        with nvtx_range("forward"):
            x_in, out = p.net.forward(x, p.t[i], graph=not final)
        eps_g, v = backend._split(p, out, x)
        eps = eps_g.detach()
        with nvtx_range("operator"):
            x0hat = ops.tweedie(x, eps, coefs, p.clip)
            rnorm2 = residual(p, x0hat)
        if final:
            return StepOutput(None, x0hat, rnorm2, 1)
        abar = self.schedule.coef(i, Coef.SQRT_ABAR) ** 2
        with nvtx_range("operator"):
            h = regularized_pinv(self.view, x0hat, state["uty"], 1.0 - abar, self.sigma_n ** 2)
            w = ops.apply_clip_mask(h, x0hat, p.clip)
        with nvtx_range("vjp"):
            u = p.net.vjp(eps_g, x_in, w)
        c = self.schedule.coef(i, Coef.COEF_X0) * (1.0 - abar) / math.sqrt(abar)
        with nvtx_range("update"):
            x_next = ops.dps_update(x, eps, w, u, p.zeta * (-0.5 * c), coefs, i, p.clip, p.variance,
                                    None if v is None else v.detach(), p.seeds, noise, out=x)
        return StepOutput(x_next, x0hat, rnorm2, 2)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", zeta={self.zeta!r})"
