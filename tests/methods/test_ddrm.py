"""DDRM: one step and x_T equal the paper's spectral formulas written with a dense SVD; with nothing
measured DDRM is the unconditional DDIM-type sampler, written out here as its own loop."""

import math

import pytest
import torch

from dps_fast import NoiseSchedule, operators
from dps_fast.methods import DDRM
from dps_fast.noise import STREAM_INIT, STREAM_STEP, philox_normal
from dps_fast.schedule import Coef
from tests.conftest import rel_err
from tests.methods._dense import F64, OPERATORS, real_matrix, real_rows, setup, svd, ut

S = 2


def _sigma(sched, i):
    if i < 0:
        return 1.0, 0.0
    a = sched.coef(i, Coef.SQRT_ABAR) ** 2
    return math.sqrt(a), math.sqrt((1 - a) / a)


def _ddrm_step_by_formula(net, sched, M, y_rows, x_t, noise, i, eta, eta_b, sy, rcond):
    n = x_t.shape[0]
    sa, sig_t = _sigma(sched, i)
    sa_next, sig = _sigma(sched, i - 1)
    e = net(x_t, sched.timesteps[i].expand(n))
    x0 = (x_t - math.sqrt(1 - sa**2) * e) / sa
    U, s, V = svd(M, rcond)
    c0, ce, cz = (v.reshape(n, -1) @ V for v in (x0, e, noise))
    uty = ut(U, y_rows, s)
    out = torch.empty_like(c0)
    for j in range(s.numel()):  # coordinate by coordinate, as the paper's cases read
        sj = float(s[j])
        if sj == 0:
            out[:, j] = c0[:, j] + math.sqrt(1 - eta**2) * sig * ce[:, j] + eta * sig * cz[:, j]
        elif sj * sig > sy:
            out[:, j] = (eta_b * uty[:, j] / sj + (1 - eta_b) * c0[:, j]
                         + math.sqrt(max(sig**2 - sy**2 * eta_b**2 / sj**2, 0.0)) * cz[:, j])
        else:
            out[:, j] = (c0[:, j] + math.sqrt(1 - eta**2) * sig * (uty[:, j] - sj * c0[:, j]) / sy
                         + eta * sig * cz[:, j])
    return (sa_next * out @ V.T).reshape(x_t.shape), x0


@pytest.mark.parametrize("eta,eta_b,sigma_n", [(0.85, 1.0, 0.05), (0.3, 0.6, 0.4), (1.0, 1.0, 0.0)],
                         ids=["paper", "mixed", "noiseless"])
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_step_equals_formula(name, eta, eta_b, sigma_n):
    A, net, y, x_t, noise, _ = setup(name, samples=S)
    sched = NoiseSchedule.linear(1000).respace(10)
    ddrm = DDRM(net, sched, A, eta=eta, eta_b=eta_b, sigma_n=sigma_n, backend="torch")
    M = real_matrix(A, x_t.shape[1:])
    y_rows = real_rows(y).repeat_interleave(S, 0)
    for i in (9, 3, 1):  # early steps take the "before" case for some coordinates, late ones "after"
        x_next, x0hat = ddrm.step(x_t, i, y, noise, num_samples=S)
        want, x0 = _ddrm_step_by_formula(net, sched, M, y_rows, x_t, noise, i, eta, eta_b, sigma_n, ddrm.rcond)
        torch.testing.assert_close(x0hat, x0, rtol=1e-11, atol=1e-12)
        assert rel_err(x_next, want) < 1e-11, i


@pytest.mark.parametrize("name", ["inpaint", "blur1d", "superres2d", "matrix"])
def test_x_T_is_q_of_x_T_given_y(name):
    """x_T = sqrt(abar_T) V c_T, c_T = ybar + sqrt(sigma_T^2 - sigma_y^2/s^2) z where s sigma_T >
    sigma_y, else sigma_T z, z = V^T of the Philox x_T stream (read off the network's first input)."""
    A, net, y, *_ = setup(name, samples=S)
    K, sy = 6, 0.05
    sched = NoiseSchedule.linear(1000).respace(K)
    seen = []

    def spy(x, t):
        if x.shape[0] == y.shape[0] * S and not seen:
            seen.append(x.detach().clone())
        return net(x, t)

    res = DDRM(spy, sched, A, sigma_n=sy, backend="torch").sample(y, num_samples=S, seed=11)
    x_T = seen[0]
    n = x_T.shape[0]
    M = real_matrix(A, x_T.shape[1:])
    U, s, V = svd(M, 1e-3)
    sa, sig = _sigma(sched, K - 1)
    z = philox_normal(res.seeds.flatten(), x_T[0].numel(), K, STREAM_INIT, F64) @ V
    uty = ut(U, real_rows(y).repeat_interleave(S, 0), s)
    big = s * sig > sy
    s_safe = torch.where(s > 0, s, torch.ones_like(s))
    c = torch.where(big, uty / s_safe + (sig**2 - (sy / s_safe) ** 2).clamp_min(0).sqrt() * z, sig * z)
    assert rel_err(x_T, (sa * c @ V.T).reshape(x_T.shape)) < 1e-12


def test_nothing_measured_is_the_unconditional_ddim_sampler():
    A = operators.Inpainting(torch.zeros(3, 5, 7, dtype=F64))
    _, net, y, *_ = setup("inpaint", samples=3)
    K, eta = 7, 0.85
    sched = NoiseSchedule.linear(1000).respace(K)
    res = DDRM(net, sched, A, eta=eta, sigma_n=0.05, backend="torch").sample(y, num_samples=3, seed=5)
    seeds = res.seeds.flatten()
    numel = 3 * 5 * 7
    abar = [sched.coef(i, Coef.SQRT_ABAR) ** 2 for i in range(K)]
    x = math.sqrt(1 - abar[-1]) * philox_normal(seeds, numel, K, STREAM_INIT, F64).view(-1, 3, 5, 7)
    for i in range(K - 1, -1, -1):
        e = net(x, sched.timesteps[i].expand(x.shape[0]))
        x0 = (x - math.sqrt(1 - abar[i]) * e) / math.sqrt(abar[i])
        if i == 0:
            break
        z = philox_normal(seeds, numel, i, STREAM_STEP, F64).view_as(x)
        x = math.sqrt(abar[i - 1]) * x0 + math.sqrt(1 - abar[i - 1]) * (math.sqrt(1 - eta**2) * e + eta * z)
    assert rel_err(res.samples.flatten(0, 1), x0) < 1e-12
    assert res.nfe == K


@pytest.mark.parametrize("kw,msg", [
    (dict(eta=1.5), r"eta: expected a float in \[0.0, 1.0\], got 1.5"),
    (dict(eta_b=-0.1), "eta_b: expected"),
    (dict(sigma_n=-1.0), "sigma_n: expected"),
    (dict(rcond="x"), "rcond: expected"),
])
def test_bad_arguments_are_named(kw, msg):
    A, net, *_ = setup("identity")
    with pytest.raises(ValueError, match=msg):
        DDRM(net, NoiseSchedule.linear(1000).respace(4), A, **kw)
