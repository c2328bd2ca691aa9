"""Exact eps, Tweedie, posterior and sampling of the analytic priors against independent references.

Every reference here is computed another way than the library does it: linear solves instead of
eigendecompositions, torch.distributions + autograd instead of closed-form scores, the information
form instead of the gain form, and grid quadrature instead of Gaussian conditioning.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from dps_fast.priors import GaussianMixturePrior, GaussianPrior
from dps_fast.schedule import NoiseSchedule

F64 = torch.float64


# ---- helpers -----------------------------------------------------------------------------------
def _spd(d: int, g: torch.Generator, lo: float = 0.3, hi: float = 2.0) -> torch.Tensor:
    """A random SPD ``[d, d]`` with eigenvalues in ``[lo, hi]`` and a random (non-diagonal) basis."""
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=F64, generator=g))
    lam = lo + (hi - lo) * torch.rand(d, dtype=F64, generator=g)
    return (q * lam) @ q.T


def _mixture(k: int, d: int, g: torch.Generator, spread: float = 2.0) -> GaussianMixturePrior:
    w = torch.rand(k, dtype=F64, generator=g) + 0.3
    means = spread * torch.randn(k, d, dtype=F64, generator=g)
    covs = torch.stack([_spd(d, g) for _ in range(k)])
    return GaussianMixturePrior(w / w.sum(), means, covs)


def _ref_abar() -> torch.Tensor:
    """``[1000]`` alpha-bar of the DDPM linear schedule, computed here rather than read from the schedule."""
    return torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), dim=0)


def _schedule_and_t(b: int, g: torch.Generator) -> tuple[NoiseSchedule, torch.Tensor]:
    """A respaced schedule (so ``t`` are original training indices) and ``b`` distinct such ``t``."""
    sched = NoiseSchedule.linear(1000).respace(50)
    pick = torch.randperm(sched.num_steps, generator=g)[:b]
    return sched, sched.timesteps[pick]


def _noised(prior: GaussianMixturePrior, t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``[B, 1, d]`` draws of ``x_t`` (realistic inputs, where the responsibilities are mixed)."""
    abar = _ref_abar()[t].view(-1, 1, 1)
    x0 = prior.sample(t.numel(), generator=g)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn(x0.shape, dtype=F64, generator=g)


def _mixture_log_marginal(prior: GaussianMixturePrior, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """``[B]`` log p_t(x) of the explicit noised mixture, ``x [B, d]``, ``abar [B]``."""
    d = prior.dim
    ab = abar.view(-1, 1, 1)
    loc = ab.sqrt() * prior.means  # [B, K, d]
    cov = ab.unsqueeze(-1) * prior.covs + (1 - ab).unsqueeze(-1) * torch.eye(d, dtype=F64)  # [B, K, d, d]
    logp = MultivariateNormal(loc, covariance_matrix=cov).log_prob(x.unsqueeze(1))  # [B, K]
    return torch.logsumexp(prior.weights.log() + logp, dim=-1)


def _assert_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """``|actual - expected| <= rel * max|expected|`` elementwise (a relative bound on the whole tensor)."""
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} exceeds {rel:g} x max|expected| = {rel * scale:.3g}"


# ---- 1. eps against brute force ----------------------------------------------------------------
@pytest.mark.parametrize("d,b", [(1, 7), (5, 9), (16, 33)], ids=["d1-b7", "d5-b9", "d16-b33"])
def test_gaussian_eps_matches_linear_solve(d: int, b: int) -> None:
    g = torch.Generator().manual_seed(100 + d)
    mu = torch.randn(d, dtype=F64, generator=g)
    cov = _spd(d, g)
    prior = GaussianPrior(mu, cov)
    sched, t = _schedule_and_t(b, g)
    x = torch.randn(b, 1, d, dtype=F64, generator=g) * 2.0
    eps = prior.eps_model(sched)(x, t)

    abar = _ref_abar()[t].view(-1, 1, 1)
    c_t = abar * cov + (1 - abar) * torch.eye(d, dtype=F64)  # [B, d, d]
    ref = (1 - abar).sqrt().squeeze(-1) * torch.linalg.solve(c_t, (x[:, 0] - abar.sqrt().squeeze(-1) * mu))
    assert eps.shape == (b, 1, d) and eps.dtype == F64
    _assert_rel(eps[:, 0], ref, 1e-10)


@pytest.mark.parametrize("k,d,b", [(2, 1, 7), (3, 2, 9), (4, 6, 31)], ids=["k2-d1", "k3-d2", "k4-d6"])
def test_mixture_eps_matches_autograd_score(k: int, d: int, b: int) -> None:
    g = torch.Generator().manual_seed(200 + 10 * k + d)
    prior = _mixture(k, d, g)
    sched, t = _schedule_and_t(b, g)
    x = _noised(prior, t, g)
    eps = prior.eps_model(sched)(x, t)

    abar = _ref_abar()[t]
    xr = x[:, 0].clone().requires_grad_()
    score = torch.autograd.grad(_mixture_log_marginal(prior, xr, abar).sum(), xr)[0]
    ref = -(1 - abar).sqrt().unsqueeze(-1) * score
    _assert_rel(eps[:, 0], ref, 1e-10)

    # The inputs must exercise the mixing, else this is only the Gaussian test again.
    with torch.no_grad():
        ab = abar.view(-1, 1, 1)
        cov = ab.unsqueeze(-1) * prior.covs + (1 - ab).unsqueeze(-1) * torch.eye(d, dtype=F64)
        lp = prior.weights.log() + MultivariateNormal(ab.sqrt() * prior.means, cov).log_prob(x[:, :1])
        resp = torch.softmax(lp, dim=-1)
    assert (resp.max(-1).values < 0.9).any(), "test inputs do not mix the components"


def test_gaussian_eps_gradient_is_exact() -> None:
    """d<eps(x), v>/dx = sqrt(1 - abar) C_t^{-1} v (C_t symmetric): checks the autograd path."""
    g = torch.Generator().manual_seed(300)
    d, b = 6, 11
    cov = _spd(d, g)
    prior = GaussianPrior(torch.randn(d, dtype=F64, generator=g), cov)
    sched, t = _schedule_and_t(b, g)
    x = torch.randn(b, 1, d, dtype=F64, generator=g).requires_grad_()
    v = torch.randn(b, 1, d, dtype=F64, generator=g)
    (grad,) = torch.autograd.grad((prior.eps_model(sched)(x, t) * v).sum(), x)
    abar = _ref_abar()[t].view(-1, 1, 1)
    c_t = abar * cov + (1 - abar) * torch.eye(d, dtype=F64)
    ref = (1 - abar).sqrt().squeeze(-1) * torch.linalg.solve(c_t, v[:, 0])
    _assert_rel(grad[:, 0], ref, 1e-10)


def test_mixture_eps_gradient_matches_hessian() -> None:
    """VJP of eps equals -sqrt(1 - abar) H v, H the autograd Hessian of the explicit log-marginal."""
    g = torch.Generator().manual_seed(301)
    k, d, b = 3, 4, 13
    prior = _mixture(k, d, g)
    sched, t = _schedule_and_t(b, g)
    x = _noised(prior, t, g).requires_grad_()
    v = torch.randn(b, 1, d, dtype=F64, generator=g)
    (grad,) = torch.autograd.grad((prior.eps_model(sched)(x, t) * v).sum(), x)

    abar = _ref_abar()[t]
    xr = x.detach()[:, 0].clone().requires_grad_()
    (score,) = torch.autograd.grad(_mixture_log_marginal(prior, xr, abar).sum(), xr, create_graph=True)
    (hv,) = torch.autograd.grad((score * v[:, 0]).sum(), xr)
    ref = -(1 - abar).sqrt().unsqueeze(-1) * hv
    _assert_rel(grad[:, 0], ref, 1e-9)


def test_eps_float32_in_float32_out() -> None:
    g = torch.Generator().manual_seed(400)
    prior = _mixture(3, 5, g)
    sched, t = _schedule_and_t(17, g)
    x32 = _noised(prior, t, g).to(torch.float32)
    eps_fn = prior.eps_model(sched)
    x_in = x32.clone().requires_grad_()
    eps32 = eps_fn(x_in, t)
    eps32.sum().backward()
    assert eps32.dtype == torch.float32 and x_in.grad is not None and x_in.grad.dtype == torch.float32
    # Computed in float64 from the same (float32) input, then rounded once: error ~ 1 float32 ulp.
    eps64 = eps_fn(x32.to(F64), t)
    _assert_rel(eps32.to(F64), eps64, 4 * torch.finfo(torch.float32).eps)


def test_eps_accepts_scalar_t_and_other_schedules() -> None:
    g = torch.Generator().manual_seed(401)
    prior = _mixture(2, 3, g)
    sched = NoiseSchedule.cosine(200)
    x = torch.randn(5, 1, 3, dtype=F64, generator=g)
    eps_fn = prior.eps_model(sched)
    t = torch.full((5,), 123, dtype=torch.int64)
    torch.testing.assert_close(eps_fn(x, 123), eps_fn(x, t), rtol=0, atol=0)
    abar = sched.base_alphas_cumprod[123].expand(5)
    xr = x[:, 0].clone().requires_grad_()
    score = torch.autograd.grad(_mixture_log_marginal(prior, xr, abar).sum(), xr)[0]
    _assert_rel(eps_fn(x, t)[:, 0], -(1 - abar).sqrt().unsqueeze(-1) * score, 1e-10)


# ---- 2. Tweedie ----------------------------------------------------------------------------------
def test_gaussian_tweedie_is_exact_posterior_mean() -> None:
    g = torch.Generator().manual_seed(500)
    d, b = 7, 15
    mu = torch.randn(d, dtype=F64, generator=g)
    cov = _spd(d, g)
    prior = GaussianPrior(mu, cov)
    sched, t = _schedule_and_t(b, g)
    x = _noised(prior, t, g)
    eps = prior.eps_model(sched)(x, t)
    abar = _ref_abar()[t].view(-1, 1, 1)
    x0hat = (x - (1 - abar).sqrt() * eps) / abar.sqrt()

    # E[x0 | x_t] = mu + sqrt(abar) Sigma C_t^{-1} (x_t - sqrt(abar) mu) (Gaussian conditioning).
    c_t = abar * cov + (1 - abar) * torch.eye(d, dtype=F64)
    sa = abar.sqrt().squeeze(-1)
    ref = mu + sa * (cov @ torch.linalg.solve(c_t, x[:, 0] - sa * mu).unsqueeze(-1)).squeeze(-1)
    _assert_rel(x0hat[:, 0], ref, 1e-10)


@pytest.mark.parametrize("t_index", [5, 300, 900], ids=["t5", "t300", "t900"])
def test_mixture_tweedie_equals_posterior_of_noising_channel(t_index: int) -> None:
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) e is a linear-Gaussian observation: Tweedie's x0hat must be
    posterior(A = sqrt(abar) I, y = x_t, sigma_n = sqrt(1 - abar)).mean, an independent code path."""
    g = torch.Generator().manual_seed(600 + t_index)
    d, b = 3, 8
    prior = _mixture(3, d, g)
    sched = NoiseSchedule.linear(1000)
    t = torch.full((b,), t_index, dtype=torch.int64)
    x = _noised(prior, t, g)
    ab = float(_ref_abar()[t_index])
    x0hat = (x - math.sqrt(1 - ab) * prior.eps_model(sched)(x, t)) / math.sqrt(ab)
    post = prior.posterior(math.sqrt(ab) * torch.eye(d, dtype=F64), x, math.sqrt(1 - ab))
    # x0hat divides by sqrt(abar) = 0.10 at t=900, amplifying the eps rounding ~10x; still < 1e-12.
    _assert_rel(x0hat[:, 0], post.mean, 1e-10)


# ---- 3. posterior against brute force ------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 5, 8], ids=["m1-underdetermined", "m5-square", "m8-overdetermined"])
def test_gaussian_posterior_matches_information_form(m: int) -> None:
    g = torch.Generator().manual_seed(700 + m)
    d, b, s = 5, 4, 0.3
    mu = torch.randn(d, dtype=F64, generator=g)
    cov = _spd(d, g)
    a = torch.randn(m, d, dtype=F64, generator=g)
    y = torch.randn(b, 1, m, dtype=F64, generator=g)
    post = GaussianPrior(mu, cov).posterior(a, y, s)

    prec = torch.linalg.inv(cov) + a.T @ a / s**2
    cov_ref = torch.linalg.inv(prec)
    mean_ref = (cov_ref @ (torch.linalg.solve(cov, mu).unsqueeze(-1) + a.T @ y[:, 0].unsqueeze(-1) / s**2)).squeeze(-1)
    # Both forms are backward-stable solves of a system with condition number < 1e3 here: ~1e-13.
    _assert_rel(post.mean, mean_ref, 1e-10)
    _assert_rel(post.cov, cov_ref.expand(b, d, d), 1e-10)
    _assert_rel(post.covs[0], cov_ref, 1e-10)
    torch.testing.assert_close(post.weights, torch.ones(b, 1, dtype=F64), rtol=0, atol=1e-15)
    assert post.means.shape == (b, 1, d)


@pytest.mark.parametrize("m", [1, 2], ids=["m1", "m2"])
def test_mixture_posterior_matches_grid_quadrature(m: int) -> None:
    """Moments and component weights of p(x0 | y) ∝ sum_k pi_k N(x0; mu_k, Sigma_k) N(y; A x0, s^2 I)
    by the rectangle rule on a 2-D grid.

    Tolerance: for an analytic integrand whose narrowest Gaussian factor has std sigma_min, the
    rectangle rule's error is ~exp(-2 pi^2 sigma_min^2 / h^2) (Poisson summation). Here the posterior
    component covariances have eigenvalues >= (1/0.3 + |A|^2/s^2)^{-1} > 0.04 (sigma_min > 0.2)
    and h = 0.03, so that term is < e^-800; truncating at 10 prior std beyond every mean drops
    < e^-50 of the mass. What is left is float64 round-off of ~1e6-term sums, ~1e-13: 1e-9 leaves
    margin yet catches any formula error (a wrong weight or gain moves the moments by >= 1e-3).
    """
    g = torch.Generator().manual_seed(800 + m)
    d, k, b, s = 2, 3, 3, 0.5
    prior = GaussianMixturePrior(
        torch.tensor([0.2, 0.5, 0.3], dtype=F64),
        torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], dtype=F64),
        torch.stack([_spd(d, g, 0.3, 1.5) for _ in range(k)]),
    )
    a = torch.randn(m, d, dtype=F64, generator=g)
    a = a / torch.linalg.matrix_norm(a, ord=2)  # |A| = 1
    x0 = prior.sample(b, generator=g)[:, 0]
    y = (x0 @ a.T + s * torch.randn(b, m, dtype=F64, generator=g)).unsqueeze(1)
    post = prior.posterior(a, y, s)

    h, reach = 0.03, 10.0 * math.sqrt(1.5)
    lo = prior.means.min(0).values - reach
    hi = prior.means.max(0).values + reach
    axes = [torch.arange(float(lo[i]), float(hi[i]) + h, h, dtype=F64) for i in range(d)]
    grid = torch.cartesian_prod(*axes)  # [P, 2]
    log_prior_k = prior.weights.log() + torch.stack(
        [MultivariateNormal(prior.means[j], prior.covs[j]).log_prob(grid) for j in range(k)], dim=-1
    )  # [P, K]
    resid = y[:, 0].unsqueeze(1) - grid @ a.T  # [B, P, m]
    log_lik = -0.5 * resid.square().sum(-1) / s**2  # [B, P], constants cancel on normalising
    log_joint_k = log_prior_k.unsqueeze(0) + log_lik.unsqueeze(-1)  # [B, P, K]
    shift = log_joint_k.amax(dim=(1, 2), keepdim=True)
    mass_k = (log_joint_k - shift).exp()  # [B, P, K]
    mass = mass_k.sum(-1)  # [B, P]
    z = mass.sum(-1, keepdim=True)
    p = mass / z
    weights_ref = mass_k.sum(1) / z
    mean_ref = p @ grid  # [B, 2]
    dev = grid.unsqueeze(0) - mean_ref.unsqueeze(1)  # [B, P, 2]
    cov_ref = torch.einsum("bp,bpi,bpj->bij", p, dev, dev)

    assert (weights_ref.max(-1).values < 0.99).any(), "test measurements do not leave the posterior multimodal"
    _assert_rel(post.weights, weights_ref, 1e-9)
    _assert_rel(post.mean, mean_ref, 1e-9)
    _assert_rel(post.cov, cov_ref, 1e-9)


# ---- 4. sampling --------------------------------------------------------------------------------
def _assert_moments(draws: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> None:
    """``draws [n, d]`` against the exact ``mean [d]``, ``cov [d, d]`` with 5-sigma bounds.

    Sample mean: coordinate i has standard error sqrt(cov_ii / n) (known cov), bound 5 of them.
    Sample covariance centred at the *known* mean is an average of n iid products
    v_ij = (x_i - m_i)(x_j - m_j) with expectation cov_ij, so its standard error is sd(v_ij)/sqrt(n);
    sd(v_ij) is estimated from the same draws (its relative error ~1/sqrt(2n) < 1% at n = 20000)
    because the 4th moments of a mixture are not the Gaussian ones. Bound: 5 standard errors.
    Each bound is exceeded by chance with probability ~6e-7, so with the fixed seeds a failure
    means a wrong distribution.
    """
    n = draws.shape[0]
    se_mean = (torch.diagonal(cov) / n).sqrt()
    err_mean = draws.mean(0) - mean
    assert (err_mean.abs() <= 5 * se_mean).all(), f"mean off by {err_mean}, 5 se = {5 * se_mean}"
    c = draws - mean
    prods = c.unsqueeze(-1) * c.unsqueeze(-2)  # [n, d, d]
    se_cov = prods.std(0) / math.sqrt(n)
    err_cov = prods.mean(0) - cov
    assert (err_cov.abs() <= 5 * se_cov).all(), f"cov off by {err_cov}, 5 se = {5 * se_cov}"


def test_posterior_sample_moments() -> None:
    g = torch.Generator().manual_seed(900)
    d, k, b, n = 3, 3, 2, 20000
    prior = _mixture(k, d, g, spread=2.5)
    a = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)  # observe one coordinate: the others stay multimodal
    y = (prior.sample(b, generator=g)[:, :, :1] + 0.1 * torch.randn(b, 1, 1, dtype=F64, generator=g))
    post = prior.posterior(a, y, 0.1)
    assert (post.weights.max(-1).values < 0.95).any(), "posterior not multimodal: test would miss weight errors"
    draws = post.sample(n, generator=torch.Generator().manual_seed(1))
    assert draws.shape == (b, n, 1, d) and draws.dtype == F64
    for i in range(b):
        _assert_moments(draws[i, :, 0], post.mean[i], post.cov[i])
    again = post.sample(n, generator=torch.Generator().manual_seed(1))
    assert torch.equal(draws, again)


def test_prior_sample_moments() -> None:
    g = torch.Generator().manual_seed(901)
    prior = _mixture(3, 4, g)
    draws = prior.sample(20000, generator=torch.Generator().manual_seed(2))
    assert draws.shape == (20000, 1, 4) and draws.dtype == F64
    mean = prior.weights @ prior.means
    spread = prior.means - mean
    cov = torch.einsum("k,kij->ij", prior.weights, prior.covs)
    cov = cov + torch.einsum("k,ki,kj->ij", prior.weights, spread, spread)
    _assert_moments(draws[:, 0], mean, cov)


# ---- 5. validation ------------------------------------------------------------------------------
def _bad_calls() -> list[tuple[str, object]]:
    eye3 = torch.eye(3, dtype=F64)
    gp = GaussianPrior(torch.zeros(3), eye3)
    mix = GaussianMixturePrior([0.5, 0.5], torch.zeros(2, 3), eye3.expand(2, 3, 3))
    eps = gp.eps_model(NoiseSchedule.linear(100))
    y = torch.zeros(4, 1, 2)
    a = torch.zeros(2, 3)
    asym = eye3.clone()
    asym[0, 1] = 0.5
    indef = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=F64))
    singular = torch.diag(torch.tensor([1.0, 0.0, 1.0], dtype=F64))
    return [
        ("mean", lambda: GaussianPrior(torch.zeros(1, 3), eye3)),
        ("cov", lambda: GaussianPrior(torch.zeros(3), torch.eye(4))),
        ("cov", lambda: GaussianPrior(torch.zeros(3), asym)),
        ("cov", lambda: GaussianPrior(torch.zeros(3), indef)),
        ("cov", lambda: GaussianPrior(torch.zeros(3), singular)),
        ("weights", lambda: GaussianMixturePrior([0.5, 0.4], torch.zeros(2, 3), eye3.expand(2, 3, 3))),
        ("weights", lambda: GaussianMixturePrior([1.5, -0.5], torch.zeros(2, 3), eye3.expand(2, 3, 3))),
        ("weights", lambda: GaussianMixturePrior([[1.0]], torch.zeros(1, 3), eye3.expand(1, 3, 3))),
        ("means", lambda: GaussianMixturePrior([0.5, 0.5], torch.zeros(3, 3), eye3.expand(2, 3, 3))),
        ("covs", lambda: GaussianMixturePrior([0.5, 0.5], torch.zeros(2, 3), eye3.expand(3, 3, 3))),
        ("covs", lambda: GaussianMixturePrior([0.5, 0.5], torch.zeros(2, 3), torch.stack([eye3, indef]))),
        ("A", lambda: mix.posterior(torch.zeros(2, 4), y, 0.1)),
        ("A", lambda: mix.posterior(torch.zeros(3), y, 0.1)),
        ("y", lambda: mix.posterior(a, torch.zeros(4, 1, 3), 0.1)),
        ("y", lambda: mix.posterior(a, torch.zeros(4, 2), 0.1)),
        ("sigma_n", lambda: gp.posterior(a, y, 0.0)),
        ("sigma_n", lambda: gp.posterior(a, y, -1.0)),
        ("sigma_n", lambda: gp.posterior(a, y, float("nan"))),
        ("x_t", lambda: eps(torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64))),
        ("t", lambda: eps(torch.zeros(4, 1, 3), torch.zeros(5, dtype=torch.int64))),
        ("n", lambda: mix.sample(0)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_invalid_input_raises_value_error_naming_argument(case: int) -> None:
    name, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=rf"^{name}: expected .+ got "):
        call()


def test_invalid_types_raise_type_error() -> None:
    eps = GaussianPrior(torch.zeros(3), torch.eye(3)).eps_model(NoiseSchedule.linear(100))
    with pytest.raises(TypeError, match=r"^t: "):
        eps(torch.zeros(2, 1, 3), torch.zeros(2))
    with pytest.raises(TypeError, match=r"^schedule: "):
        GaussianPrior(torch.zeros(3), torch.eye(3)).eps_model(object())
    with pytest.raises(TypeError, match=r"^cov: "):
        GaussianPrior(torch.zeros(3), torch.eye(3, dtype=torch.complex128))


def test_weights_within_tolerance_are_accepted_and_renormalised() -> None:
    p = GaussianMixturePrior([0.5, 0.5 + 5e-7], torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2))
    assert abs(float(p.weights.sum()) - 1.0) < 1e-15
    assert p.weights.dtype == F64 and p.means.dtype == F64 and p.covs.dtype == F64
