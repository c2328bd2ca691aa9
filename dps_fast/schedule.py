"""Noise schedules, respacing, and the per-step coefficient table of the DDPM reverse chain.

Everything is computed in float64 on the host; :meth:`NoiseSchedule.table` casts the finished
table to the state dtype and device once, so the fused kernels only load finished numbers.

Conventions
-----------
A schedule has ``K`` sampling steps indexed ``i = 0 .. K-1`` (``i = K-1`` is the first, noisiest
step). ``timesteps[i]`` is the index of that step in the *training* schedule, the integer the
network is called with. Without respacing ``timesteps[i] == i``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["NoiseSchedule", "Coef", "space_timesteps", "VARIANCES", "VARIANCE_CODES"]

#: The reverse-step variances (see :class:`Coef`), in the order of their integer codes, which the
#: Triton and CUDA update kernels take (``VARIANCE_CODES[name]``; csrc's ``dps_fast::Variance``).
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
VARIANCE_CODES = {name: code for code, name in enumerate(VARIANCES)}


class Coef:
    """Column indices of :meth:`NoiseSchedule.table` (one row per sampling step ``i``).

    ``x0hat = SQRT_RECIP_ABAR * x_t - SQRT_RECIPM1_ABAR * eps``;
    DDPM mean ``= COEF_X0 * x0hat + COEF_XT * x_t``; the noise standard deviation is
    ``SIGMA_SMALL`` (posterior variance beta~), ``SIGMA_LARGE`` (beta, with beta~_1 at the first
    step as in guided-diffusion) or, for learned-range models, ``NONZERO * exp(0.5 * (f * LOG_BETA
    + (1 - f) * LOG_VAR_SMALL))`` with ``f = (v + 1) / 2`` from the network's variance channels.
    """

    SQRT_ABAR = 0
    SQRT_1M_ABAR = 1
    SQRT_RECIP_ABAR = 2
    SQRT_RECIPM1_ABAR = 3
    COEF_X0 = 4
    COEF_XT = 5
    VAR_SMALL = 6
    LOG_VAR_SMALL = 7
    VAR_LARGE = 8
    LOG_VAR_LARGE = 9
    LOG_BETA = 10
    SIGMA_SMALL = 11
    SIGMA_LARGE = 12
    NONZERO = 13
    STEP = 14
    COUNT = 15


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """The timesteps kept when respacing, exactly as guided-diffusion's ``space_timesteps``.

    ``section_counts`` is an int (one section), a comma-separated string ("10,15,20") or a list:
    the training range is cut into equal sections and each section is strided evenly.

    >>> space_timesteps(1000, 4)
    [0, 333, 666, 999]
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"section_counts: cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(
                f"section_counts: cannot divide a section of {size} steps into {section_count}"
            )
        frac_stride = 1.0 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken = []
        for _ in range(section_count):
            taken.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken
        start_idx += size
    return sorted(set(all_steps))


class NoiseSchedule:
    """A DDPM noise schedule ``beta_1..beta_K`` with its training-time timestep indices.

    Args:
        betas: ``[K]`` variances of the forward process, each in (0, 1).
        timesteps: ``[K]`` training-schedule indices passed to the network; defaults to ``0..K-1``.
        base_alphas_cumprod: ``[T]`` alpha-bar of the training schedule (for analytic models that
            must evaluate alpha-bar at an original index); defaults to this schedule's own.

    Example:
        >>> s = NoiseSchedule.linear(1000).respace(100)
        >>> s.num_steps, int(s.timesteps[-1])
        (100, 999)
    """

    def __init__(
        self,
        betas: torch.Tensor | Sequence[float],
        timesteps: torch.Tensor | Sequence[int] | None = None,
        base_alphas_cumprod: torch.Tensor | None = None,
    ) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        if betas.dim() != 1 or betas.numel() < 1:
            raise ValueError(f"betas: expected a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas >= 1).any():
            raise ValueError(
                f"betas: expected every value in (0, 1), got min {betas.min().item():.3g} "
                f"and max {betas.max().item():.3g}"
            )
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        k = betas.numel()
        if timesteps is None:
            timesteps = torch.arange(k, dtype=torch.int64)
        self.timesteps = torch.as_tensor(timesteps, dtype=torch.int64).cpu().clone()
        if self.timesteps.shape != (k,):
            raise ValueError(f"timesteps: expected shape ({k},), got {tuple(self.timesteps.shape)}")
        self.base_alphas_cumprod = (
            self.alphas_cumprod.clone() if base_alphas_cumprod is None
            else torch.as_tensor(base_alphas_cumprod, dtype=torch.float64).cpu().clone()
        )
        self._table64 = self._build_table()
        self._cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """The DDPM/ADM linear schedule, scaled as guided-diffusion does for ``num_steps != 1000``."""
        _check_steps(num_steps)
        scale = 1000.0 / num_steps
        return cls(torch.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=torch.float64))

    @classmethod
    def cosine(cls, num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """The cosine schedule of Nichol & Dhariwal (2021), betas clipped at ``max_beta``."""
        _check_steps(num_steps)

        def abar(t: float) -> float:
            return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta) for i in range(num_steps)]
        return cls(betas)

    @classmethod
    def from_betas(cls, betas: torch.Tensor | Sequence[float]) -> "NoiseSchedule":
        return cls(betas)

    def respace(self, steps: int | str | Sequence[int]) -> "NoiseSchedule":
        """Sample with fewer steps of a model trained on this schedule (guided-diffusion respacing).

        The returned schedule keeps the original alpha-bar at the kept timesteps and passes the
        original indices to the network, so a checkpoint trained with 1000 steps samples
        correctly with 100 or 250.
        """
        if isinstance(steps, int) and not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps: expected 1 <= steps <= {self.num_steps}, got {steps}")
        use = space_timesteps(self.num_steps, steps)
        last = 1.0
        new_betas = []
        for t in use:
            abar = float(self.alphas_cumprod[t])
            new_betas.append(1.0 - abar / last)
            last = abar
        return NoiseSchedule(new_betas, self.timesteps[use], self.base_alphas_cumprod)

    # ---- properties ---------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.betas.numel()

    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        return f"NoiseSchedule(num_steps={self.num_steps}, trained_steps={self.base_alphas_cumprod.numel()})"

    def _build_table(self) -> torch.Tensor:
        b = self.betas
        abar = self.alphas_cumprod
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        var_small = b * (1.0 - abar_prev) / (1.0 - abar)
        # guided-diffusion clips the log of the zero variance at the last step to its neighbour.
        log_var_small = torch.log(torch.cat([var_small[1:2], var_small[1:]])) if b.numel() > 1 else torch.log(b)
        var_large = torch.cat([var_small[1:2], b[1:]]) if b.numel() > 1 else b.clone()
        nonzero = torch.ones_like(b)
        nonzero[0] = 0.0
        t = torch.empty(b.numel(), Coef.COUNT, dtype=torch.float64)
        t[:, Coef.SQRT_ABAR] = abar.sqrt()
        t[:, Coef.SQRT_1M_ABAR] = (1.0 - abar).sqrt()
        t[:, Coef.SQRT_RECIP_ABAR] = (1.0 / abar).sqrt()
        t[:, Coef.SQRT_RECIPM1_ABAR] = (1.0 / abar - 1.0).sqrt()
        t[:, Coef.COEF_X0] = b * abar_prev.sqrt() / (1.0 - abar)
        t[:, Coef.COEF_XT] = (1.0 - abar_prev) * (1.0 - b).sqrt() / (1.0 - abar)
        t[:, Coef.VAR_SMALL] = var_small
        t[:, Coef.LOG_VAR_SMALL] = log_var_small
        t[:, Coef.VAR_LARGE] = var_large
        t[:, Coef.LOG_VAR_LARGE] = var_large.log()
        t[:, Coef.LOG_BETA] = b.log()
        t[:, Coef.SIGMA_SMALL] = var_small.sqrt() * nonzero
        t[:, Coef.SIGMA_LARGE] = var_large.sqrt() * nonzero
        t[:, Coef.NONZERO] = nonzero
        t[:, Coef.STEP] = torch.arange(b.numel(), dtype=torch.float64)
        return t

    def table(self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[K, Coef.COUNT]`` coefficient table (computed in float64), cached per dtype/device.

        Row ``i`` holds every number the fused update of step ``i`` needs (see :class:`Coef`).
        """
        key = (dtype, torch.device(device))
        tab = self._cache.get(key)
        if tab is None:
            tab = self._table64.to(device=device, dtype=dtype)
            self._cache[key] = tab
        return tab

    def coef(self, i: int, name: int) -> float:
        """One float64 coefficient of step ``i`` as a Python float (host side, no device sync)."""
        return float(self._table64[i, name])


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected a positive int, got {num_steps!r}")
