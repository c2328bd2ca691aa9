"""Poisson noise: the weight Lambda, the guided step equals the weighted-norm formula (every
backend, fused mask path and generic path), simulation, and a large-count problem where the
weighted Gaussian approximation is exact, against its exact posterior."""

import math

import pytest
import torch

from dps_fast import DPS, NoiseSchedule, operators, priors
from dps_fast.operators import PoissonNoise
from tests.nets import TinyEps

F64 = torch.float64


def test_weight_is_the_papers_lambda_in_counts():
    raw = PoissonNoise(rate=1.0, levels=1.0, value_range=(0.0, 1.0), saturate=False)
    assert raw.gain == 1.0 and raw.offset == 0.0
    y = torch.tensor([0.0, 0.5, 1.0, 4.0, 250.0, -3.0], dtype=F64)
    # Lambda_jj = 1 / (2 y_j) for y_j >= 1 count; 0 and negative counts read as one count
    want = torch.tensor([0.5, 0.5, 0.5, 1 / 8, 1 / 500, 0.5], dtype=F64)
    torch.testing.assert_close(raw.weight(y), want, rtol=1e-15, atol=0)
    # the DPS code's units: y in [-1, 1], 255 * rate counts at white
    dps = PoissonNoise(rate=2.0)
    assert dps.gain == 255.0 and dps.offset == -1.0
    yv = torch.tensor([-1.0, 0.0, 1.0], dtype=F64)   # 0, 255, 510 counts
    torch.testing.assert_close(dps.weight(yv), 255.0**2 / 2 / torch.tensor([1.0, 255.0, 510.0], dtype=F64))


def test_sample_is_poisson_in_counts_and_reproducible():
    noise = PoissonNoise(rate=0.5)  # gain 63.75 counts per unit
    ax = torch.full((20000,), -0.2, dtype=F64)  # intensity 0.4: mean count 0.4 * 255 * 0.5 = 51
    y1 = noise.sample(ax, torch.Generator().manual_seed(3))
    y2 = noise.sample(ax, torch.Generator().manual_seed(3))
    assert torch.equal(y1, y2)
    c = noise.counts(y1)
    assert float((c - c.round()).abs().max()) < 1e-9  # integer counts (up to the y round trip)
    # mean and variance of Poisson(51) from 20000 draws: se(mean) = sqrt(51/20000) = 0.05, the
    # variance's se ~ 51 * sqrt(2/20000) = 0.51; 5 standard errors each
    assert abs(float(c.mean()) - 51.0) < 5 * 0.05
    assert abs(float(c.var()) - 51.0) < 5 * 0.51
    # saturation as the DPS code: clamped to [-1, 1]
    assert float(noise.sample(torch.full((100,), 0.999, dtype=F64), torch.Generator().manual_seed(0)).max()) <= 1.0


@pytest.mark.parametrize("make,msg", [
    (lambda: PoissonNoise(rate=0.0), "rate"), (lambda: PoissonNoise(levels=-1), "levels"),
    (lambda: PoissonNoise(value_range=(1, 1)), "value_range"),
    (lambda: DPS(lambda x, t: x, NoiseSchedule.linear(1000), operators.Identity(), noise="laplace"), "noise"),
])
def test_bad_settings_name_the_argument(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


def _linear_eps(M):
    return lambda x, t: x @ M.T.to(x)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("guidance", ["squared", "normalized"])
def test_step_matches_the_weighted_norm_formula(backend, guidance):
    """One step by hand: grad_x ||A x0hat - y||^2_Lambda with Lambda = gain^2 / (2 max(c, 1))."""
    g = torch.Generator().manual_seed(3)
    d, m, S = 6, 5, 2
    M = torch.randn(d, d, generator=g, dtype=F64) * 0.3
    Amat = torch.rand(m, d, generator=g, dtype=F64) / d
    sched = NoiseSchedule.linear(1000).respace(20)
    zeta, i = 0.3, 11
    noise_model = PoissonNoise(rate=0.1)
    dps = DPS(_linear_eps(M), sched, operators.Matrix(Amat), zeta=zeta, guidance=guidance, backend=backend,
              noise=noise_model)
    y = torch.rand(2, 1, m, generator=g, dtype=F64) * 2 - 1
    y[0, 0, 0] = -1.0  # a zero-count pixel
    x = torch.randn(2 * S, 1, d, generator=g, dtype=F64)
    noise = torch.randn(2 * S, 1, d, generator=g, dtype=F64)
    x_next, _ = dps.step(x, i, y, noise, num_samples=S)
    ab, ab_prev, beta = (float(sched.alphas_cumprod[i]), float(sched.alphas_cumprod[i - 1]), float(sched.betas[i]))
    a, s = math.sqrt(ab), math.sqrt(1 - ab)
    xv = x[:, 0]
    x0 = (xv - s * xv @ M.T) / a
    yr = y[:, 0].repeat_interleave(S, 0)
    counts = (yr + 1) * 255 * 0.1 / 2
    lam = (255 * 0.1 / 2) ** 2 / (2 * counts.clamp_min(1.0))
    r = x0 @ Amat.T - yr
    grad_sq = 2 * ((lam * r) @ Amat) @ (torch.eye(d, dtype=F64) - s * M) / a  # grad ||r||^2_Lambda
    rn = (lam * r * r).sum(1, keepdim=True).sqrt()
    guided = zeta * grad_sq if guidance == "squared" else zeta * grad_sq / (2 * rn)
    var = beta * (1 - ab_prev) / (1 - ab)
    mean = (beta * math.sqrt(ab_prev) / (1 - ab)) * x0 + ((1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)) * xv
    torch.testing.assert_close(x_next[:, 0], mean + math.sqrt(var) * noise[:, 0] - guided, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", ["identity", "inpaint", "blur-reflect", "blur-circular", "superres"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_and_fallback_paths_equal_the_reference(op, backend):
    """Mask operators keep their fused elementwise pass (weight folded into mask and y), blurs fall
    back to A^H(Lambda r); both equal autograd through the weighted norm."""
    g = torch.Generator().manual_seed(1)
    shape = (2, 2, 6, 5) if op != "superres" else (2, 2, 6, 4)
    A = {"identity": operators.Identity(), "inpaint": operators.Inpainting.random((6, 5), 0.4, seed=2),
         "blur-reflect": operators.GaussianBlur(1.0, 3, boundary="reflect"),
         "blur-circular": operators.GaussianBlur(1.0, 3), "superres": operators.SuperResolution(2)}[op]
    x0 = torch.rand(shape, generator=g, dtype=F64) * 2 - 1
    noise_model = PoissonNoise(rate=0.2)
    y = noise_model.sample(A(x0), torch.Generator().manual_seed(0))
    net = TinyEps(2, 8).double()
    sched = NoiseSchedule.linear(1000).respace(4)
    opts = dict(zeta=0.05, compile=False, noise=noise_model, clip_x0=(-1.0, 1.0), guidance=["squared", "normalized"])
    runs = {be: DPS(net, sched, A, backend=be, **opts).sample(y, num_samples=2, seed=4, record="all")
            for be in ("reference", backend)}
    for i in range(4):
        a, b = runs[backend].trajectory[i], runs["reference"].trajectory[i]
        assert float((a - b).norm() / b.norm()) < 1e-9, f"step {i}"
    torch.testing.assert_close(runs[backend].residual_norm, runs["reference"].residual_norm, rtol=1e-9, atol=1e-12)
    # and Poisson guidance is not Gaussian guidance: the samples differ
    gauss = DPS(net, sched, A, backend=backend, **(opts | dict(noise="gaussian", sigma_n=0.1))).sample(
        y, num_samples=2, seed=4)
    assert float((gauss.samples - runs[backend].samples).norm()) > 1e-6


def test_large_counts_posterior_mean_matches_the_exact_weighted_gaussian_posterior():
    """The problem of tests/test_ground_truth.py (N(0, I) prior, d = 16, a random 8 x 16 A) with
    Poisson noise instead: offset -10 and gain 1000 counts per unit make c_j ~ 10^4 counts, where
    the Gaussian approximation of the Poisson likelihood is accurate, and the noise std
    sqrt(c_j) / gain ~ 0.1 matches the Gaussian case's sigma_n = 0.1. Its exact posterior under
    the weighted Gaussian likelihood N(y; A x, diag(c_j) / gain^2) is computed by whitening.
    Tolerance: the Gaussian case's (posterior mean within 0.15 relative L2); "squared" Poisson
    guidance has the same scale as the Gaussian one. To stay cheap this runs 250 steps and 1000
    samples with zeta scaled by the step ratio (0.004 = 4 x 0.001): measured mean error 0.050
    (the Gaussian likelihood on the same y: 0.050; at 1000 steps and 2000 samples both 0.049)."""
    g = torch.Generator().manual_seed(0)
    d, m, n = 16, 8, 1000
    prior = priors.GaussianPrior(torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64))
    A = torch.randn(m, d, generator=g, dtype=F64) / d**0.5
    x0 = prior.sample(1, generator=g)
    noise_model = PoissonNoise(rate=1000.0, levels=1.0, value_range=(-10.0, -9.0), saturate=False)
    y = noise_model.sample(x0 @ A.T, torch.Generator().manual_seed(1))
    counts = noise_model.counts(y)
    assert float(counts.min()) > 5000  # large counts, as the test needs
    var = counts[0, 0] / noise_model.gain**2
    white = var.rsqrt()
    post = prior.posterior(white[:, None] * A, (white * y[0, 0])[None, None], 1.0)
    sched = NoiseSchedule.linear(1000).respace(250)
    dps = DPS(prior.eps_model(sched), sched, operators.Matrix(A), zeta=0.004, backend="torch", noise=noise_model)
    s = dps.sample(y, num_samples=n, seed=1).samples[0, :, 0]
    mean_err = float((s.mean(0) - post.mean[0]).norm() / post.mean[0].norm())
    assert mean_err < 0.15, mean_err
    prior_err = float((prior.mean - post.mean[0]).norm() / post.mean[0].norm())
    assert prior_err > 0.5  # the guidance matters
