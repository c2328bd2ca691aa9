"""Their Poisson step divides by |y|: with zeros in y the chain turns non-finite whatever the scale,
and the error says so instead of asking for a smaller scale (issue 19)."""

from __future__ import annotations

import functools

import pytest
import torch

from dps_fast import NonFiniteError
from dps_fast.compat.dps2022 import create_sampler
from tests.compat.conftest import diffusion_config
from tests.compat.standins import GaussianNoise, InpaintingOperator, PoissonNoise, PosteriorSampling
from tests.nets import TinyEps

F64 = torch.float64


def _run(y: torch.Tensor, noiser) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(1, 1, 8, 8, generator=g) > 0.4).to(F64)
    cond = PosteriorSampling(InpaintingOperator("cpu"), noiser, scale=0.3)
    s = create_sampler(**diffusion_config(timestep_respacing="4"), rng="torch", progress=False)
    torch.manual_seed(1)
    return s.p_sample_loop(TinyEps(3, 8, learn_sigma=True).double(), torch.randn(1, 3, 8, 8, generator=g, dtype=F64),
                           y, functools.partial(cond.conditioning, mask=mask))


def test_zeros_in_y_are_named_not_the_scale():
    y = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=F64) * 0.8 + 0.1
    y[0, 0, :2, :2] = 0.0
    with pytest.raises(NonFiniteError, match=r"their Poisson step divides by \|y\| and y has 4 zero entries, so no "
                                             r"scale makes it finite") as info:
        _run(y, PoissonNoise(1.0))
    assert "smaller scale" not in str(info.value)


def test_without_zeros_the_poisson_chain_runs_and_the_gaussian_step_ignores_zeros():
    y = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=F64) * 0.8 + 0.1
    assert torch.isfinite(_run(y, PoissonNoise(1.0))).all()
    y_zero = y.clone()
    y_zero[0, 0, 0, 0] = 0.0  # zeros mean nothing to the Gaussian step: a finite chain
    assert torch.isfinite(_run(y_zero, GaussianNoise(0.05))).all()
