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

With ``variance="fixed_small"`` the unconditional part is DDIM's update with ``eta = 1`` (DDIM's
mean and variance then equal DDPM's). This is ``weighting="score"`` (the default): the likelihood
score fed into the DDPM update, which is the more accurate on the exact problems of the fidelity
table. It is dps_fast's reading of the paper, not the weighting its public code uses.

``weighting="public"`` is the weighting of the public PiGDM implementations (NVlabs RED-diff
``algos/pgdm.py`` with ``awd=True``, and InverseBench): the unconditional update plus

    zeta sqrt(abar_{t-1} abar_t) (d x0hat / d x_t)^T h_pub,
    h_pub = r_t^2 A^T (r_t^2 A A^T + sigma_n^2 I)^{-1} (y - A x0hat) = r_t^2 h,

which is ``sqrt(abar_{t-1} abar_t) J^T A^+ (y - A x0hat)`` for ``sigma_n = 0`` (RED-diff's
``H_pinv(y) - H_pinv(H(x0))``) and their ``(r_t^2 A A^T + sigma_y^2 I)^{-1}`` form with noise, so
their numbers can be reproduced (with ``variance="fixed_small"``, i.e. their ``eta = 1``; their
default ``eta = 0`` deterministic DDIM update is not offered here).

Both are DPS's fused update with the cotangent ``w = h`` and the per-sample factor
``gscale = -zeta c / 2`` (DPS subtracts ``2 gscale (d x0hat / d x_t)^T w``), ``c`` as above
("score") or ``c = sqrt(abar_{t-1} abar_t) r_t^2`` ("public"): PiGDM runs the fused backend's
step through its guidance hook (:data:`dps_fast.backends.Guide`), with the backend's update
kernel, its noise stream and ONE input-only VJP per step; the final step returns ``x0hat(x_1)``
(``nfe = 2K - 1``).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from typing_extensions import Unpack

from ..backends import Backend, StepOutput, StepProblem
from ..divergence import describe_value
from ..engine import Engine, EngineOptions, Zeta
from ..operators.base import LinearOperator
from ..profiling import nvtx_range
from ..schedule import Coef, NoiseSchedule
from .base import check_float, residual
from .svd import measured_spectrum, regularized_pinv, svd_view

__all__ = ["PiGDM", "WEIGHTINGS"]

#: PiGDM's guidance weightings (see the module docstring).
WEIGHTINGS = ("score", "public")


class PiGDM(Engine):
    """Pseudo-inverse guidance with the ``r_t^2 = 1 - abar_t`` weighting and ``sigma_n`` regularization.

    Args:
        model, schedule, operator: as :class:`~dps_fast.DPS`; ``operator`` is one of
            :data:`dps_fast.methods.svd.SUPPORTED` (Identity, Inpainting, circular Blur,
            SuperResolution, SubsampledFourier, Matrix; TypeError otherwise).
        zeta: guidance scale (1 = the likelihood score), a float or one per measurement.
        sigma_n: measurement noise std, >= 0 (0: the noiseless pseudo-inverse form).
        rcond: singular values below ``rcond * max(s)`` count as zero (bounds ``A^+`` of a blur
            when ``sigma_n = 0``).
        weighting: "score" (default: the likelihood score in the DDPM update) or "public" (the
            public implementations' ``sqrt(abar_{t-1} abar_t) J^T A^+ (y - A x0hat)``); see the
            module docstring.
        **options: the engine's (:class:`~dps_fast.engine.Engine`): ``clip_x0`` (the VJP
            respects the clamp as DPS's does), ``variance`` (the DDPM noise; "fixed_small" = DDIM
            with eta 1), ``backend``, ``compile``, ``autocast``, ``channels_last``,
            ``check_every``, ``checkpointing``.

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
    unused_options = ("cuda_graph", "noise")

    def __init__(
        self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
        operator: LinearOperator, zeta: Zeta = 1.0, sigma_n: float = 0.05, rcond: float = 1e-3,
        weighting: str = "score", **options: Unpack[EngineOptions],
    ) -> None:
        sigma_n = check_float(sigma_n, "sigma_n")
        rcond = check_float(rcond, "rcond", 0.0, 1.0)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {weighting!r}")
        super().__init__(model, schedule, operator, sigma_n=sigma_n, zeta=zeta, **options)
        self.view = svd_view(operator, "PiGDM", rcond=rcond)
        self.rcond = rcond
        self.weighting = weighting

    @classmethod
    def check_operator(cls, operator: LinearOperator) -> None:
        svd_view(operator, "PiGDM")

    def hint(self) -> str:
        return f"the guidance is too strong for this problem; try a smaller zeta (now {describe_value(self.zeta)})"

    def setup(self, backend: Backend, p: StepProblem) -> dict:
        return {"uty": measured_spectrum(self.view, self.operator, p.meas.y)["uty"]}

    def weight(self, i: int) -> float:
        """``c`` of step ``i``: the update adds ``zeta c (d x0hat / d x_t)^T h``."""
        abar = self.schedule.coef(i, Coef.SQRT_ABAR) ** 2
        if self.weighting == "public":
            abar_prev = self.schedule.coef(i - 1, Coef.SQRT_ABAR) ** 2 if i > 0 else 1.0
            return math.sqrt(abar_prev * abar) * (1.0 - abar)
        return self.schedule.coef(i, Coef.COEF_X0) * (1.0 - abar) / math.sqrt(abar)

    def advance(self, backend: Backend, p: StepProblem, x: torch.Tensor, i: int, state: dict,
                noise: Optional[torch.Tensor] = None, final: bool = False) -> StepOutput:
        fused = backend.fused()
        ops = fused.ops

        def guide(p: StepProblem, x: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor, i: int,
                  final: bool) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
            with nvtx_range("operator"):
                x0hat = ops.tweedie(x, eps, coefs, p.clip)
                rnorm2 = residual(p, x0hat)
            if final:
                return x0hat, None, rnorm2, None
            abar = self.schedule.coef(i, Coef.SQRT_ABAR) ** 2
            with nvtx_range("operator"):
                h = regularized_pinv(self.view, x0hat, state["uty"], 1.0 - abar, self.sigma_n ** 2)
                w = ops.apply_clip_mask(h, x0hat, p.clip)
            return x0hat, w, rnorm2, p.zeta * (-0.5 * self.weight(i))

        return fused.step(p, x, i, noise=noise, final=final, in_place=True, guide=guide)

    def extra_repr(self) -> str:
        return f"zeta={self.zeta!r}, weighting={self.weighting!r}"
