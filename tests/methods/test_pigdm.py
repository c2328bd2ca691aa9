"""PiGDM: one step equals its formula written out with dense matrices and autograd; with A = I and
a Gaussian prior the step is an explicit affine map, and the chain's Gaussian law (propagated in
closed form) is what the sampler draws; the fused Triton update gives the torch backend's chain."""

import math

import pytest
import torch

from dps_fast import NoiseSchedule, operators, priors
from dps_fast.methods import PiGDM
from dps_fast.schedule import Coef
from tests.conftest import rel_err
from tests.methods._dense import F64, OPERATORS, real_matrix, real_rows, setup, svd, ut

S = 2


def _pigdm_step_by_formula(net, sched, M, y_rows, x_t, noise, i, zeta, sigma_n, clip, rcond):
    """x_{t-1} = COEF_X0 x0 + COEF_XT x + sigma z + zeta COEF_X0 (1 - abar)/sqrt(abar) (dx0/dx)^T h,
    h = V diag(s / (r^2 s^2 + sigma_n^2)) U^T (y - M x0), r^2 = 1 - abar (dense SVD of M)."""
    c = lambda k: sched.coef(i, k)  # noqa: E731
    n = x_t.shape[0]
    abar = c(Coef.SQRT_ABAR) ** 2
    xin = x_t.clone().requires_grad_(True)
    x0 = c(Coef.SQRT_RECIP_ABAR) * xin - c(Coef.SQRT_RECIPM1_ABAR) * net(xin, sched.timesteps[i].expand(n))
    if clip is not None:
        x0 = x0.clamp(*clip)
    U, s, V = svd(M, rcond)
    gain = torch.where(s > 0, s / ((1 - abar) * s**2 + sigma_n**2).clamp_min(1e-300), torch.zeros_like(s))
    resid = ut(U, y_rows, s) - s * (x0.detach().reshape(n, -1) @ V)
    h = ((gain * resid) @ V.T).reshape(x_t.shape)
    (g,) = torch.autograd.grad((x0 * h).sum(), xin)
    x0 = x0.detach()
    scale = zeta * c(Coef.COEF_X0) * (1 - abar) / math.sqrt(abar)
    return c(Coef.COEF_X0) * x0 + c(Coef.COEF_XT) * x_t + c(Coef.SIGMA_SMALL) * noise + scale * g, x0, h


@pytest.mark.parametrize("sigma_n,clip", [(0.1, None), (0.0, (-0.7, 0.7))], ids=["noisy", "noiseless-clip"])
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_step_equals_formula(name, sigma_n, clip):
    A, net, y, x_t, noise, _ = setup(name, samples=S)
    sched = NoiseSchedule.linear(1000).respace(10)
    i, zeta = 6, 0.7
    pig = PiGDM(net, sched, A, zeta=zeta, sigma_n=sigma_n, clip_x0=clip, backend="torch")
    x_next, x0hat = pig.step(x_t, i, y, noise, num_samples=S)
    M = real_matrix(A, x_t.shape[1:])
    want, x0, h = _pigdm_step_by_formula(net, sched, M, real_rows(y).repeat_interleave(S, 0), x_t, noise, i,
                                         zeta, sigma_n, clip, pig.rcond)
    torch.testing.assert_close(x0hat, x0, rtol=1e-12, atol=1e-12)
    assert rel_err(x_next, want) < 1e-11
    assert float(h.norm()) > 1e-3  # the guidance is not vacuous


def test_noiseless_guidance_is_the_pseudo_inverse_over_r2():
    """sigma_n = 0: h = (A^+ y - A^+ A x0hat) / r_t^2, the paper's form (torch.linalg.pinv here)."""
    A, net, y, x_t, noise, _ = setup("matrix", samples=S)
    sched = NoiseSchedule.linear(1000).respace(10)
    i = 4
    pig = PiGDM(net, sched, A, zeta=1.0, sigma_n=0.0, rcond=0.0, backend="torch")
    x_next, x0hat = pig.step(x_t, i, y, noise, num_samples=S)
    M = real_matrix(A, x_t.shape[1:])
    n = x_t.shape[0]
    r2 = 1 - sched.coef(i, Coef.SQRT_ABAR) ** 2
    P = torch.linalg.pinv(M)
    h = ((real_rows(y).repeat_interleave(S, 0) - x0hat.reshape(n, -1) @ M.T) @ P.T / r2).reshape(x_t.shape)
    want, *_ = _pigdm_step_by_formula(net, sched, M, real_rows(y).repeat_interleave(S, 0), x_t, noise, i,
                                      1.0, 0.0, None, 0.0)
    assert rel_err(x_next, want) < 1e-11
    # and the same h written as A^T (r^2 A A^T)^{-1} (y - A x0hat) for this full-row-rank A
    h2 = ((real_rows(y).repeat_interleave(S, 0) - x0hat.reshape(n, -1) @ M.T)
          @ torch.linalg.solve(r2 * M @ M.T, M)).reshape(x_t.shape)
    assert rel_err(h2, h) < 1e-10


def _gaussian_setup(d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
    cov = Q @ torch.diag(torch.linspace(0.2, 1.5, d, dtype=F64)) @ Q.T
    mean = 0.5 * torch.randn(d, generator=g, dtype=F64)
    prior = priors.GaussianPrior(mean, cov)
    y = (prior.sample(1, generator=g) + 0.3 * torch.randn(1, 1, d, generator=g, dtype=F64))
    return prior, y


def _affine_step(prior, sched, i, y, sigma_n, zeta):
    """PiGDM's step for A = I and the prior N(mu, C) in closed form: x_{t-1} = T x + b + sigma z.

    Tweedie: x0hat = mu + G (x - sqrt(abar) mu), G = sqrt(abar) C (abar C + (1 - abar) I)^{-1},
    d x0hat / dx = G, h = (y - x0hat) / (r^2 + sigma_n^2)."""
    mu, C = prior.mean, prior.cov
    d = mu.numel()
    c = lambda k: sched.coef(i, k)  # noqa: E731
    abar = c(Coef.SQRT_ABAR) ** 2
    eye = torch.eye(d, dtype=F64)
    G = math.sqrt(abar) * C @ torch.linalg.inv(abar * C + (1 - abar) * eye)
    k = zeta * c(Coef.COEF_X0) * (1 - abar) / math.sqrt(abar) / ((1 - abar) + sigma_n**2)
    off = mu - math.sqrt(abar) * G @ mu  # x0hat = off + G x
    T = c(Coef.COEF_X0) * G + c(Coef.COEF_XT) * eye - k * G.T @ G
    b = c(Coef.COEF_X0) * off + k * G.T @ (y.reshape(d) - off)
    return T, b, c(Coef.SIGMA_SMALL), G, off


def test_identity_gaussian_step_is_its_closed_form():
    prior, y = _gaussian_setup()
    sched = NoiseSchedule.linear(1000).respace(25)
    sigma_n, zeta = 0.3, 0.8
    pig = PiGDM(prior.eps_model(sched), sched, operators.Identity(), zeta=zeta, sigma_n=sigma_n, backend="torch")
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(2, 3, 1, 5, generator=g, dtype=F64)
    for i in (24, 12, 1):
        T, b, sig, G, off = _affine_step(prior, sched, i, y, sigma_n, zeta)
        x_next, x0hat = pig.step(x, i, y, z, num_samples=3)
        torch.testing.assert_close(x0hat[:, 0], off + x[:, 0] @ G.T, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(x_next[:, 0], x[:, 0] @ T.T + b + sig * z[:, 0], rtol=1e-10, atol=1e-12)


def test_identity_gaussian_chain_samples_its_closed_form_law():
    """The chain is linear-Gaussian: propagate mean m and covariance P through x -> T x + b + sig z
    and compare with 4000 samples. Thresholds are sampling-error bounds: n (m_hat - m)^T P^{-1}
    (m_hat - m) ~ chi^2_5 (P(> 25) ~ 1e-4); the covariance error's rms is
    sqrt((tr(P)^2 + tr(P^2)) / n) and we allow 4x."""
    prior, y = _gaussian_setup()
    K, n, sigma_n = 25, 4000, 0.3
    sched = NoiseSchedule.linear(1000).respace(K)
    res = PiGDM(prior.eps_model(sched), sched, operators.Identity(), sigma_n=sigma_n,
                backend="torch").sample(y, num_samples=n, seed=2)
    s = res.samples[0, :, 0]
    d = 5
    abar_T = sched.coef(K - 1, Coef.SQRT_ABAR) ** 2
    m, P = torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64)  # x_T ~ N(0, I), as DPS
    for i in range(K - 1, 0, -1):
        T, b, sig, _, _ = _affine_step(prior, sched, i, y, sigma_n, 1.0)
        m, P = T @ m + b, T @ P @ T.T + sig**2 * torch.eye(d, dtype=F64)
    _, _, _, G, off = _affine_step(prior, sched, 0, y, sigma_n, 1.0)
    m, P = off + G @ m, G @ P @ G.T
    dm = s.mean(0) - m
    assert n * float(dm @ torch.linalg.solve(P, dm)) < 25.0
    bound = 4 * math.sqrt((float(torch.trace(P)) ** 2 + float(torch.trace(P @ P))) / n)
    assert float((torch.cov(s.T) - P).norm()) < bound
    assert abar_T < 1e-4  # so x_T ~ N(0, I) is the right start to 1e-4


def test_fused_triton_update_gives_the_torch_chain():
    """PiGDM drives the backend's fused update (in-kernel Philox noise, negative gscale): the Triton
    backend (CPU interpreter here) and the torch backend give the same float64 chain."""
    pytest.importorskip("triton")
    A, net, y, *_ = setup("inpaint", samples=1)
    sched = NoiseSchedule.linear(1000).respace(4)
    out = {be: PiGDM(net, sched, A, zeta=0.5, sigma_n=0.1, clip_x0=(-1.0, 1.0), backend=be).sample(
        y, num_samples=2, seed=3, record="all") for be in ("torch", "triton")}
    for i in range(4):
        assert rel_err(out["triton"].trajectory[i], out["torch"].trajectory[i]) < 1e-10, i


def test_learned_range_variance_uses_the_networks_variance_channels():
    """A 2C-channel model: the noise std is exp(0.5 (f log beta + (1 - f) log beta~)), f = (v + 1)/2."""
    from dps_fast.methods import DDRM, MCG
    from tests.methods._dense import NearScoreEps
    from tests.nets import TinyEps

    net = NearScoreEps(TinyEps(2, 6, learn_sigma=True), NoiseSchedule.linear(1000).alphas_cumprod).double()
    A = operators.Inpainting.random((5, 4), 0.5, seed=2)
    g = torch.Generator().manual_seed(0)
    y = A(torch.randn(1, 2, 5, 4, generator=g, dtype=F64))
    x_t, z = torch.randn(2, 1, 2, 5, 4, generator=g, dtype=F64)
    sched = NoiseSchedule.linear(1000).respace(10)
    i = 5
    pig = PiGDM(net, sched, A, sigma_n=0.1, backend="torch")
    x_next, _ = pig.step(x_t, i, y, z)
    zero, _ = pig.step(x_t, i, y, torch.zeros_like(z))
    v = net(x_t, sched.timesteps[i].expand(1))[:, 2:]
    f = (v + 1) / 2
    std = torch.exp(0.5 * (f * sched.coef(i, Coef.LOG_BETA) + (1 - f) * sched.coef(i, Coef.LOG_VAR_SMALL)))
    assert rel_err(x_next - zero, std * z) < 1e-12
    for m in (pig, MCG(net, sched, A, zeta=0.01, sigma_n=0.1), DDRM(net, sched, A, sigma_n=0.1)):
        assert torch.isfinite(m.sample(y, num_samples=2, seed=0).samples).all()


def _public_step_by_formula(net, sched, M, y_rows, x_t, noise, i, zeta, sigma_n):
    """weighting="public", written out as the public code does it (RED-diff ``algos/pgdm.py``,
    ``awd=True``): the DDPM/DDIM(eta=1) update plus ``zeta sqrt(abar_{i-1} abar_i) J^T h_pub`` with
    ``h_pub = A^+ (y - A x0hat)`` (sigma_n = 0) or ``r^2 A^T (r^2 A A^T + sigma_n^2 I)^{-1} (y - A x0hat)``,
    by dense ``pinv``/``solve`` (no SVD, no clip)."""
    c = lambda k: sched.coef(i, k)  # noqa: E731
    n = x_t.shape[0]
    abar = c(Coef.SQRT_ABAR) ** 2
    abar_prev = sched.coef(i - 1, Coef.SQRT_ABAR) ** 2 if i > 0 else 1.0
    r2 = 1 - abar
    xin = x_t.clone().requires_grad_(True)
    x0 = c(Coef.SQRT_RECIP_ABAR) * xin - c(Coef.SQRT_RECIPM1_ABAR) * net(xin, sched.timesteps[i].expand(n))
    resid = y_rows - x0.detach().reshape(n, -1) @ M.T
    if sigma_n == 0:
        h = resid @ torch.linalg.pinv(M).T
    else:
        G = r2 * M @ M.T + sigma_n**2 * torch.eye(M.shape[0], dtype=M.dtype)
        h = r2 * torch.linalg.solve(G, resid.T).T @ M
    h = h.reshape(x_t.shape)
    (g,) = torch.autograd.grad((x0 * h).sum(), xin)
    x0 = x0.detach()
    uncond = c(Coef.COEF_X0) * x0 + c(Coef.COEF_XT) * x_t + c(Coef.SIGMA_SMALL) * noise
    return uncond + zeta * math.sqrt(abar_prev * abar) * g, x0


@pytest.mark.parametrize("i", [6, 0], ids=["i6", "last"])
@pytest.mark.parametrize("sigma_n", [0.0, 0.1], ids=["noiseless", "noisy"])
def test_public_weighting_step_equals_the_public_formula(sigma_n, i):
    A, net, y, x_t, noise, _ = setup("matrix", samples=S)
    sched = NoiseSchedule.linear(1000).respace(10)
    zeta = 0.7
    pig = PiGDM(net, sched, A, zeta=zeta, sigma_n=sigma_n, rcond=0.0, weighting="public", backend="torch")
    x_next, x0hat = pig.step(x_t, i, y, noise, num_samples=S)
    M = real_matrix(A, x_t.shape[1:])
    want, x0 = _public_step_by_formula(net, sched, M, real_rows(y).repeat_interleave(S, 0), x_t, noise, i,
                                       zeta, sigma_n)
    torch.testing.assert_close(x0hat, x0, rtol=1e-12, atol=1e-12)
    assert rel_err(x_next, want) < 1e-10
    # and it is not the default ("score") weighting: the two differ by more than rounding
    score, _ = PiGDM(net, sched, A, zeta=zeta, sigma_n=sigma_n, rcond=0.0, backend="torch").step(
        x_t, i, y, noise, num_samples=S)
    assert rel_err(score, want) > 1e-6


def test_weighting_is_checked():
    A, net, *_ = setup("identity")
    with pytest.raises(ValueError, match=r"weighting: expected one of \('score', 'public'\), got 'paper'"):
        PiGDM(net, NoiseSchedule.linear(1000).respace(4), A, weighting="paper")
