"""DPS on Fourier phase retrieval with an exact-score Gaussian-mixture prior (small 1-D signals).

Problem: d = 16, a 4-component mixture (means N(0, I), covariances 0.05 I, equal weights),
PhaseRetrieval(oversample=2) (zero padding 4 per side, m = 24 magnitudes), sigma_n = 0.05,
16 measurements x 4 posterior samples = 64 chains, 250 steps, "normalized" guidance zeta = 0.4.

Success criterion per chain: ``||y - A(x0hat)|| <= 2 sigma_n sqrt(m)`` (= 0.49). Why: for the true
signal ``||r||^2 = sigma_n^2 chi^2_m`` (mean sigma_n^2 m, ||r|| ~ 0.245); 4 sigma_n^2 m = 96
sigma_n^2 lies beyond the chi^2_24 tail at P ~ 1e-10, so a chain that samples near a signal
consistent with y passes, while a chain stuck in a wrong mode (phase retrieval's known failure:
a wrong mixture component or a stagnated phase) sits far above it (prior draws, i.e. no guidance:
median 2.97, and more than 90% of them above the threshold, asserted below).

Measured here (torch backend, these seeds): 1 failure in 64 chains (1.6%); median residual 0.20.
Zeta scan on the same problem: 0.2 -> 19% failures, 0.3 -> 9%, 0.4 -> 1.6%. The assertion allows
up to 25% failures ("most seeds"): with 64 chains a true failure rate of 10% exceeds 25% with
probability < 1e-3, so the bound tolerates platform rounding (chaotic chains) but not a broken
gradient (without guidance > 90% fail).
"""

import torch

from dps_fast import DPS, NoiseSchedule, operators, priors

F64 = torch.float64


def test_phase_retrieval_gmm_reaches_the_noise_level_for_most_seeds(record_property):
    d, k, b, s, sigma = 16, 4, 16, 4, 0.05
    g = torch.Generator().manual_seed(0)
    prior = priors.GaussianMixturePrior(torch.full((k,), 1.0 / k, dtype=F64), torch.randn(k, d, generator=g, dtype=F64),
                                        0.05 * torch.eye(d, dtype=F64).expand(k, d, d))
    A = operators.PhaseRetrieval(2.0)
    x0 = prior.sample(b, generator=g)
    y = A(x0)
    y = y + sigma * torch.randn(y.shape, generator=g, dtype=F64)
    m = y.shape[-1]
    threshold = 2 * sigma * m**0.5
    # the threshold discriminates: signals from the prior (not fitted to y) are far above it
    draws = prior.sample(b * s, generator=torch.Generator().manual_seed(9))
    prior_res = (A(draws) - y.repeat_interleave(s, 0)).flatten(1).norm(dim=1)
    assert float((prior_res > threshold).double().mean()) > 0.9, prior_res

    sched = NoiseSchedule.linear(1000).respace(250)
    dps = DPS(prior.eps_model(sched), sched, A, zeta=0.4, sigma_n=sigma, guidance="normalized", backend="torch")
    res = dps.sample(y, num_samples=s, seed=1).residual_norm.flatten()
    failures = int((res > threshold).sum())
    rate = failures / res.numel()
    record_property("phase_retrieval_failure_rate", rate)
    record_property("phase_retrieval_median_residual", float(res.median()))
    assert rate <= 0.25, (f"{failures}/{res.numel()} chains ({rate:.1%}) ended above the noise-level threshold "
                          f"{threshold:.3f}; residuals {res.tolist()}")
    assert float(res.median()) <= sigma * m**0.5 * 1.2  # a typical chain fits y to the noise level
