"""The new operators and noise models through ``reconstruct`` (from Python) and the CLI: a user's
nn.Module operator (fingerprinted by its weights, evaluated on its own dtype), Poisson measurements
(seeded per item), the --operator/--boundary/--filter/--noise/--rate flags and their errors.
tiny32 ADMUNet with small random weights, 2 steps, 32x32 images: cheap, like tests/test_reconstruct.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dps_fast import operators
from dps_fast.cli import main
from dps_fast.models import ADMUNet
from dps_fast.reconstruct import reconstruct
from dps_fast.reconstruct.data import ITEMS, MANIFEST, TENSORS
from dps_fast.reconstruct.runner import noise_model, simulate_measurement


class SoftBlur(nn.Module):
    """A user's nonlinear forward model in float32: a depthwise 3x3 conv, then a soft saturation."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False)
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            self.conv.weight.copy_(torch.rand(self.conv.weight.shape, generator=g) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))


SQUARE_OPERATOR = operators.Differentiable(lambda x: x * x.abs())  # importable by --operator-fn


def half_size(x):  # importable by --operator-fn: a shape-changing callable (2x2 block means)
    return torch.nn.functional.avg_pool2d(x, 2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ops_assets")
    g = torch.Generator().manual_seed(0)
    model = ADMUNet.from_config("tiny32")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    torch.save(model.state_dict(), root / "tiny32.pt")
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    torch.save(images, root / "images.pt")
    return {"root": root, "model": model, "images": images}


def test_user_module_operator_from_python(assets, tmp_path):
    A = operators.Differentiable(SoftBlur())
    kw = dict(steps=2, samples=1, batch_size=2, device="cpu", progress=False, clip=True, zeta=0.5)
    s = reconstruct(assets["images"], tmp_path / "a", assets["model"], A, **kw)
    assert s.done == 2 and s.status == "complete"
    folders = sorted((tmp_path / "a" / ITEMS).iterdir())
    t = torch.load(folders[0] / TENSORS, weights_only=True)
    x = t["x"]
    with torch.no_grad():
        clean = SoftBlur()(x[None])[0]
    # the simulated measurement is A(x) + 0.05 noise, computed by the float32 module itself
    assert 0.02 < float((t["measurement"] - clean).std()) < 0.08
    settings = json.loads((tmp_path / "a" / MANIFEST).read_text())["settings"]["operator"]
    assert settings["type"] == "Differentiable" and settings["linear"] is False and "fn_hash" in settings
    # other weights are another operator: the folder refuses them, naming the operator setting
    with pytest.raises(ValueError, match="differing: operator"):
        reconstruct(assets["images"], tmp_path / "a", assets["model"], operators.Differentiable(SoftBlur(seed=1)), **kw)
    # the same weights resume (nothing left to do)
    again = reconstruct(assets["images"], tmp_path / "a", assets["model"], operators.Differentiable(SoftBlur()), **kw)
    assert again.finished_now == 0 and again.already_done == 2


def test_poisson_measurements_are_seeded_per_item():
    A = operators.GaussianBlur(1.0, boundary="reflect")
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    nm = noise_model("poisson", 0.5)
    y1 = simulate_measurement(A, x, 0.05, seed=3, name="img0", noise=nm)
    assert torch.equal(y1, simulate_measurement(A, x, 0.05, seed=3, name="img0", noise=nm))
    assert not torch.equal(y1, simulate_measurement(A, x, 0.05, seed=3, name="img1", noise=nm))
    counts = nm.counts(y1.double())
    assert float((counts - counts.round()).abs().max()) < 1e-3  # float32 y: integer counts to rounding
    with pytest.raises(ValueError, match="rate: only used with noise 'poisson'"):
        noise_model("gaussian", 2.0)
    with pytest.raises(ValueError, match="noise: expected one of"):
        noise_model("speckle")


def _cli(assets, out: Path, *extra: str) -> list[str]:
    return ["reconstruct", str(assets["root"] / "images.pt"), "--out", str(out), "--model", "tiny32",
            "--checkpoint", str(assets["root"] / "tiny32.pt"), "--steps", "2", "--samples", "1",
            "--batch-size", "2", "--device", "cpu", "--quiet", *extra]


@pytest.mark.parametrize("extra,op_type,check", [
    (("--operator", "gaussian-blur", "--sigma", "1.0", "--boundary", "reflect", "--noise", "poisson", "--rate", "2"),
     "GaussianBlur", {"boundary": "reflect"}),
    (("--operator", "super-res", "--factor", "2", "--filter", "bicubic"), "SuperResolution", {"filter": "bicubic"}),
    (("--operator", "phase-retrieval", "--oversample", "1.0", "--zeta", "0.1"), "PhaseRetrieval", {"oversample": 1.0}),
    (("--operator", "python", "--operator-fn", "tests.operators.test_reconstruct_operators:SQUARE_OPERATOR"),
     "Differentiable", {"linear": False}),
], ids=["reflect-poisson", "bicubic", "phase-retrieval", "python"])
def test_cli_new_operators(assets, tmp_path, capsys, extra, op_type, check):
    out = tmp_path / "run"
    assert main(_cli(assets, out, *extra)) == 0, capsys.readouterr().err
    m = json.loads((out / MANIFEST).read_text())
    assert m["status"] == "complete" and m["settings"]["operator"]["type"] == op_type
    for k, v in check.items():
        assert m["settings"]["operator"][k] == v
    if "poisson" in extra:
        assert m["settings"]["noise"] == "PoissonNoise(rate=2.0, levels=255.0, value_range=(-1.0, 1.0), saturate=True)"


def test_cli_blur_with_a_kernel_file(assets, tmp_path, capsys):
    k = np.outer([1.0, 2.0, 1.0], [1.0, 3.0, 1.0])
    np.save(tmp_path / "k.npy", k / k.sum())
    out = tmp_path / "run"
    assert main(_cli(assets, out, "--operator", "blur", "--kernel", str(tmp_path / "k.npy"), "--boundary", "zero")) == 0
    m = json.loads((out / MANIFEST).read_text())
    assert m["settings"]["operator"]["type"] == "Blur" and m["settings"]["operator"]["boundary"] == "zero"


@pytest.mark.parametrize("extra,msg", [
    (("--operator", "gaussian-blur", "--filter", "bicubic"), "--filter: only applies to --operator super-res"),
    (("--operator", "super-res", "--boundary", "reflect"), "--boundary: only applies to --operator gaussian-blur"),
    (("--operator", "blur",), "--kernel: required with --operator blur"),
    (("--operator", "blur", "--kernel", "nope.npy"), "--kernel: no file 'nope.npy'"),
    (("--operator", "python", "--operator-fn", "no_such_module:op"), "--operator-fn: cannot import"),
    (("--operator", "python",), "--operator-fn: expected MODULE:NAME"),
    (("--rate", "2.0",), "--rate: only applies to --noise poisson"),
    (("--noise", "poisson", "--rate", "-1"), "--rate: expected a positive number"),
], ids=["filter", "boundary", "no-kernel", "missing-kernel", "bad-module", "no-fn", "rate-gaussian", "rate-negative"])
def test_cli_bad_operator_flags_are_clear_errors(assets, tmp_path, capsys, extra, msg):
    out = tmp_path / "never"
    assert main(_cli(assets, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err, err
    assert not out.exists()


def test_cli_python_callable_that_changes_the_shape_takes_x_from_the_images(assets, tmp_path, capsys):
    out = tmp_path / "run"
    fn = "tests.operators.test_reconstruct_operators:half_size"
    assert main(_cli(assets, out, "--operator", "python", "--operator-fn", fn)) == 0, capsys.readouterr().err
    m = json.loads((out / MANIFEST).read_text())
    assert m["status"] == "complete" and m["settings"]["operator"]["input_shape"] == [3, 32, 32]


def test_python_shape_changing_operator_without_input_shape_names_it():
    from dps_fast import DPS, NoiseSchedule

    A = operators.Differentiable(half_size)
    dps = DPS(lambda x, t: torch.zeros_like(x), NoiseSchedule.linear(1000).respace(2), A, sigma_n=0.1)
    with pytest.raises(ValueError, match=r"input_shape: .*changes the shape.*pass input_shape=\(C, \*S\)"):
        dps.sample(torch.zeros(1, 3, 8, 8))
    B = operators.Differentiable(half_size, input_shape=(3, 16, 16))
    res = DPS(lambda x, t: 0.1 * x, NoiseSchedule.linear(1000).respace(2), B, zeta=0.0, sigma_n=0.1).sample(
        torch.zeros(1, 3, 8, 8), seed=0)
    assert res.samples.shape == (1, 1, 3, 16, 16)


@pytest.mark.parametrize("op", [operators.GaussianBlur(1.0), operators.Inpainting.box((8, 8), (2, 2)),
                                operators.SuperResolution(2), operators.PhaseRetrieval(2.0)],
                         ids=["blur", "inpaint", "superres", "phase"])
@pytest.mark.parametrize("shape", [(1, 8), (1, 3, 8, 8, 2)], ids=["rank2", "rank5"])
def test_wrong_rank_y_is_reported_as_y(op, shape):
    """A y of the wrong rank is the user's y, not the sampler's state x (x_t)."""
    from dps_fast import DPS, NoiseSchedule

    dps = DPS(lambda x, t: 0.1 * x, NoiseSchedule.linear(1000).respace(2), op, sigma_n=0.1)
    with pytest.raises(ValueError, match=r"^y: ") as info:
        dps.sample(torch.zeros(shape))
    assert str(tuple(shape)) in str(info.value)
    with pytest.raises(ValueError, match=r"^y: "):  # and in the explicit step
        x = torch.zeros((1,) + tuple(shape[1:]))
        dps.step(x, 0, torch.zeros(shape), x)
