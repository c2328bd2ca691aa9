"""GPU-only integration checks (run by bench/gpu_suite.sh): compiled Triton, the CUDA extension,
CUDA-graph replay and inductor compile against the torch backend on the same seeds."""

import pytest
import torch

from dps_fast import NoiseSchedule, operators
from tests.nets import TinyEps
from tests.nets import UntrainedDPS as DPS  # untrained nets run away: see tests/nets.py

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

F64 = torch.float64


def _problem(dtype=torch.float32, kind="blur"):
    g = torch.Generator().manual_seed(0)
    if kind == "blur":
        A, shape, net = operators.GaussianBlur(1.5, 7), (3, 3, 16, 12), TinyEps(3, 16)
    else:
        A, shape, net = operators.Inpainting.box((16, 12), (6, 4)), (3, 3, 16, 12), TinyEps(3, 16, learn_sigma=True)
    x0 = torch.rand(shape, generator=g, dtype=F64) * 2 - 1
    y = A(x0) + 0.05 * torch.randn(shape, generator=g, dtype=F64)
    return A, net.to("cuda", dtype), y.to("cuda", dtype)


def _run(backend, dtype=torch.float32, kind="blur", **kw):
    A, net, y = _problem(dtype, kind)
    sched = NoiseSchedule.linear(1000).respace(8)
    opts = dict(zeta=0.5, sigma_n=0.05, guidance="normalized", clip_x0=(-1, 1), compile=False) | kw
    return DPS(net, sched, A, backend=backend, **opts).sample(y, num_samples=2, seed=3, record="all")


@pytest.mark.parametrize("kind", ["blur", "inpaint"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_backends_equal_torch_float64(backend, kind):
    if backend == "cuda":
        from dps_fast._cuda import load_extension

        if load_extension() is None:
            pytest.skip("CUDA extension unavailable")
    a, b = _run(backend, F64, kind), _run("torch", F64, kind)
    for i in range(8):
        err = float((a.trajectory[i] - b.trajectory[i]).norm() / b.trajectory[i].norm())
        assert err < 1e-9, (i, err)


def test_auto_backend_is_triton_on_cuda():
    A, net, y = _problem()
    assert DPS(net, NoiseSchedule.linear(1000).respace(2), A).backend(y.device).name == "triton"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_graph_replay_equals_eager(backend):
    a, b = _run(backend, cuda_graph=True), _run(backend)
    err = float((a.samples - b.samples).norm() / b.samples.norm())
    assert err < 1e-5, err
    assert a.nfe == b.nfe


def test_inductor_compile_equals_eager():
    a, b = _run("triton", compile=True), _run("triton")
    err = float((a.samples - b.samples).norm() / b.samples.norm())
    assert err < 1e-3, err  # inductor reorders float32 reductions


def test_bf16_autocast_runs_and_stays_close():
    a, b = _run("triton", autocast=torch.bfloat16), _run("triton")
    assert a.samples.dtype == torch.float32
    err = float((a.samples - b.samples).norm() / b.samples.norm())
    assert err < 0.25, err  # the tolerance documented in tests/test_fast_paths.py


def test_update_with_ten_thousand_samples_of_a_small_image():
    """The Triton update at N = 10^4 samples of a 3x8x8 image equals the torch op (fresh inputs)."""
    from dps_fast.backends import torch_ops, triton_ops

    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (10_000, 3, 8, 8)
    x, eps, w, u = (torch.randn(shape, device="cuda", generator=g) for _ in range(4))
    coefs = NoiseSchedule.linear(1000).table(torch.float32, "cuda")[321]
    gscale = torch.rand(shape[0], device="cuda", generator=g)
    seeds = torch.randint(0, 2**62, (shape[0],), device="cuda", generator=g)
    out = torch.full_like(x, float("nan"))
    triton_ops.dps_update(x, eps, w, u, gscale, coefs, 321, clip=(-1, 1), seeds=seeds, out=out)
    ref = torch_ops.dps_update(x, eps, w, u, gscale, coefs, 321, clip=(-1, 1), seeds=seeds)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def test_reconstruct_auto_batch_measures_checkpointing(tmp_path):
    """--batch-size auto on CUDA: probe memory with and without activation checkpointing, keep the
    faster in images/s, record both in the manifest, and produce every output."""
    import json

    from dps_fast import reconstruct
    from dps_fast.models import ADMUNet

    torch.manual_seed(0)
    model = ADMUNet.from_config("tiny32").eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    summary = reconstruct(x, tmp_path / "out", model, operators.GaussianBlur(1.5), steps=3, samples=2,
                          batch_size="auto", device="cuda", compile=False, progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    batch = manifest["batch"]
    assert batch["mode"] == "probe" and isinstance(batch["checkpointing"], bool)
    assert set(batch["checkpointing_rows_per_s"]) == {"off", "on"} and batch["rows"] >= 1
    assert model.use_checkpoint == batch["checkpointing"]
    assert summary is not None and len(list((tmp_path / "out" / "items").iterdir())) == 3
