"""When a DPS chain has diverged: non-finite values, or a state that ran away while finite.

Too large a guidance scale makes the chain grow geometrically. Often it overflows to inf/NaN,
but with few steps it can end at 1e7 .. 1e55 and still be finite (measured on the demo
problem with 50 steps: zeta 0.03 -> 6e3, 0.04 -> 2e7, 0.06 -> 2e12), so finiteness alone is
not a divergence test. The rule used here is stated in terms of the noise schedule:

    a chain has run away at state index j when  rms(x_j) > FACTOR * sqrt(abar_j / abar_T + 1 - abar_j)

``x_j = sqrt(abar_j) x0 + sqrt(1 - abar_j) z`` is what the schedule produces from data ``x0``;
its RMS is ``sqrt(abar_j s^2 + 1 - abar_j)`` for data of RMS ``s``. The largest data scale a
schedule can carry is ``s = 1 / sqrt(abar_T)`` (beyond it the start ``x_T ~ N(0, I)`` is no
longer data-free), so the square root bounds what any sample of the schedule has at index j
(``sqrt(2)`` at the first step, ~160 at the last for the linear 1000-step schedule).
``FACTOR = 10`` leaves room for the guidance pushing a chain off the data manifold. Measured on
the demo problem (seeds 0-2, 64 chains, 50 and 250 steps): chains with zeta <= 0.02 peak at RMS
1.3-2.3 (limits 14-1574), while diverging ones grow 2-5x per step, so the factor moves the
reported step by a few steps only.

The check is one per-sample norm of the state per step, kept on the device (no host sync):
:class:`DivergenceGuard` records the first bad step; :meth:`DivergenceGuard.check` raises.

Example:
    >>> from dps_fast import NoiseSchedule
    >>> guard = DivergenceGuard(NoiseSchedule.linear(1000).respace(10), torch.device("cpu"))
    >>> [round(v, 1) for v in guard.limits[[9, 0]].tolist()]  # at x_T and at the last state
    [14.1, 1574.0]
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch

from .schedule import NoiseSchedule

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteError", "DivergenceGuard", "runaway_limits", "zeta_hint", "describe_value", "RUNAWAY_FACTOR"]

#: How far (in RMS) beyond the largest state the schedule can produce a chain may go.
RUNAWAY_FACTOR = 10.0

_NONFINITE, _RUNAWAY = 1, 2


class NonFiniteError(FloatingPointError):
    """The chain diverged: NaN/inf, or runaway growth (see :mod:`dps_fast.divergence`).

    The message names the step and suggests a smaller zeta. Attributes: ``step`` (the sampling
    step index ``i``), ``timestep`` (the network's ``t`` at that step), ``kind``
    ("non-finite" or "runaway").
    """

    def __init__(self, message: str, step: Optional[int] = None, timestep: Optional[int] = None,
                 kind: str = "non-finite") -> None:
        super().__init__(message)
        self.step = step
        self.timestep = timestep
        self.kind = kind


def describe_value(v: Any) -> str:
    """A number, or a tensor or list of them, as a reader wants it in a message: ``0.5``, ``[0.1, 0.2]``,
    ``0.1 .. 0.9 (64 values)``; never a tensor repr.

    >>> describe_value(torch.tensor([1.0], dtype=torch.float64)), describe_value(torch.tensor([0.5, 2.0]))
    ('1', '[0.5, 2]')
    """
    if isinstance(v, torch.Tensor):
        v = v.detach().flatten().cpu().tolist() if v.numel() != 1 else v.item()
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            return describe_value(v[0])
        if len(v) > 4 and all(isinstance(u, (int, float)) for u in v):
            return f"{min(v):g} .. {max(v):g} ({len(v)} values)"
        return "[" + ", ".join(describe_value(u) for u in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def zeta_hint(zeta: Any) -> str:
    """The end of a guided method's :class:`NonFiniteError` message: what to change."""
    return f"the guidance step is too large for this problem; try a smaller zeta (now {describe_value(zeta)})"


def runaway_limits(schedule: NoiseSchedule, factor: float = RUNAWAY_FACTOR) -> torch.Tensor:
    """``[K]`` float64: the largest per-sample RMS allowed for the state at index ``j``.

    ``factor * sqrt(abar_j / abar_T + 1 - abar_j)`` with ``abar_T`` the last (noisiest) entry.
    """
    if not factor > 0:
        raise ValueError(f"factor: expected a positive number, got {factor!r}")
    abar = schedule.alphas_cumprod
    return factor * torch.sqrt(abar / abar[-1] + 1.0 - abar)


class DivergenceGuard:
    """Records, on the device, the first step at which any chain is non-finite or ran away.

    Args:
        schedule: the sampling schedule (its ``alphas_cumprod`` set the limits).
        device: where the chain's state lives.
        factor: :data:`RUNAWAY_FACTOR` by default; None checks only for NaN/inf.
    """

    def __init__(self, schedule: NoiseSchedule, device: torch.device,
                 factor: Optional[float] = RUNAWAY_FACTOR) -> None:
        self.schedule = schedule
        self.factor = None if factor is None else float(factor)
        self.limits = runaway_limits(schedule, factor) if factor is not None else None
        self._limits = self.limits.to(device) if self.limits is not None else None
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_kind = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_rms = torch.zeros((), dtype=torch.float64, device=device)

    def observe(self, i: int, out: Any) -> None:
        """After step ``i``: ``out.rnorm2`` ``[N]`` (NaN/inf flags a non-finite chain) and the
        new state ``out.x`` ``[N, ...]`` (index ``i - 1``; None on the final step)."""
        nonfinite = ~torch.isfinite(out.rnorm2).all()
        bad, rms = nonfinite, None
        if out.x is not None and i > 0 and self._limits is not None:
            x = out.x.detach()
            rms = (torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).max().double()
                   / max(1, x[0].numel()) ** 0.5)
            bad = bad | ~(rms <= self._limits[i - 1])  # a NaN state counts as runaway too
        first = (self.bad_step < 0) & bad
        if rms is not None:
            self.bad_rms = torch.where(first, rms, self.bad_rms)
        self.bad_kind.masked_fill_(first, _RUNAWAY)
        self.bad_kind.masked_fill_(first & nonfinite, _NONFINITE)
        self.bad_step.masked_fill_(first, i)

    def check(self, hint: str) -> None:
        """Raise :class:`NonFiniteError` if a step was flagged (reads the flag: a host sync); the
        message ends with ``hint``, what to change (e.g. :func:`zeta_hint`)."""
        i = int(self.bad_step)
        if i < 0:
            return
        t = int(self.schedule.timesteps[i])
        if int(self.bad_kind) == _NONFINITE:
            # The residual of step i is computed from x0hat(x_i) before that step's guidance. x_i is the
            # start (finite by construction) at the first step, and passed the runaway check (finite, in
            # the schedule's range) at the others: a non-finite residual then came from the network
            # (or the operator), not from the guidance scale.
            if i == self.schedule.num_steps - 1 or self.limits is not None:
                where = ("the start x_T, before any guidance" if i == self.schedule.num_steps - 1
                         else "a finite x_t in the schedule's range, before this step's guidance")
                raise NonFiniteError(
                    f"the network returned non-finite values at step i={i} (network timestep t={t}) from {where}: "
                    f"the guidance scale is not the cause; check the model, its checkpoint and autocast (and that "
                    f"the operator is finite on finite input)", step=i, timestep=t, kind="non-finite")
            raise NonFiniteError(f"x_t became non-finite at step i={i} (network timestep t={t}): {hint}",
                                 step=i, timestep=t, kind="non-finite")
        if not math.isfinite(float(self.bad_rms)):
            raise NonFiniteError(f"x_t became non-finite in step i={i} (network timestep t={t}): {hint}",
                                 step=i, timestep=t, kind="non-finite")
        limit = float(self.limits[i - 1])
        raise NonFiniteError(
            f"x_t ran away at step i={i} (network timestep t={t}): a chain's RMS reached "
            f"{float(self.bad_rms):.3g}, over {self.factor:g}x the largest ({limit / self.factor:.3g}) the noise "
            f"schedule gives a state at that step: {hint}", step=i, timestep=t, kind="runaway")
