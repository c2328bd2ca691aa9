"""The DPS sampler: the torch fast path equals autograd through the whole step (float64, same
noise), one step equals the hand-derived formula, reproducible seeds, results and errors."""

import math

import pytest
import torch

from dps_fast import NoiseSchedule, NonFiniteError, operators
from dps_fast.noise import STREAM_STEP, philox_normal
from tests.nets import TinyEps
from tests.nets import UntrainedDPS as DPS  # untrained nets run away: see tests/nets.py

F64 = torch.float64


def _linear_eps(M: torch.Tensor):
    """eps(x, t) = x @ M^T: a linear network whose Jacobian is known exactly."""
    return lambda x, t: x @ M.T.to(x)


PROBLEMS = {
    "matrix": lambda: (operators.Matrix(torch.randn(5, 12, dtype=F64, generator=torch.Generator().manual_seed(0))),
                       (1, 12), TinyEps(1, 8, ndim=1)),
    "blur1d": lambda: (operators.GaussianBlur(1.5, 7), (1, 17), TinyEps(1, 8, ndim=1)),
    "inpaint2d": lambda: (operators.Inpainting.random((5, 7), 0.5, seed=1), (3, 5, 7), TinyEps(3, 8)),
    "blur2d": lambda: (operators.GaussianBlur(1.0, 5), (2, 6, 5), TinyEps(2, 8)),
    "superres": lambda: (operators.SuperResolution(2), (1, 4, 6), TinyEps(1, 8)),
    "fourier": lambda: (operators.SubsampledFourier((torch.rand(6, 5, generator=torch.Generator().manual_seed(2)) < .5).double()),
                        (1, 6, 5), TinyEps(1, 8)),
    "identity-learned": lambda: (operators.Identity(), (2, 5, 4), TinyEps(2, 8, learn_sigma=True)),
}


def _setup(name):
    A, xshape, net = PROBLEMS[name]()
    net = net.double()
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn((2,) + xshape, generator=g, dtype=F64) * 0.5
    y = A(x0)
    y = y + 0.05 * (torch.randn(y.shape, generator=g, dtype=F64) if not y.is_complex()
                    else torch.complex(torch.randn(y.shape, generator=g, dtype=F64), torch.randn(y.shape, generator=g, dtype=F64)))
    return A, net, y


CONFIGS = [
    ("matrix", dict()), ("blur1d", dict(clip_x0=(-1.0, 1.0))), ("inpaint2d", dict(guidance="normalized")),
    ("blur2d", dict(guidance=["squared", "normalized"], zeta=[0.3, 0.7])), ("superres", dict(variance="fixed_large")),
    ("fourier", dict(clip_x0=(-0.8, 0.8), guidance="normalized")), ("identity-learned", dict()),
]


@pytest.mark.parametrize("name,kw", CONFIGS, ids=[c[0] + "-" + "-".join(c[1]) for c in CONFIGS])
def test_torch_backend_equals_autograd_reference(name, kw):
    A, net, y = _setup(name)
    sched = NoiseSchedule.linear(1000).respace(12)
    opts = dict(zeta=0.5, sigma_n=0.1, compile=False) | kw
    res = {}
    for be in ("reference", "torch"):
        res[be] = DPS(net, sched, A, backend=be, **opts).sample(y, num_samples=3, seed=5, record="all")
    ref, fast = res["reference"], res["torch"]
    for i in range(12):
        a, b = fast.trajectory[i], ref.trajectory[i]
        assert float((a - b).norm() / b.norm()) < 1e-10, f"step {i}"
    assert float((fast.samples - ref.samples).norm() / ref.samples.norm()) < 1e-10
    torch.testing.assert_close(fast.residual_norm, ref.residual_norm, rtol=1e-10, atol=1e-12)
    assert fast.nfe == ref.nfe == 2 * 12 - 1
    # the guidance did something: samples differ from an unguided run with the same seeds
    unguided = DPS(net, sched, A, backend="torch", **(opts | dict(zeta=0.0))).sample(y, num_samples=3, seed=5)
    assert float((unguided.samples - fast.samples).norm()) > 1e-3 * float(fast.samples.norm())


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("guidance", ["squared", "normalized"])
@pytest.mark.parametrize("clip", [None, (-0.5, 0.5)])
def test_step_matches_hand_derived_formula(backend, guidance, clip):
    g = torch.Generator().manual_seed(3)
    d, m, S = 6, 4, 2
    M = torch.randn(d, d, generator=g, dtype=F64) * 0.3
    Amat = torch.randn(m, d, generator=g, dtype=F64)
    sched = NoiseSchedule.linear(1000).respace(20)
    zeta, sigma_n, i = 0.4, 0.2, 11
    dps = DPS(_linear_eps(M), sched, operators.Matrix(Amat), zeta=zeta, sigma_n=sigma_n, guidance=guidance,
              clip_x0=clip, backend=backend)
    y = torch.randn(2, 1, m, generator=g, dtype=F64)
    x = torch.randn(2 * S, 1, d, generator=g, dtype=F64)
    noise = torch.randn(2 * S, 1, d, generator=g, dtype=F64)
    x_before = x.clone()
    x_next, x0hat = dps.step(x, i, y, noise, num_samples=S)
    assert torch.equal(x, x_before)  # step() never writes into the caller's x_t
    # by hand: x0 = (x - s eps)/a with eps = M x, so d x0 / d x = (I - s M)/a
    ab = float(sched.alphas_cumprod[i])
    ab_prev = float(sched.alphas_cumprod[i - 1])
    beta = float(sched.betas[i])
    a, s = math.sqrt(ab), math.sqrt(1 - ab)
    xv = x[:, 0]
    x0 = (xv - s * xv @ M.T) / a
    mask = torch.ones_like(x0)
    if clip is not None:
        mask = ((x0 >= clip[0]) & (x0 <= clip[1])).double()
        x0 = x0.clamp(*clip)
    r = x0 @ Amat.T - y[:, 0].repeat_interleave(S, 0)
    grad_sq = 2 * ((r @ Amat) * mask) @ (torch.eye(d, dtype=F64) - s * M) / a  # grad ||r||^2 (row vectors)
    if guidance == "squared":
        guided = zeta / (2 * sigma_n**2) * grad_sq
    else:
        guided = zeta * grad_sq / (2 * r.norm(dim=1, keepdim=True))
    var = beta * (1 - ab_prev) / (1 - ab)
    mean = (beta * math.sqrt(ab_prev) / (1 - ab)) * x0 + ((1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)) * xv
    want = mean + math.sqrt(var) * noise[:, 0] - guided
    torch.testing.assert_close(x0hat[:, 0], x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_next[:, 0], want, rtol=1e-10, atol=1e-12)


def test_seeds_reproduce_and_do_not_depend_on_batch_layout():
    A, net, y = _setup("blur1d")
    sched = NoiseSchedule.linear(1000).respace(8)
    dps = DPS(net, sched, A, zeta=0.3, sigma_n=0.1, backend="torch")
    r1 = dps.sample(y, num_samples=4, seed=9)
    r2 = dps.sample(y, num_samples=4, seed=9)
    assert torch.equal(r1.samples, r2.samples)
    # measurement 1 alone, with its own seeds, gives the same samples as inside the batch
    r3 = dps.sample(y[1:], num_samples=4, seeds=r1.seeds[1:])
    torch.testing.assert_close(r3.samples[0], r1.samples[1], rtol=1e-12, atol=1e-12)
    assert not torch.equal(dps.sample(y, num_samples=4, seed=10).samples, r1.samples)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(dps.sample(y, 2, generator=g1).samples, dps.sample(y, 2, generator=g2).samples)


def test_result_fields_callback_progress_and_frozen_weights(capsys):
    A, net, y = _setup("inpaint2d")
    flags = [p.requires_grad for p in net.parameters()]
    sched = NoiseSchedule.linear(1000).respace(10)
    dps = DPS(net, sched, A, zeta=0.2, sigma_n=0.1)
    res = dps.sample(y, num_samples=3, seed=1, record=[9, 4, 0], progress=True)
    assert res.samples.shape == (2, 3, 3, 5, 7) and res.mean.shape == (2, 3, 5, 7)
    torch.testing.assert_close(res.mean, res.samples.mean(1))
    torch.testing.assert_close(res.std, res.samples.std(1, unbiased=False))
    assert sorted(res.trajectory) == [0, 4, 9] and torch.equal(res.trajectory[0], res.samples)
    r = A(res.samples.flatten(0, 1)) - y.repeat_interleave(3, 0)
    torch.testing.assert_close(res.residual_norm.flatten(), r.flatten(1).norm(dim=1), rtol=1e-10, atol=1e-12)
    assert res.nfe == 19 and res.stopped_at is None
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    seen = []
    stop = dps.sample(y, seed=1, callback=lambda i, x, x0: seen.append(i) or (i > 6))
    assert seen == [9, 8, 7, 6] and stop.stopped_at == 6
    assert "DPS" in capsys.readouterr().err  # the tqdm bar


def test_nonfinite_state_names_the_step():
    A = operators.Identity()
    sched = NoiseSchedule.linear(1000).respace(10)

    def exploding(x, t):
        return torch.where(t.view(-1, 1, 1) < 500, torch.full_like(x, float("nan")), x * 0.1)

    with pytest.raises(NonFiniteError, match=r"step i=4 .*smaller zeta"):
        DPS(exploding, sched, A, zeta=1.0, sigma_n=0.1).sample(torch.zeros(1, 1, 4, dtype=F64))


@pytest.mark.parametrize("kwargs,sample_kw,exc,msg", [
    (dict(sigma_n=0.0), {}, ValueError, "sigma_n"),
    (dict(zeta=-1.0), {}, ValueError, "zeta"),
    (dict(guidance="l1"), {}, ValueError, "guidance"),
    (dict(variance="learned"), {}, ValueError, "variance"),
    (dict(clip_x0=(1, -1)), {}, ValueError, "clip_x0"),
    (dict(backend="jax"), {}, ValueError, "backend"),
    ({}, dict(num_samples=0), ValueError, "num_samples"),
    ({}, dict(y=torch.zeros(2, 1, 4, dtype=F64)), ValueError, r"y: expected shape \(2, 1, 5\)"),
    ({}, dict(y=torch.full((1, 1, 5), float("nan"), dtype=F64)), ValueError, "y: expected finite"),
    ({}, dict(y=torch.zeros(1, 1, 5, dtype=torch.int64)), TypeError, "y: expected float32"),
    (dict(model="net"), {}, TypeError, "model"),
    (dict(model=lambda x, t: x[..., :3]), {}, ValueError, r"model: expected an output of shape"),
    (dict(zeta=[0.1, 0.2, 0.3]), {}, ValueError, "zeta"),
    ({}, dict(seeds=torch.zeros(2, 2)), ValueError, "seeds"),
])
def test_errors_name_argument_expected_and_received(kwargs, sample_kw, exc, msg):
    A = operators.Matrix(torch.randn(5, 8, dtype=F64))
    sched = NoiseSchedule.linear(1000).respace(5)
    model = kwargs.pop("model", lambda x, t: 0.1 * x)
    opts = dict(zeta=0.5, sigma_n=0.1) | kwargs
    y = sample_kw.pop("y", torch.zeros(1, 1, 5, dtype=F64))
    with pytest.raises(exc, match=msg):
        DPS(model, sched, A, **opts).sample(y, **sample_kw)


def test_dtype_mismatch_between_model_and_y():
    net = TinyEps(1, 4, ndim=1)  # float32 weights
    dps = DPS(net, NoiseSchedule.linear(1000).respace(3), operators.Identity(), sigma_n=0.1)
    with pytest.raises(TypeError, match="float32 but y is torch.float64"):
        dps.sample(torch.zeros(1, 1, 6, dtype=F64))


def test_fixed_noise_stream_is_the_philox_stream():
    """The torch backend's step noise is philox_normal(seed, step): pass it explicitly and compare."""
    A, net, y = _setup("blur1d")
    sched = NoiseSchedule.linear(1000).respace(6)
    dps = DPS(net, sched, A, zeta=0.3, sigma_n=0.1, backend="torch")
    res = dps.sample(y[:1], num_samples=1, seed=3, record=[5, 4])
    from dps_fast.noise import STREAM_INIT
    x = philox_normal(res.seeds.flatten(), 17, 6, STREAM_INIT, F64).view(1, 1, 17)
    x4, _ = dps.step(x, 5, y[:1], philox_normal(res.seeds.flatten(), 17, 5, STREAM_STEP, F64).view(1, 1, 17))
    _, x0_4 = dps.step(x4, 4, y[:1], torch.zeros_like(x4))
    torch.testing.assert_close(x0_4, res.trajectory[4][0], rtol=1e-12, atol=1e-12)
