"""MCG: one step equals DPS's step written out by autograd followed by the dense projection;
the projection lands on the (noised) measurement set; blurs are refused by name."""

import math

import pytest
import torch

from dps_fast import NoiseSchedule, operators
from dps_fast.methods import MCG
from dps_fast.noise import STREAM_MEASUREMENT, philox_normal
from dps_fast.schedule import Coef
from tests.methods._dense import F64, OPERATORS, real_matrix, real_rows, setup

MCG_OPS = [n for n in sorted(OPERATORS) if not n.startswith("blur")]
S = 2


def _dps_step_by_autograd(net, sched, M, y_rows, x_t, noise, i, zeta, sigma_n, guidance, clip):
    c = lambda k: sched.coef(i, k)  # noqa: E731
    n = x_t.shape[0]
    xin = x_t.clone().requires_grad_(True)
    e = net(xin, sched.timesteps[i].expand(n))
    x0 = c(Coef.SQRT_RECIP_ABAR) * xin - c(Coef.SQRT_RECIPM1_ABAR) * e
    if clip is not None:
        x0 = x0.clamp(*clip)
    rn2 = (x0.reshape(n, -1) @ M.T - y_rows).square().sum(1)
    loss = zeta * rn2.sqrt() if guidance == "normalized" else zeta / (2 * sigma_n**2) * rn2
    (g,) = torch.autograd.grad(loss.sum(), xin)
    x0 = x0.detach()
    return c(Coef.COEF_X0) * x0 + c(Coef.COEF_XT) * x_t + c(Coef.SIGMA_SMALL) * noise - g, x0


@pytest.mark.parametrize("guidance,clip", [("squared", None), ("normalized", (-0.6, 0.6))])
@pytest.mark.parametrize("name", MCG_OPS)
def test_step_equals_dps_step_then_dense_projection(name, guidance, clip):
    A, net, y, x_t, noise, noise_y = setup(name, samples=S)
    sched = NoiseSchedule.linear(1000).respace(10)
    i, zeta, sigma_n = 6, 0.3, 0.1
    mcg = MCG(net, sched, A, zeta=zeta, sigma_n=sigma_n, guidance=guidance, clip_x0=clip, backend="torch")
    x_next, x0hat = mcg.step(x_t, i, y, noise, num_samples=S, noise_y=noise_y)

    M = real_matrix(A, x_t.shape[1:])
    y_rows = real_rows(y).repeat_interleave(S, 0)
    x_dps, x0 = _dps_step_by_autograd(net, sched, M, y_rows, x_t, noise, i, zeta, sigma_n, guidance, clip)
    abar = sched.coef(i - 1, Coef.SQRT_ABAR) ** 2
    n = x_t.shape[0]
    y_prev = math.sqrt(abar) * y_rows + math.sqrt(1 - abar) * noise_y.reshape(n, -1) @ M.T
    want = x_dps.reshape(n, -1) - (x_dps.reshape(n, -1) @ M.T - y_prev) @ torch.linalg.pinv(M).T
    torch.testing.assert_close(x0hat, x0, rtol=1e-12, atol=1e-12)
    # relative to the pre-projection state: the projection cancels its (large) measured part
    assert float((x_next - want.reshape(x_t.shape)).norm() / x_dps.norm()) < 1e-12
    assert not torch.equal(x_next, x_dps)  # the projection moved the state


@pytest.mark.parametrize("name", ["inpaint", "fourier2d", "superres2d", "matrix"])
def test_projection_lands_on_the_measurement_set(name):
    """Every state of a sampled chain solves A^T (A x - y_{i-1}) = 0 for its noised measurement
    y_{i-1} = sqrt(abar_{i-1}) y + sqrt(1 - abar_{i-1}) A z' (z' the Philox stream 2), and the
    sample solves A^T (A x - y) = 0."""
    A, net, y, *_ = setup(name, samples=S)
    sched = NoiseSchedule.linear(1000).respace(8)
    mcg = MCG(net, sched, A, zeta=0.01, sigma_n=0.1, backend="torch")
    states = {}
    res = mcg.sample(y, num_samples=S, seed=4, callback=lambda i, x, x0: states.__setitem__(i, x.clone()))
    assert sorted(states) == list(range(1, 8))
    shape = res.samples.shape[2:]
    M = real_matrix(A, shape)
    y_rows = real_rows(y).repeat_interleave(S, 0)
    seeds = res.seeds.flatten()
    n = seeds.numel()
    for i, x in states.items():
        abar = sched.coef(i - 1, Coef.SQRT_ABAR) ** 2
        z = philox_normal(seeds, math.prod(shape), i, STREAM_MEASUREMENT, F64)
        y_prev = math.sqrt(abar) * y_rows + math.sqrt(1 - abar) * z @ M.T
        normal = (x.reshape(n, -1) @ M.T - y_prev) @ M
        assert float(normal.abs().max()) < 1e-12 * (1 + float(x.abs().max())), (i, float(normal.abs().max()))
    final = (res.samples.reshape(n, -1) @ M.T - y_rows) @ M
    assert float(final.abs().max()) < 1e-12 * (1 + float(res.samples.abs().max()))
    # the residual reported is that of the projected sample
    r = res.samples.reshape(n, -1) @ M.T - y_rows
    torch.testing.assert_close(res.residual_norm.flatten(), r.norm(dim=1), rtol=1e-10, atol=1e-12)


def test_blur_is_refused_by_name():
    A, net, *_ = setup("blur1d")
    with pytest.raises(TypeError, match=r"operator: MCG supports .*Inpainting.*got Blur\(kernel=\(3,\)\).*use DPS"):
        MCG(net, NoiseSchedule.linear(1000).respace(5), A)
    with pytest.raises(TypeError, match="operator: MCG supports"):
        MCG(net, NoiseSchedule.linear(1000).respace(5), operators.GaussianBlur(1.0))
