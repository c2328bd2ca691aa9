"""The DPS sampler: the reverse DDPM chain with a likelihood-guidance step per iteration.

For ``y = A x0 + n``, ``n ~ N(0, sigma_n^2 I)``, each step ``i = K-1 .. 1`` does

1. ``eps = net(x_t, t)``; Tweedie ``x0hat = (x_t - sqrt(1-abar) eps) / sqrt(abar)`` (clamped to
   ``clip_x0`` if given);
2. ``r = A x0hat - y``; ``g = grad_{x_t} ||r||^2``, by ONE input-only VJP of the network with the
   cotangent ``w = A^H r``;
3. ``x_{t-1} = DDPM_step(x_t, x0hat) - zeta/(2 sigma_n^2) g`` ("squared") or
   ``- zeta grad ||r|| = - zeta/(2 ||r||) g`` ("normalized", the original DPS code's step, here
   per sample instead of one norm over the batch).

The result is ``x0hat(x_1)``, the Tweedie estimate of the last step (which therefore needs no VJP:
``nfe = 2K - 1``). The sampler owns no kernel code: a backend answers ``step``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from typing_extensions import Unpack

from .backends import Backend, StepOutput, StepProblem
from .chain import DPSResult
from .divergence import NonFiniteError
from .engine import GUIDANCE, Engine, EngineOptions, Zeta, check_guidance
from .operators.base import Operator
from .schedule import NoiseSchedule

__all__ = ["DPS", "DPSResult", "NonFiniteError", "GUIDANCE"]


class DPS(Engine):
    """Diffusion Posterior Sampling.

    Args:
        model: ``eps(x_t, t)`` callable (an ``nn.Module`` or a function), ``t`` int64 ``[N]`` of
            training-schedule indices; returns ``[N, C, *S]`` or ``[N, 2C, *S]`` (learned variance).
        schedule: the :class:`NoiseSchedule` (possibly respaced) to sample with.
        operator: the forward model ``A`` (:mod:`dps_fast.operators`): any :class:`~dps_fast.operators.Operator`,
            linear or not (wrap your own callable or ``nn.Module`` in ``operators.Differentiable``).
        zeta: guidance scale, a float or one per measurement.
        sigma_n: measurement noise standard deviation, >= 0 (> 0 for "squared" guidance).
        guidance: "squared" (``zeta/(2 sigma_n^2) grad ||r||^2``), "normalized" (``zeta grad ||r||``
            per sample), or a sequence with one mode per measurement.
        **options: the engine's (:class:`~dps_fast.engine.Engine`): ``clip_x0``, ``variance``,
            ``backend``, ``compile``, ``autocast``, ``channels_last``, ``check_every``,
            ``checkpointing``; ``cuda_graph`` captures one guided step as a CUDA graph and replays
            it for every step (CUDA, backend "torch" or "triton"; see :mod:`dps_fast.graphs`).
            ``noise`` is the measurement noise: "gaussian" (``N(0, sigma_n^2 I)``, the default), "poisson"
            (``PoissonNoise()``: the DPS code's Poisson noise at rate 1 on [-1, 1] images) or a
            :class:`~dps_fast.operators.PoissonNoise`. Poisson guidance uses the weighted norm
            ``||y - A x0hat||^2_Lambda``, ``Lambda_jj = gain^2 / (2 max(c_j, 1))`` (the paper's
            ``1 / (2 y_j)`` in counts; see :mod:`dps_fast.operators.poisson`): "squared" steps
            ``zeta grad ||r||^2_Lambda``, "normalized" ``zeta grad ||r||_Lambda``; ``sigma_n`` is
            unused and ``residual_norm`` reports ``||r||_Lambda``.

    Example:
        >>> from dps_fast import DPS, NoiseSchedule, operators, priors
        >>> prior = priors.GaussianPrior(torch.zeros(4), torch.eye(4))
        >>> sched = NoiseSchedule.linear(1000).respace(50)
        >>> A = operators.Matrix(torch.randn(2, 4) / 2)
        >>> dps = DPS(prior.eps_model(sched), sched, A, zeta=0.005, sigma_n=0.1)
        >>> res = dps.sample(torch.zeros(1, 1, 2), num_samples=8, seed=0)
        >>> res.samples.shape
        torch.Size([1, 8, 1, 4])
    """


    name = "DPS"

    def __init__(
        self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
        operator: Operator, zeta: Zeta = 1.0, sigma_n: float = 0.05, guidance: Union[str, Sequence[str]] = "squared",
        **options: Unpack[EngineOptions],
    ) -> None:
        super().__init__(model, schedule, operator, sigma_n=sigma_n, zeta=zeta, **options)
        self.modes = check_guidance(guidance, self.sigma_n, self.noise)
        self.guidance = guidance

    def guidance_modes(self) -> list[str]:
        return self.modes

    def advance(self, backend: Backend, p: StepProblem, x: torch.Tensor, i: int, state: dict,
                noise: Optional[torch.Tensor] = None, final: bool = False) -> StepOutput:
        return backend.step(p, x, i, noise=noise, final=final, in_place=True)

    def stepper(self, backend: Backend, p: StepProblem, x: torch.Tensor) -> Callable[[int], StepOutput]:
        """The chain's step ``i`` on ``x`` in place (a CUDA-graph replay when ``cuda_graph``)."""
        graphed = None
        if self.cuda_graph and self.schedule.num_steps > 1:
            from .graphs import GraphedStep

            graphed = GraphedStep(backend, p, x)

        def step(i: int) -> StepOutput:
            if graphed is not None and i > 0:
                return graphed.replay(i)
            return backend.step(p, x, i, final=(i == 0), in_place=True)

        return step

    def extra_repr(self) -> str:
        return f"zeta={self.zeta!r}, guidance={self.guidance!r}"
