"""The reverse chain every sampling method runs, in one place.

:func:`run_chain` is the loop of :meth:`dps_fast.engine.Engine.sample`, which DPS and the other
likelihood approximations (:mod:`dps_fast.methods`) share: the record/step validation, the per-sample seeds and ``x_T`` (through the sampler's
``prepare``), the step loop with its progress bar, trajectory, callback and non-finite checks,
and the :class:`DPSResult`. A method only supplies a *stepper*: a function that, given the
backend, the :class:`~dps_fast.backends.StepProblem` and the state ``x`` (updated in place),
returns ``step(i) -> StepOutput`` for ``i = K-1 .. 0`` (``i = 0`` is the final, update-free step
whose ``x0hat`` is the sample).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Protocol, Union

import torch

from .backends import Backend, StepOutput, StepProblem
from .divergence import RUNAWAY_FACTOR, DivergenceGuard, NonFiniteError
from .schedule import NoiseSchedule

__all__ = ["DPSResult", "NonFiniteError", "run_chain", "Stepper"]

#: ``stepper(backend, problem, x) -> step``; ``step(i)`` performs chain step ``i`` on ``x`` in place.
Stepper = Callable[[Backend, StepProblem, torch.Tensor], Callable[[int], StepOutput]]


@dataclass
class DPSResult:
    """What :meth:`DPS.sample` returns. ``B`` measurements, ``S`` posterior samples each.

    Attributes:
        samples: ``[B, S, *x]`` posterior samples ``x0hat(x_1)``.
        mean, std: ``[B, *x]`` mean and standard deviation over the S samples (std 0 for S = 1).
        trajectory: ``{i: [B, S, *x]}`` x0hat at the steps listed in ``record``.
        nfe: network evaluations per sample chain (forward passes + VJPs).
        residual_norm: ``[B, S]`` final ``||A x0hat - y||``.
        seeds: ``[B, S]`` int64 seeds (pass them back as ``seeds=`` to reproduce a sample).
        stopped_at: the step at which a callback stopped the run, else None.
    """

    samples: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    trajectory: dict[int, torch.Tensor]
    nfe: int
    residual_norm: torch.Tensor
    seeds: torch.Tensor
    stopped_at: Optional[int] = None
    steps: int = 0
    extra: dict = field(default_factory=dict)


class ChainSetup(Protocol):
    """What :func:`run_chain` needs from a sampler (:class:`~dps_fast.engine.Engine` provides it)."""

    schedule: NoiseSchedule
    check_every: Optional[int]

    def prepare(self, y: torch.Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None,
                seed: Optional[int] = None, seeds: Optional[torch.Tensor] = None
                ) -> tuple[StepProblem, torch.Tensor]: ...

    def backend(self, device: torch.device) -> Backend: ...


def run_chain(
    sampler: ChainSetup, stepper: Stepper, y: torch.Tensor, num_samples: int = 1,
    generator: Optional[torch.Generator] = None, seed: Optional[int] = None, seeds: Optional[torch.Tensor] = None,
    record: Optional[Union[Iterable[int], str]] = None, progress: bool = False,
    callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], Optional[bool]]] = None, *,
    desc: str, hint: str,
) -> DPSResult:
    """Run the reverse chain ``i = K-1 .. 0`` of ``sampler.schedule`` with ``stepper``'s step.

    Arguments after ``stepper`` are those of :meth:`DPS.sample`; ``desc`` labels the progress bar
    and ``hint`` ends the :class:`NonFiniteError` message (what to change).

    Example:
        >>> res = run_chain(dps, dps.stepper, y, num_samples=4, seed=0, desc="DPS",
        ...                 hint=dps.hint())   # doctest: +SKIP
    """
    k = sampler.schedule.num_steps
    rec = set(range(k)) if record == "all" else set(record or ())
    bad_rec = [r for r in rec if not 0 <= r < k]
    if bad_rec:
        raise ValueError(f"record: expected step indices in [0, {k}), got {sorted(bad_rec)}")
    p, x = sampler.prepare(y, num_samples, generator=generator, seed=seed, seeds=seeds)
    b, dev = y.shape[0], y.device
    seeds = p.seeds.view(b, num_samples).cpu()
    backend = sampler.backend(dev)
    check_every = sampler.check_every or (1 if dev.type == "cpu" else None)
    # NaN/inf or runaway growth (dps_fast.divergence); a sampler may set runaway_factor = None
    guard = DivergenceGuard(sampler.schedule, dev, getattr(sampler, "runaway_factor", RUNAWAY_FACTOR))
    trajectory: dict[int, torch.Tensor] = {}
    nfe = 0
    stopped_at = None
    bshape = (b, num_samples) + tuple(x.shape[1:])

    from tqdm.auto import tqdm

    bar = tqdm(total=k, desc=desc, unit="step", disable=not progress, leave=False)
    try:
        with p.net.frozen():
            step = stepper(backend, p, x)
            for i in range(k - 1, -1, -1):
                out = step(i)
                nfe += out.nfe
                guard.observe(i, out)
                if i in rec:
                    trajectory[i] = out.x0hat.detach().clone().view(bshape)
                if check_every is not None and (i % check_every == 0):
                    guard.check(hint)
                bar.update(1)
                if callback is not None and i > 0 and callback(i, x, out.x0hat) is False:
                    stopped_at = i
                    break
    finally:
        bar.close()
    guard.check(hint)
    samples = out.x0hat.view(bshape)
    return DPSResult(
        samples=samples, mean=samples.mean(1),
        std=samples.std(1, unbiased=False) if num_samples > 1 else torch.zeros_like(samples[:, 0]),
        trajectory=trajectory, nfe=nfe, residual_norm=out.rnorm2.sqrt().view(b, num_samples),
        seeds=seeds, stopped_at=stopped_at, steps=k)
