"""What a new user hit (issue 13): sigma_n < 0, seeds that moved with num_samples, and backends
that failed only at the first step. The CLI-side items are in tests/test_cli.py."""

import pytest
import torch

from dps_fast import DPS, NoiseSchedule, operators, priors
from dps_fast.noise import seeds_from

F64 = torch.float64


def _gaussian(d: int = 6):
    prior = priors.GaussianPrior(torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64))
    sched = NoiseSchedule.linear(1000).respace(8)
    A = operators.Matrix(torch.randn(3, d, dtype=F64, generator=torch.Generator().manual_seed(0)))
    return prior.eps_model(sched), sched, A


@pytest.mark.parametrize("guidance", ["normalized", "squared"])
def test_negative_sigma_n_is_rejected(guidance):
    eps, sched, A = _gaussian()
    with pytest.raises(ValueError, match=r"sigma_n: expected a finite standard deviation >= 0, got -0.1"):
        DPS(eps, sched, A, sigma_n=-0.1, guidance=guidance)
    DPS(eps, sched, A, sigma_n=0.0, guidance="normalized")  # noiseless measurements stay allowed


def test_seed_of_a_sample_depends_on_seed_row_and_index_only():
    eps, sched, A = _gaussian()
    y = torch.randn(3, 1, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    dps = DPS(eps, sched, A, zeta=0.01, sigma_n=0.1)
    two, four = dps.sample(y, num_samples=2, seed=5), dps.sample(y, num_samples=4, seed=5)
    # every row, not only row 0, keeps its first two samples when more samples are drawn
    assert torch.equal(four.seeds[:, :2], two.seeds)
    torch.testing.assert_close(four.samples[:, :2], two.samples, rtol=1e-12, atol=1e-12)
    # and a row keeps its samples when measurements are dropped after it
    one = dps.sample(y[:2], num_samples=2, seed=5)
    assert torch.equal(one.seeds, two.seeds[:2])
    # all seeds distinct
    assert len(set(four.seeds.flatten().tolist())) == 12


def test_seeds_from_shapes():
    s = seeds_from(None, (3, 4), seed=9)
    assert s.shape == (3, 4) and s.dtype == torch.int64 and (s >= 0).all() and (s < 2**62).all()
    assert torch.equal(s[0], seeds_from(None, 4, seed=9))  # a count is row 0
    assert torch.equal(seeds_from(None, (5, 2), seed=9)[:3], s[:, :2])
    assert seeds_from(torch.Generator().manual_seed(0), (2, 3)).shape == (2, 3)
    with pytest.raises(ValueError, match="n: expected a count or a shape"):
        seeds_from(None, (1, 2, 3), seed=0)


def test_backend_is_validated_when_the_sampler_is_built(monkeypatch):
    eps, sched, A = _gaussian()
    model = torch.nn.Linear(6, 6)  # a module on the CPU
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend: 'triton' runs on CUDA devices, got the model on cpu"):
        DPS(model, sched, A, backend="triton")
    with pytest.raises(ValueError, match=r"backend: 'cuda' runs on CUDA devices"):
        DPS(model, sched, A, backend="cuda")
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        DPS(eps, sched, A, backend="jax")
    DPS(eps, sched, A, backend="triton")  # a plain function: its device is known at sample() only
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    DPS(model, sched, A, backend="triton")  # the CPU interpreter runs the kernels anywhere
