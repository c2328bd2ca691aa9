"""The fused DPS update: noise modes, variances, in place, strides, model-output slices, bf16.

Part of the Triton backend's tests (the others: tests/kernels/test_*.py): every op against its
pure-torch reference (``torch_ops``). float64 states compare elementwise at rtol 1e-10; float32
within ``TOL``; bfloat16 by the flash-attention rule (at most 2x the error of torch_ops run in
bfloat16). Outputs are poisoned with NaN before every kernel (tests/kernels/conftest.py). On CPU
the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py), so shapes stay small.
"""

from __future__ import annotations

import pytest
import torch

from dps_fast.backends import torch_ops as ref_ops
from dps_fast.backends import triton_ops as ops
from dps_fast.noise import STREAM_STEP, philox_normal
from dps_fast.schedule import Coef
from tests.conftest import rel_err
from tests.kernels.triton_cases import (CLIPS, DTYPES, SHAPES, STEP, VARIANCES, check, coefs, d, late_step_inputs,
                                        learned_output, randn, record_launch_args, update_inputs)


@pytest.mark.parametrize("noise_mode", ["explicit", "philox"])
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_dps_update(device, shape, dtype, variance, noise_mode) -> None:
    t, seeds, noise = update_inputs(shape, dtype, device, seed=9)
    for step in (0, STEP):
        c = coefs(device, dtype, step)
        for clip in CLIPS.values():
            kw = dict(coefs=c, step=step, clip=clip, variance=variance)
            out = torch.full_like(t["x"], float("nan"))
            if noise_mode == "explicit":
                got = ops.dps_update(**t, **kw, noise=noise, out=out)
                z = noise
            else:
                got = ops.dps_update(**t, **kw, seeds=seeds, out=out)
                z = philox_normal(seeds, t["x"][0].numel(), step, STREAM_STEP, dtype).view_as(t["x"])
            assert got is out and got.dtype == dtype
            # the same noise stream: torch_ops fed philox_normal's noise
            z64 = (noise.double() if noise_mode == "explicit" else
                   philox_normal(seeds, t["x"][0].numel(), step, STREAM_STEP, torch.float64).view_as(t["x"]))
            ref = ref_ops.dps_update(**{k: d(a) for k, a in t.items()}, coefs=c.double(), step=step,
                                     clip=clip, variance=variance, noise=z64)
            lowp = ref_ops.dps_update(**t, **kw, noise=z) if dtype == torch.bfloat16 else None
            check(got, lowp, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_dps_update_step0_has_no_noise(device, dtype) -> None:
    """At step 0 sigma = 0: the result does not depend on the seeds (and equals zero noise)."""
    t, seeds, _ = update_inputs((3, 2, 5, 7), dtype, device, seed=10)
    c = coefs(device, dtype, 0)
    assert float(c[Coef.NONZERO]) == 0.0
    for variance in VARIANCES:
        a = ops.dps_update(**t, coefs=c, step=0, variance=variance, seeds=seeds)
        b = ops.dps_update(**t, coefs=c, step=0, variance=variance, seeds=seeds + 12345)
        z = ops.dps_update(**t, coefs=c, step=0, variance=variance, noise=torch.zeros_like(t["x"]))
        assert torch.equal(a, b) and torch.equal(a, z)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_dps_update_in_place(device, dtype) -> None:
    """``out=x``: the state is updated in place and equals the out-of-place result."""
    t, seeds, _ = update_inputs((7, 3, 33, 17), dtype, device, seed=11)
    c = coefs(device, dtype)
    want = ops.dps_update(**t, coefs=c, step=STEP, clip=(-1.0, 1.0), seeds=seeds)
    x = t["x"]
    got = ops.dps_update(**t, coefs=c, step=STEP, clip=(-1.0, 1.0), seeds=seeds, out=x)
    assert got is x and torch.equal(x, want)


def test_dps_update_non_contiguous(device) -> None:
    """Strided inputs and a strided ``out`` aliasing ``x`` (including the in-place case)."""
    gen = torch.Generator().manual_seed(12)
    base = randn(gen, (6, 4, 3, 9, 24), torch.float64, device)
    x, eps, w, u, v = (b[..., ::3] for b in base[:5].unbind(0))
    noise = base[5, ..., :8, :9].transpose(-1, -2)
    gscale = torch.rand(8, generator=gen, dtype=torch.float64).to(device)[::2]
    c = coefs(device, torch.float64)
    kw = dict(coefs=c, step=STEP, clip=(-1.0, 1.0), variance="learned_range", v=v, noise=noise)
    want = ref_ops.dps_update(x, eps, w, u, gscale, **kw)
    got = ops.dps_update(x, eps, w, u, gscale, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got = ops.dps_update(x, eps, w, u, gscale, **kw, out=x)
    assert got is x
    torch.testing.assert_close(x, want, rtol=1e-10, atol=1e-12)
    assert torch.equal(base[0][..., 1::3], base[0][..., 1::3].clone())


def test_dps_update_mixed_dtypes(device) -> None:
    """bfloat16 state with float32 network outputs and float64 gscale: result in bfloat16,
    computed in float32."""
    t, seeds, _ = update_inputs((2, 3, 8, 8), torch.float32, device, seed=13)
    x = t["x"].to(torch.bfloat16)
    c = coefs(device, torch.float32)
    got = ops.dps_update(x, t["eps"], t["w"], t["u"], t["gscale"].double(), c, STEP, seeds=seeds)
    ref = ref_ops.dps_update(x.double(), t["eps"].double(), t["w"].double(), t["u"].double(),
                             t["gscale"].double(), c.double(), STEP, seeds=seeds).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ref.double()) <= 2.0**-8


@pytest.mark.parametrize("shape", [(1, 1, 37), (7, 3, 5, 4)], ids=["1x37", "7x3x5x4"])
def test_update_reads_step_from_device_tensor(shape):
    """CUDA-graph replay passes the step as an int64 device tensor; the noise must be the same."""
    from dps_fast.backends import torch_ops as T
    from dps_fast.backends import triton_ops as K
    from dps_fast.schedule import Coef, NoiseSchedule

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    x, eps, w, u = (torch.randn(shape, generator=g).to(dev) for _ in range(4))
    coefs = NoiseSchedule.linear(1000).table(torch.float32, dev)[123]
    gscale = torch.rand(shape[0], generator=g).to(dev)
    seeds = torch.randint(0, 2**62, (shape[0],), generator=g).to(dev)
    step_t = torch.tensor([123], dtype=torch.int64, device=dev)
    a = K.dps_update(x, eps, w, u, gscale, coefs, step_t, seeds=seeds)
    b = K.dps_update(x, eps, w, u, gscale, coefs, 123, seeds=seeds)
    c = T.dps_update(x, eps, w, u, gscale, coefs, step_t, seeds=seeds)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=2e-5, atol=2e-5)
    assert int(coefs[Coef.STEP]) == 123
    with pytest.raises(TypeError, match="step"):
        K.dps_update(x, eps, w, u, gscale, coefs, torch.tensor([1.0], device=dev), seeds=seeds)


@pytest.mark.parametrize("variance", ["learned_range", "fixed_small"])
@pytest.mark.parametrize("shape", [(3, 3, 5, 7), (1, 2, 1, 37), (2, 1, 4, 4)], ids=["3x3x5x7", "1x2x1x37", "2x1x4x4"])
def test_update_reads_model_output_slices_in_place(device, monkeypatch, shape, variance) -> None:
    """eps = out[:, :C] and v = out[:, C:] of a learned-variance output reach the kernel as the
    very same memory (no .contiguous() copy) and give the contiguous result bit for bit."""
    from dps_fast.kernels import update as kupdate

    t, seeds, _ = update_inputs(shape, torch.float32, device, seed=21)
    out = learned_output(shape, torch.float32, device, seed=22)
    c = shape[1]
    eps, v = out[:, :c], out[:, c:]
    assert not eps.is_contiguous() or shape[0] == 1
    kw = dict(coefs=coefs(device, torch.float32), step=STEP, clip=(-1.0, 1.0), variance=variance,
              v=v if variance == "learned_range" else None, seeds=seeds)
    want = ops.dps_update(t["x"], eps.contiguous(), t["w"], t["u"], t["gscale"],
                          **{**kw, "v": kw["v"].contiguous() if kw["v"] is not None else None})
    calls = record_launch_args(monkeypatch, kupdate, "dps_update", ("eps", "v"))
    got = ops.dps_update(t["x"], eps, t["w"], t["u"], t["gscale"], **kw)
    assert torch.equal(got, want)
    (call,) = calls
    assert call["eps"] == eps.data_ptr()
    if variance == "learned_range":
        assert call["v"] == v.data_ptr()


def test_bf16_state_x0hat_error_is_storage_rounding(device) -> None:
    """With float32 coefficients the kernels' x0hat of a bfloat16 state is the float64 x0hat of
    the same inputs rounded once to bfloat16; a bfloat16 coefficient row (sqrt(1/abar) ~157
    rounded by up to 0.2%) costs more than twice that, and is refused."""
    x, eps, c64, c32 = late_step_inputs((2, 3, 16, 16), device)
    ref = ref_ops.tweedie(x.double(), eps.double(), c64, None)
    storage = rel_err(ref.to(torch.bfloat16), ref)  # bf16 rounding alone: ~2^-9 / sqrt(3)
    got = ops.tweedie(x, eps, c32, None)
    assert rel_err(got, ref) <= 1.01 * storage
    x0p, _, _ = ops.prep_elementwise(x, eps, c32, None, torch.zeros_like(x), None)
    assert rel_err(x0p, ref) <= 1.01 * storage
    # what the old cast to the state dtype did: the same kernel fed bfloat16-rounded coefficients
    lossy = ops.tweedie(x, eps, c32.to(torch.bfloat16).float(), None)
    assert rel_err(lossy, ref) > 2 * storage  # measured 2.4x here (0.48% against 0.20%)
    with pytest.raises(TypeError, match="coefs: expected float32 or float64.*got bfloat16"):
        ops.tweedie(x, eps, c32.to(torch.bfloat16), None)


def test_update_expanded_eps_and_v(device) -> None:
    """eps / v expanded over the samples (sample stride 0) are read in place as broadcasts."""
    t, seeds, _ = update_inputs((3, 2, 4, 5), torch.float64, device, seed=28)
    eps, v = t["eps"][:1].expand_as(t["x"]), t["v"][:1].expand_as(t["x"])
    assert ops._rows(eps)[1] == 0
    kw = dict(coefs=coefs(device, torch.float64), step=STEP, clip=(-1.0, 1.0), variance="learned_range", seeds=seeds)
    got = ops.dps_update(t["x"], eps, t["w"], t["u"], t["gscale"], v=v, **kw)
    want = ref_ops.dps_update(t["x"], eps.contiguous(), t["w"], t["u"], t["gscale"], v=v.contiguous(), **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
