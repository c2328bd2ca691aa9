"""Poisson measurements and their DPS guidance (Chung et al. 2023, Sec. 3.2).

Model. A detector counts photons: ``c_j ~ Poisson(gain * (a_j - offset))`` with ``a = A x0`` in
the model's units, and reports ``y_j = offset + c_j / gain``. ``gain`` is the number of counts
per unit of ``y`` and ``offset`` the value of zero counts. :class:`PoissonNoise` builds them as
the original DPS code does (``guided_diffusion/measurements.py`` ``PoissonNoise``): images in
``value_range = (-1, 1)`` are mapped to intensities in [0, 1] and counted at ``levels * rate``
counts for full white (``levels = 255``), so ``gain = rate * levels / (hi - lo)``, ``offset = lo``.
Raw counts are ``PoissonNoise(rate=1, levels=1, value_range=(0, 1), saturate=False)``
(``gain = 1``, ``offset = 0``, ``y = c``).

Guidance. The paper approximates the Poisson likelihood by a Gaussian whose variance is the
measured count, ``p(c | x0) ~ prod_j N(c_j; gain (a_j - offset), c_j)``, so
``-log p(y | x0) = sum_j (c_j - gain (a_j - offset))^2 / (2 c_j) + const = ||y - A x0||^2_Lambda``
in ``y``'s units with the diagonal weight

    ``Lambda_jj = gain^2 / (2 c_j) = gain / (2 (y_j - offset))``,

which for raw counts is the paper's ``Lambda_jj = 1 / (2 y_j)``. Both guidance modes take this
norm: "squared" steps ``zeta * grad ||r||^2_Lambda`` (``zeta`` times the gradient of the negative
log-likelihood, exactly as "squared" Gaussian guidance ``zeta / (2 sigma_n^2) grad ||r||^2``
is), "normalized" steps ``zeta * grad ||r||_Lambda`` (the paper's Algorithm 2).

Zero and negative counts. ``c_j = 0`` would give an infinite weight, and ``y_j < offset`` (after
background subtraction, or a corrupted pixel) a negative one. Both are read as one count: the
weight uses ``max(c_j, 1)``, i.e. ``Lambda_jj = gain^2 / (2 max(c_j, 1))``. One count is the
smallest variance a Poisson pixel with a non-zero mean can show, so a dark pixel pulls
``A x0hat`` towards ``y`` at most as hard as a one-count pixel does; the residual itself still
uses the measured ``y_j``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["PoissonNoise", "NOISE_MODELS"]

NOISE_MODELS = ("gaussian", "poisson")


class PoissonNoise:
    """Poisson counting noise in the model's units; the weight ``Lambda`` of its DPS guidance.

    Args:
        rate: counts per intensity level (the DPS code's ``rate``; larger is less noisy).
        levels: intensity levels of full scale (255: 8-bit images, as the DPS code).
        value_range: ``(lo, hi)`` of the model's units that map to intensity 0 and 1.
        saturate: clamp simulated measurements to ``value_range`` (the DPS code clamps the
            intensity to [0, 1] before counting and the result to [-1, 1]); otherwise only
            negative intensities are clamped (to 0 counts).

    Example:
        >>> noise = PoissonNoise(rate=1.0)
        >>> noise.gain, noise.offset         # counts per unit of y in [-1, 1]; y of zero counts
        (127.5, -1.0)
        >>> noise.weight(torch.tensor([-1.0, 1.0]))   # 0 counts (read as 1), 255 counts
        tensor([8128.1250,   31.8750])
    """

    def __init__(self, rate: float = 1.0, *, levels: float = 255.0,
                 value_range: tuple[float, float] = (-1.0, 1.0), saturate: bool = True) -> None:
        for name, v in (("rate", rate), ("levels", levels)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name}: expected a positive finite number, got {v!r}")
        try:
            lo, hi = (float(v) for v in value_range)
        except (TypeError, ValueError):
            raise ValueError(f"value_range: expected (lo, hi), got {value_range!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"value_range: expected finite (lo, hi) with lo < hi, got {value_range!r}")
        self.rate, self.levels, self.value_range, self.saturate = float(rate), float(levels), (lo, hi), bool(saturate)

    @property
    def gain(self) -> float:
        """Counts per unit of ``y``."""
        lo, hi = self.value_range
        return self.rate * self.levels / (hi - lo)

    @property
    def offset(self) -> float:
        """The value of ``y`` at zero counts."""
        return self.value_range[0]

    def counts(self, y: torch.Tensor) -> torch.Tensor:
        """The (real-valued) counts ``c = gain (y - offset)`` a measurement ``y`` stands for."""
        return (y - self.offset) * self.gain

    def weight(self, y: torch.Tensor) -> torch.Tensor:
        """``Lambda = gain^2 / (2 max(c, 1))``, shaped like ``y`` (see the module docstring)."""
        if y.is_complex():
            raise TypeError(f"y: Poisson measurements are real counts, got dtype {y.dtype}")
        return (self.gain ** 2 * 0.5) / self.counts(y).clamp_min(1.0)

    def sample(self, ax: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A measurement ``y = offset + Poisson(gain (A x - offset)) / gain`` for ``ax = A x``.

        Draws with ``torch.poisson`` and ``generator`` (seed it per item for reproducible runs).
        """
        lo, hi = self.value_range
        a = ax.clamp(lo, hi) if self.saturate else ax.clamp_min(lo)
        c = torch.poisson((a - lo) * self.gain, generator=generator)
        y = lo + c / self.gain
        return y.clamp(lo, hi) if self.saturate else y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PoissonNoise) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return (f"PoissonNoise(rate={self.rate}, levels={self.levels}, value_range={self.value_range}, "
                f"saturate={self.saturate})")
