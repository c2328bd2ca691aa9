"""Nonlinear and user-defined operators: PhaseRetrieval against the DPS construction and its
closed-form VJP against autograd; Differentiable(fn) (functions, nn.Modules, linear, complex);
one DPS step with Differentiable(fn) equals autograd through the whole step (every backend, with
clip_x0), and the guidance gradient passes torch.autograd.gradcheck."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dps_fast import DPS, NoiseSchedule, operators
from dps_fast.backends import get_backend
from dps_fast.operators import Differentiable, LinearOperator, PhaseRetrieval
from dps_fast.operators.base import Operator
from dps_fast.schedule import Coef
from tests.nets import TinyEps

F64 = torch.float64
DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ---- phase retrieval ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape,oversample", [((2, 3, 16, 16), 2.0), ((1, 1, 13, 10), 2.0), ((3, 1, 20), 1.0),
                                              ((1, 2, 9), 4.0)], ids=["2d-16", "2d-13x10", "1d-20", "1d-9-os4"])
def test_phase_retrieval_equals_the_dps_construction(shape, oversample):
    """DPS2022: F.pad by int(oversample / 8 * n), then fft2_m(x).abs() = |fftshift(fftn(ifftshift(x),
    norm="ortho"))| (fastMRI's centred FFT), written out here independently."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    nd = len(shape) - 2
    dims = tuple(range(-nd, 0))
    pad = []
    for n in reversed(shape[2:]):
        p = int(oversample / 8.0 * n)
        pad += [p, p]
    xp = F.pad(x, pad)
    want = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(xp, dim=dims), dim=dims, norm="ortho"), dim=dims).abs()
    A = PhaseRetrieval(oversample)
    got = A(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert tuple(got.shape) == A.output_shape(shape) and A.input_shape(tuple(got.shape)) == shape
    assert not A.linear and not isinstance(A, LinearOperator)


def test_phase_retrieval_dps_padding_and_shapes():
    assert PhaseRetrieval(2.0).pad_size(256) == 64  # the DPS code's int(2 / 8 * 256)
    A = PhaseRetrieval(2.0, pad=64)
    assert A.output_shape((1, 3, 32, 32)) == (1, 3, 160, 160) and A.input_shape((1, 3, 160, 160)) == (1, 3, 32, 32)
    for n in range(1, 60):  # n + 2 int(o n / 8) is strictly increasing: the inverse is unique
        m = PhaseRetrieval(1.5).output_shape((1, 1, n))[-1]
        assert PhaseRetrieval(1.5).input_shape((1, 1, m)) == (1, 1, n)
    with pytest.raises(ValueError, match="y: no signal length"):
        PhaseRetrieval(2.0).input_shape((1, 1, 11))  # 8 -> 12, 9 -> 13, but nothing gives 11
    with pytest.raises(ValueError, match="oversample"):
        PhaseRetrieval(-1.0)


@pytest.mark.parametrize("weighted", [False, True], ids=["gaussian", "weighted"])
def test_phase_retrieval_closed_form_vjp_equals_autograd(weighted):
    g = torch.Generator().manual_seed(2)
    A = PhaseRetrieval(2.0)
    x = torch.randn(3, 2, 9, 12, generator=g, dtype=F64)
    y = A(torch.randn(x.shape, generator=g, dtype=F64))
    weight = torch.rand(y.shape, generator=g, dtype=F64) if weighted else None
    meas = A.prepare(y, weight)
    w, rn2 = A.residual(x, meas)
    w_ref, rn2_ref = Operator.residual(A, x, meas)  # autograd through forward
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rn2, rn2_ref, rtol=1e-12, atol=1e-12)
    r = A(x) - y
    torch.testing.assert_close(rn2, (r * r * (weight if weighted else 1.0)).flatten(1).sum(1))


def test_phase_retrieval_forward_passes_gradcheck():
    x = torch.randn(1, 1, 5, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(PhaseRetrieval(2.0), (x,))


# ---- Differentiable -----------------------------------------------------------------------------
class BlurNet(nn.Module):
    """A learned-blur stand-in: a depthwise conv with reflect padding followed by a soft nonlinearity."""

    def __init__(self, channels: int = 2, nonlinear: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect", groups=channels, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.rand(self.conv.weight.shape, generator=torch.Generator().manual_seed(0)) / 4)
        self.nonlinear = nonlinear

    def forward(self, x):
        y = self.conv(x)
        return torch.tanh(y) + 0.1 * y**2 if self.nonlinear else y


def test_differentiable_residual_is_one_vjp_of_fn():
    net = BlurNet().double()
    A = Differentiable(net)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 6, 5, generator=g, dtype=F64)
    y = torch.randn(2, 2, 6, 5, generator=g, dtype=F64)
    w, rn2 = A.residual(x, A.prepare(y))
    xr = x.clone().requires_grad_(True)
    loss = 0.5 * (net(xr) - y).square().sum()
    (want,) = torch.autograd.grad(loss, xr)
    torch.testing.assert_close(w, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rn2, (net(x) - y).square().flatten(1).sum(1))
    assert all(p.requires_grad for p in net.parameters())  # frozen only during the VJP
    assert not A.linear and not isinstance(A, LinearOperator)
    assert A.placement() == (torch.device("cpu"), F64)


def test_linear_differentiable_is_a_linear_operator_with_exact_adjoint():
    net = BlurNet(nonlinear=False).double()
    A = Differentiable(net, linear=True)
    assert isinstance(A, LinearOperator) and isinstance(A, Differentiable) and A.linear
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 7, 6, generator=g, dtype=F64)
    y = torch.randn(3, 2, 7, 6, generator=g, dtype=F64)
    with torch.no_grad():
        lhs = (A(x) * y).sum()
    rhs = (x * A.adjoint(y)).sum()
    assert abs(float(lhs - rhs)) <= 1e-12 * abs(float(lhs))
    torch.testing.assert_close(A.normal_residual(x, y), A.adjoint(A(x).detach() - y))


def test_differentiable_shape_changing_and_complex_callables():
    F_ = operators.SubsampledFourier((torch.rand(6, 5, generator=torch.Generator().manual_seed(0)) < 0.5).double())
    A = Differentiable(F_.forward, complex_output=True, linear=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 6, 5, generator=g, dtype=F64)
    y = torch.complex(torch.randn(2, 1, 6, 5, generator=g, dtype=F64), torch.randn(2, 1, 6, 5, generator=g, dtype=F64))
    w, rn2 = A.residual(x, A.prepare(y))
    w_ref, rn2_ref = F_.residual(x, F_.prepare(y))  # Re(A^H (A x - y)): the real-domain gradient
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rn2, rn2_ref)
    torch.testing.assert_close(A.adjoint(y), F_.adjoint(y))
    pool = Differentiable(lambda x: F.avg_pool2d(x, 2), input_shape=(3, 8, 6))
    assert pool.output_shape((5, 3, 8, 6)) == (5, 3, 4, 3) and pool.input_shape((5, 3, 4, 3)) == (5, 3, 8, 6)
    assert Differentiable(torch.sin).input_shape((2, 1, 7)) == (2, 1, 7)
    fixed = Differentiable(lambda x: x[..., :2], output_shape=(1, 2))
    with pytest.raises(ValueError, match="pass input_shape"):
        fixed.input_shape((1, 1, 3))  # y does not have the declared shape, and x's is unknown


@pytest.mark.parametrize("make,exc,msg", [
    (lambda: Differentiable(3), TypeError, "fn: expected a callable"),
    (lambda: Differentiable(torch.sin, linear="yes"), TypeError, "linear"),
    (lambda: Differentiable(torch.sin, output_shape=(0, 2)), ValueError, "output_shape"),
    (lambda: Differentiable(lambda x: x.sum())(torch.ones(2, 1, 3)), TypeError, r"fn: expected A\(x\) to return"),
    (lambda: Differentiable(lambda x: x @ torch.ones(3, 2, dtype=F64)).output_shape((1, 1, 4)), ValueError,
     "pass output_shape"),
    (lambda: DPS(lambda x, t: x, NoiseSchedule.linear(1000), torch.sin), TypeError, "operators.Differentiable"),
])
def test_bad_input_names_the_argument(make, exc, msg):
    with pytest.raises(exc, match=msg):
        make()


# ---- the guided step ----------------------------------------------------------------------------
def _problem():
    g = torch.Generator().manual_seed(0)
    A = Differentiable(BlurNet().double())
    x0 = torch.rand(2, 2, 6, 5, generator=g, dtype=F64) * 2 - 1
    y = A(x0) + 0.05 * torch.randn(x0.shape, generator=g, dtype=F64)
    return A, TinyEps(2, 8).double(), y


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kw", [dict(guidance="squared", clip_x0=(-1.0, 1.0)), dict(guidance="normalized"),
                                dict(guidance=["squared", "normalized"], clip_x0=(-0.7, 0.7), noise="poisson")],
                         ids=["squared-clip", "normalized", "mixed-clip-poisson"])
def test_step_with_differentiable_equals_autograd_through_the_whole_step(backend, kw):
    A, net, y = _problem()
    A.fn.to(DEV)
    net, y = net.to(DEV), y.to(DEV)
    if kw.get("noise") == "poisson":
        y = y.clamp(-1, 1)
    sched = NoiseSchedule.linear(1000).respace(4)
    opts = dict(zeta=0.05, sigma_n=0.1, compile=False) | kw
    runs = {be: DPS(net, sched, A, backend=be, **opts).sample(y, num_samples=2, seed=7, record="all")
            for be in ("reference", backend)}
    for i in range(4):
        a, b = runs[backend].trajectory[i], runs["reference"].trajectory[i]
        assert float((a - b).norm() / b.norm()) < 1e-9, f"step {i}"
    torch.testing.assert_close(runs[backend].residual_norm, runs["reference"].residual_norm, rtol=1e-9, atol=1e-12)
    A.fn.cpu()


class _GuidanceLoss(torch.autograd.Function):
    """loss(x_t) = ||A(x0hat(x_t)) - y||^2 whose backward is the fast path's guidance gradient
    g = 2 / sqrt(abar) (w - sqrt(1 - abar) J_eps^T w), w from FusedBackend.prep (one VJP of A)."""

    @staticmethod
    def forward(ctx, x, backend, p, i):
        coefs = p.table[i]
        x_in, eps_g = p.net.forward(x, p.t[i])
        _, w, rnorm2 = backend.prep(p, x, eps_g.detach(), coefs)
        u = p.net.vjp(eps_g, x_in, w)
        ctx.save_for_backward(2 * coefs[Coef.SQRT_RECIP_ABAR] * (w - coefs[Coef.SQRT_1M_ABAR] * u))
        return rnorm2.sum()

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        return grad_out * g, None, None, None


@pytest.mark.parametrize("op", ["differentiable", "phase-retrieval"])
def test_guidance_gradient_passes_gradcheck(op):
    """Finite differences of ||A(x0hat(x_t)) - y||^2 (A nonlinear) against the fast path's gradient."""
    if op == "differentiable":
        A, net, y = _problem()
    else:
        A, net = PhaseRetrieval(2.0), TinyEps(2, 8).double()
        y = A(torch.rand(1, 2, 6, 5, dtype=F64, generator=torch.Generator().manual_seed(5)))
    sched = NoiseSchedule.linear(1000).respace(10)
    dps = DPS(net, sched, A, compile=False, backend="torch")
    p, x = dps.prepare(y, num_samples=1, seed=3)
    be = get_backend("torch", torch.device("cpu"))
    x = x.clone().requires_grad_(True)
    with p.net.frozen():
        assert torch.autograd.gradcheck(lambda v: _GuidanceLoss.apply(v, be, p, 6), (x,), eps=1e-6, atol=1e-6)
