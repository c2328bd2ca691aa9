"""Ground truth: DPS against exact posteriors of analytic priors (the issue's acceptance tests).

Gaussian prior N(0, I) in d = 16, a random 8 x 16 matrix A (entries N(0, 1/d)), sigma_n = 0.1,
T = 1000 steps, 2000 samples, fixed seeds:

* zeta = 0 turns the guidance off: the chain must sample the prior (sampling-error bounds below);
* a tuned zeta must give the exact posterior's mean within 0.15 relative L2 and its covariance
  within 0.25 relative Frobenius (the figures an independent DPS reaches on this problem; DPS is
  biased, so these are not sampling-error bounds).

The mixture case uses the demo's 1-D blur problem (d = 64, GaussianBlur sigma 3) and reports the
sliced Wasserstein distance of DPS samples to exact posterior samples.
"""

import pytest
import torch

from dps_fast import DPS, NoiseSchedule, operators, priors
from dps_fast.demo import DEFAULT_ZETA
from dps_fast.problems import demo_problem

F64 = torch.float64
S = 2000


def _gaussian_problem():
    g = torch.Generator().manual_seed(0)
    d, m = 16, 8
    prior = priors.GaussianPrior(torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64))
    A = torch.randn(m, d, generator=g, dtype=F64) / d**0.5
    x0 = prior.sample(1, generator=g)
    y = x0 @ A.T + 0.1 * torch.randn(1, 1, m, generator=g, dtype=F64)
    return prior, A, y


def _run(prior, A, y, zeta, steps=1000, n=S):
    sched = NoiseSchedule.linear(1000).respace(steps)
    dps = DPS(prior.eps_model(sched), sched, operators.Matrix(A), zeta=zeta, sigma_n=0.1, backend="torch")
    return dps.sample(y, num_samples=n, seed=1).samples[0, :, 0]


def test_zero_guidance_samples_the_prior():
    prior, A, y = _gaussian_problem()
    s = _run(prior, A, y, zeta=0.0)
    d = s.shape[1]
    # mean: n |m_hat - mu|^2 ~ chi^2_16 for Sigma = I; P(chi^2_16 > 45) ~ 1.5e-4
    assert S * float((s.mean(0) - prior.mean).square().sum()) < 45.0
    # covariance: E||S_hat - I||_F^2 = (tr(I)^2 + tr(I^2)) / n = (256 + 16) / 2000, rms 0.37;
    # allow 3x that (the DDPM discretisation error at T = 1000 is far below it)
    err = float((torch.cov(s.T) - prior.cov).norm())
    assert err < 3 * ((d * d + d) / S) ** 0.5, err


def test_tuned_zeta_matches_exact_gaussian_posterior():
    prior, A, y = _gaussian_problem()
    post = prior.posterior(A, y, 0.1)
    s = _run(prior, A, y, zeta=0.001)
    mean_err = float((s.mean(0) - post.mean[0]).norm() / post.mean[0].norm())
    cov_err = float((torch.cov(s.T) - post.cov[0]).norm() / post.cov[0].norm())
    assert mean_err < 0.15, mean_err
    assert cov_err < 0.25, cov_err
    # and the guidance matters: the prior itself is far from the posterior on both counts
    prior_err = float((prior.mean - post.mean[0]).norm() / post.mean[0].norm())
    assert prior_err > 0.5


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_dirs: int = 256, seed: int = 0) -> float:
    """SW_2 between two equal-size point clouds [n, d]: mean over random unit directions of the
    1-D W_2^2 of the projections (sorted matching), square-rooted."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_dirs, generator=g, dtype=a.dtype)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a @ dirs).sort(0).values, (b @ dirs).sort(0).values
    return float((pa - pb).square().mean().sqrt())


def test_mixture_blur_sliced_wasserstein(record_property):
    p = demo_problem()
    sched = NoiseSchedule.linear(1000).respace(250)
    dps = DPS(p.prior.eps_model(sched), sched, p.operator, zeta=DEFAULT_ZETA, sigma_n=p.sigma_n, backend="torch")
    n = 1000
    s = dps.sample(p.y, num_samples=n, seed=3).samples[0, :, 0]
    post = p.prior.posterior(p.A, p.y, p.sigma_n)
    exact = post.sample(n, generator=torch.Generator().manual_seed(4))[0, :, 0]
    exact2 = post.sample(n, generator=torch.Generator().manual_seed(5))[0, :, 0]
    prior_s = p.prior.sample(n, generator=torch.Generator().manual_seed(6))[:, 0]
    sw_dps, sw_floor, sw_prior = (sliced_wasserstein(s, exact), sliced_wasserstein(exact2, exact),
                                  sliced_wasserstein(prior_s, exact))
    record_property("sw_dps", sw_dps)
    record_property("sw_exact_vs_exact", sw_floor)
    record_property("sw_prior", sw_prior)
    print(f"sliced W2: DPS {sw_dps:.4f}, exact vs exact {sw_floor:.4f}, prior vs exact {sw_prior:.4f}")
    # Measured at this seed: DPS 0.035, exact-vs-exact floor 0.013, prior 0.64. DPS is biased, so
    # the bound is relative to the prior's distance: a tenth of it (2x margin on the measurement).
    assert sw_dps < sw_prior / 10, (sw_dps, sw_prior)
