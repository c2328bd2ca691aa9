"""Manifold Constrained Gradients (MCG; Chung, Sim, Ryu, Ye, NeurIPS 2022) on the DPS engine.

MCG is the DPS step (the "manifold constraint": the gradient of the measurement residual through
Tweedie's x0hat) followed by a projection onto the measurement set at the step's noise level. Per
step ``i = K-1 .. 1`` with ``abar' = abar_{i-1}``:

1. ``x' = mu_DDPM(x_i, x0hat) + sigma_i z - zeta/(2 sigma_n^2) grad_{x_i} ||A x0hat - y||^2``
   (or ``zeta grad ||A x0hat - y||``, ``guidance="normalized"``, as MCG's code): exactly
   :class:`~dps_fast.DPS`'s fused step;
2. the measurement noised to the level of ``x_{i-1}``:
   ``y_{i-1} = sqrt(abar') y + sqrt(1 - abar') A z'`` (``z' ~ N(0, I)``, Philox stream 2);
3. ``x_{i-1} = x' - A^+ (A x' - y_{i-1})``, the point of ``{x : A x = y_{i-1}}`` nearest to
   ``x'`` (for ``y_{i-1}`` outside the range of ``A``: ``A^T (A x - y_{i-1}) = 0``).

The sample is ``x0hat(x_1)`` projected onto ``{x : A x = y}`` (``abar' = 1``): hard data
consistency, so MCG's samples carry no spread along the measured directions even when
``sigma_n > 0`` (the posterior does: see the fidelity table). MCG's reference code noises ``y`` to
the level ``t`` of the step's input; this module uses the output's level ``t-1``, as the paper's
algorithm writes ``y_{i-1}``.

In the SVD ``A = U diag(s) V^T`` (:mod:`dps_fast.methods.svd`) the projection replaces the measured
spectral coordinates: ``V^T x_{i-1} = sqrt(abar') U^T y / s + sqrt(1 - abar') V^T z'`` where
``s > 0`` and ``V^T x'`` elsewhere. It is cheap and well conditioned for masks, the identity,
subsampled Fourier measurements, box super-resolution and small matrices; a circular blur's
``1/|K|`` is not, so MCG rejects blurs.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

from typing_extensions import Unpack

from ..backends import Backend, StepOutput, StepProblem
from ..engine import Engine, EngineOptions, Zeta, check_guidance
from ..noise import STREAM_MEASUREMENT, philox_normal
from ..operators import Identity, Inpainting, Matrix, SubsampledFourier, SuperResolution
from ..operators.base import LinearOperator
from ..schedule import Coef, NoiseSchedule
from .base import residual
from .svd import SVDView, measured_spectrum, project, svd_view

__all__ = ["MCG", "MCG_OPERATORS"]

#: Operators with a cheap, well-conditioned projection onto ``{x : A x = y}``.
MCG_OPERATORS = (Identity, Inpainting, SubsampledFourier, SuperResolution, Matrix)


def _view(operator: LinearOperator) -> SVDView:
    return svd_view(operator, "MCG", allowed=MCG_OPERATORS,
                    reason=" (a blur's projection divides by its transfer function, which is near 0 "
                           "at high frequencies: use DPS, PiGDM or DDRM)")


class MCG(Engine):
    """DPS's guided step followed by a projection onto the (noised) measurement set.

    Args: those of :class:`~dps_fast.DPS` (``zeta`` is MCG's step size ``alpha``), except
    ``cuda_graph`` and ``noise``. ``operator`` must be one of :data:`MCG_OPERATORS` (TypeError otherwise).

    Example:
        >>> from dps_fast import NoiseSchedule, operators, priors
        >>> from dps_fast.methods import MCG
        >>> prior = priors.GaussianPrior(torch.zeros(4), torch.eye(4))
        >>> sched = NoiseSchedule.linear(1000).respace(20)
        >>> A = operators.Inpainting(torch.tensor([1.0, 1.0, 0.0, 0.0]))
        >>> mcg = MCG(prior.eps_model(sched), sched, A, zeta=0.01, sigma_n=0.1)
        >>> y = torch.tensor([[[0.5, -0.5, 0.0, 0.0]]])
        >>> res = mcg.sample(y, num_samples=3, seed=0)
        >>> res.samples[0, :, 0, :2]  # on the measurement set
        tensor([[ 0.5000, -0.5000],
                [ 0.5000, -0.5000],
                [ 0.5000, -0.5000]])
    """

    name = "MCG"
    unused_options = ("cuda_graph", "noise")

    def __init__(
        self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
        operator: LinearOperator, zeta: Zeta = 1.0, sigma_n: float = 0.05,
        guidance: Union[str, Sequence[str]] = "squared", **options: Unpack[EngineOptions],
    ) -> None:
        super().__init__(model, schedule, operator, sigma_n=sigma_n, zeta=zeta, **options)
        self.modes = check_guidance(guidance, self.sigma_n, self.noise)
        self.guidance = guidance
        self.view = _view(operator)

    @classmethod
    def check_operator(cls, operator: LinearOperator) -> None:
        _view(operator)

    def guidance_modes(self) -> list[str]:
        return self.modes

    def extra_repr(self) -> str:
        return f"zeta={self.zeta!r}, guidance={self.guidance!r}"

    def setup(self, backend: Backend, p: StepProblem) -> dict:
        return {"ybar": measured_spectrum(self.view, self.operator, p.meas.y)["ybar"]}

    def _project(self, x: torch.Tensor, i: int, state: dict, z: torch.Tensor) -> torch.Tensor:
        """Project ``x`` onto ``{A x = y_{i-1}}``, ``y_{i-1} = sqrt(abar') y + sqrt(1 - abar') A z``."""
        abar = self.schedule.coef(i - 1, Coef.SQRT_ABAR) ** 2 if i > 0 else 1.0
        ybar = state["ybar"]
        if abar < 1.0:
            ybar = math.sqrt(abar) * ybar + math.sqrt(1.0 - abar) * self.view.vt(z)
        return project(self.view, x, ybar)

    def advance(self, backend: Backend, p: StepProblem, x: torch.Tensor, i: int, state: dict,
                noise: Optional[torch.Tensor] = None, final: bool = False,
                noise_y: Optional[torch.Tensor] = None) -> StepOutput:
        if final:
            out = backend.step(p, x, i, final=True)
            x0 = self._project(out.x0hat, 0, state, None)
            return StepOutput(None, x0, residual(p, x0), out.nfe)
        out = backend.step(p, x, i, noise=noise, in_place=True)
        if noise_y is None and i > 0:
            noise_y = philox_normal(p.seeds, x[0].numel(), i, STREAM_MEASUREMENT, x.dtype).view_as(x)
        x.copy_(self._project(x, i, state, noise_y))
        return StepOutput(x, out.x0hat, out.rnorm2, out.nfe)

    def step(self, x_t: torch.Tensor, i: int, y: torch.Tensor, noise: torch.Tensor, num_samples: int = 1,
             noise_y: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One MCG step with explicit noise: returns ``(x_{t-1}, x0hat)`` (``x_t`` not modified).

        ``noise`` is the DPS step's ``z`` and ``noise_y`` the ``z'`` of the noised measurement
        (``[B * num_samples, *x]``); ``noise_y=None`` uses zeros, i.e. the projection onto
        ``{A x = sqrt(abar_{i-1}) y}``.
        """
        p = self.step_problem(x_t, i, y, noise, num_samples)
        backend = self.backend(y.device)
        state = self.setup(backend, p)
        if noise_y is None:
            noise_y = torch.zeros_like(noise)
        elif not isinstance(noise_y, torch.Tensor) or noise_y.shape != noise.shape or noise_y.dtype != noise.dtype:
            raise ValueError(f"noise_y: expected a {noise.dtype} tensor of shape {tuple(noise.shape)}, got "
                             f"{getattr(noise_y, 'dtype', type(noise_y).__name__)} {tuple(getattr(noise_y, 'shape', ()))}")
        x = x_t.detach().clone()
        with p.net.frozen():
            out = self.advance(backend, p, x, i, state, noise=noise, noise_y=noise_y)
        return out.x, out.x0hat
