"""The fast paths against the torch backend: the Triton backend over a whole DPS run (CPU
interpreter here, compiled on a GPU), torch.compile of the network, bf16 autocast tolerance, and
the NVTX phase ranges."""

from pathlib import Path

import pytest
import torch

from dps_fast import NoiseSchedule, operators
from tests.nets import TinyEps
from tests.nets import UntrainedDPS as DPS  # untrained nets run away: see tests/nets.py

F64 = torch.float64
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(kind: str):
    g = torch.Generator().manual_seed(0)
    if kind == "blur":
        A, shape, net = operators.GaussianBlur(1.0, 5), (2, 2, 6, 5), TinyEps(2, 8)
    elif kind == "inpaint-learned":
        A, shape, net = operators.Inpainting.random((5, 7), 0.5, seed=2), (2, 3, 5, 7), TinyEps(3, 8, learn_sigma=True)
    else:
        A, shape, net = operators.SuperResolution(2), (1, 1, 4, 6), TinyEps(1, 8)
    x0 = torch.rand(shape, generator=g, dtype=F64) * 2 - 1
    y = A(x0) + 0.05 * torch.randn(A(x0).shape, generator=g, dtype=F64)
    return A, net.double().to(DEV), y.to(DEV)


@pytest.mark.parametrize("kind,kw", [
    ("blur", dict(clip_x0=(-1.0, 1.0), guidance="normalized")),
    ("inpaint-learned", dict()),
    ("superres", dict(variance="fixed_large", clip_x0=(-0.9, 0.9))),
], ids=["blur-clip-normalized", "inpaint-learned-range", "superres-generic-op"])
def test_triton_backend_equals_torch_backend(kind, kw):
    A, net, y = _problem(kind)
    sched = NoiseSchedule.linear(1000).respace(6)
    runs = {be: DPS(net, sched, A, zeta=0.4, sigma_n=0.1, backend=be, compile=False, **kw)
            .sample(y, num_samples=2, seed=11, record="all") for be in ("torch", "triton")}
    assert DPS(net, sched, A, backend="triton").backend(y.device).name == "triton"
    for i in range(6):
        a, b = runs["triton"].trajectory[i], runs["torch"].trajectory[i]
        assert float((a - b).norm() / b.norm()) < 1e-9, f"step {i}"
    torch.testing.assert_close(runs["triton"].residual_norm, runs["torch"].residual_norm, rtol=1e-9, atol=1e-12)


def test_compiled_network_equals_eager():
    """torch.compile (aot_eager here: the same AOTAutograd forward/backward split as inductor,
    without a C++ toolchain in the loop) gives the eager samples."""
    A, net, y = _problem("blur")
    sched = NoiseSchedule.linear(1000).respace(4)
    eager = DPS(net, sched, A, zeta=0.4, sigma_n=0.1, backend="torch", compile=False).sample(y, seed=1)
    comp = DPS(net, sched, A, zeta=0.4, sigma_n=0.1, backend="torch", compile={"backend": "aot_eager"})
    assert comp.network(y.device).compiled
    torch.testing.assert_close(comp.sample(y, seed=1).samples, eager.samples, rtol=1e-10, atol=1e-12)


def _fixture() -> Path:
    # in the repository (tests/fixtures/adm), so a fresh clone runs this check
    return Path(__file__).resolve().parent / "fixtures" / "adm" / "adm_tiny32_conformance.pt"


def test_bf16_autocast_tolerance():
    """bf16 network, float32 state, same noise. One step (the flash-attention rule): the error of our
    bf16 step against a float64 reference is at most 2x that of plain PyTorch autograd through the
    same step under bf16 autocast. Documented run tolerance: a 10-step chain's final samples within
    0.25 relative L2 of float32 (measured 0.11-0.14 on the tiny32 conformance weights, which are
    perturbed and untrained, so the chain amplifies small differences)."""
    from dps_fast.models import ADMUNet

    ck = torch.load(_fixture(), map_location="cpu")
    net = ADMUNet.from_config("tiny32").eval()
    net.load_state_dict(ck["state_dict"])
    net64 = ADMUNet.from_config("tiny32").eval().double()
    net64.load_state_dict(ck["state_dict"])
    A = operators.GaussianBlur(1.5)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = A(x0) + 0.05 * torch.randn(x0.shape, generator=g)
    sched = NoiseSchedule.linear(1000).respace(10)
    opts = dict(zeta=1.0, sigma_n=0.05, guidance="normalized", clip_x0=(-1, 1), compile=False)
    xt = torch.randn(2, 3, 32, 32, generator=g)
    nz = torch.randn(2, 3, 32, 32, generator=g)
    ref = DPS(net64, sched, A, backend="reference", **opts).step(xt.double(), 7, y.double(), nz.double())[0]
    ours = DPS(net, sched, A, backend="torch", autocast=torch.bfloat16, **opts).step(xt, 7, y, nz)[0]
    plain = DPS(net, sched, A, backend="reference", autocast=torch.bfloat16, **opts).step(xt, 7, y, nz)[0]
    assert ours.dtype == torch.float32
    err_ours = float((ours.double() - ref).norm() / ref.norm())
    err_plain = float((plain.double() - ref).norm() / ref.norm())
    assert err_ours <= 2 * err_plain + 1e-6, (err_ours, err_plain)
    f32 = DPS(net, sched, A, **opts)
    b16 = DPS(net, sched, A, autocast=torch.bfloat16, **opts)
    a, b = b16.sample(y, seed=0).samples, f32.sample(y, seed=0).samples
    run_err = float((a - b).norm() / b.norm())
    assert 0 < run_err < 0.25, run_err


def test_nvtx_ranges_mark_each_phase(monkeypatch):
    from dps_fast import profiling

    seen = []

    class Domain:
        def start_range(self, message):
            seen.append(message)
            return message

        def end_range(self, rng):
            seen.append("/" + rng)

    monkeypatch.setattr(profiling, "_DOMAIN", Domain())
    A, net, y = _problem("blur")
    DPS(net, NoiseSchedule.linear(1000).respace(2), A, backend="torch", compile=False).sample(y, seed=0)
    assert seen[:8] == ["forward", "/forward", "operator", "/operator", "vjp", "/vjp", "update", "/update"]


def test_checkpointing_option_gives_the_same_samples():
    from dps_fast.models import ADMUNet

    torch.manual_seed(0)
    net = ADMUNet.from_config("tiny32").eval()
    A = operators.Inpainting.box((32, 32), (8, 8))
    y = A(torch.rand(1, 3, 32, 32) * 2 - 1)
    sched = NoiseSchedule.linear(1000).respace(3)
    plain = DPS(net, sched, A, zeta=0.5, sigma_n=0.05, compile=False, checkpointing=False).sample(y, seed=0)
    ckpt = DPS(net, sched, A, zeta=0.5, sigma_n=0.05, compile=False, checkpointing=True)
    assert net.use_checkpoint
    torch.testing.assert_close(ckpt.sample(y, seed=0).samples, plain.samples, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="checkpointing"):
        DPS(lambda x, t: x, sched, A, checkpointing=True)
