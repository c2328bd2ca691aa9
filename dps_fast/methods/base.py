"""Small helpers the methods beside DPS share (the engine itself is :class:`dps_fast.engine.Engine`)."""

from __future__ import annotations

import torch

from ..backends import StepProblem
from ..operators.base import residual_norm2

__all__ = ["check_float", "residual"]


def check_float(value: object, name: str, lo: float = 0.0, hi: float = float("inf")) -> float:
    """``value`` as a float in ``[lo, hi]``, else a ValueError naming ``name``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    v = float(value) if ok else float("nan")
    if not (lo <= v <= hi):
        raise ValueError(f"{name}: expected a float in [{lo}, {hi}], got {value!r}")
    return v


def residual(p: StepProblem, x0hat: torch.Tensor) -> torch.Tensor:
    """``||A x0hat - y||^2`` per row ``[N]``."""
    return residual_norm2(p.operator.forward(x0hat) - p.meas.y)
