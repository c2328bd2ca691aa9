"""Blur boundaries: exact adjoints for every boundary, the reflect/replicate/zero blurs against an
independent construction (torch/numpy padding followed by a valid convolution), the fused
residual against the plain one, the DPS2022 Gaussian blur, the wrap-around warning, and the
backends (torch == autograd reference, triton interpreter == torch) on a reflect blur step."""

import logging
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dps_fast import DPS, NoiseSchedule, operators
from dps_fast.operators import BOUNDARIES, Blur, GaussianBlur
from dps_fast.operators.blur import fft_size
from tests.nets import TinyEps, UntrainedDPS

F64 = torch.float64

# (signal shape, kernel shape): 1-D and 2-D, odd and even sizes and kernels, batch 1 and 7,
# a 1-pixel axis, kernels larger than the signal; 4x4 with an 8x9 kernel: both axes pad 4 -> 12 but
# with different left margins (each axis keeps its own reflection index)
GEOMETRIES = [
    ((3, 2, 11), (3,)), ((1, 1, 10), (4,)), ((2, 1, 5), (9,)), ((7, 1, 2), (5,)),
    ((2, 3, 9, 8), (5, 4)), ((1, 2, 16, 13), (7, 7)), ((2, 1, 1, 6), (3, 3)), ((1, 1, 4, 5), (9, 8)),
    ((1, 1, 4, 4), (8, 9)),
]
GEO_IDS = [f"{'x'.join(map(str, s))}-k{'x'.join(map(str, k))}" for s, k in GEOMETRIES]
CASES = [(b, s, k) for b in BOUNDARIES for s, k in GEOMETRIES]
CASE_IDS = [f"{b}-{i}" for b in BOUNDARIES for i in GEO_IDS]


def _kernel(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.1


@pytest.mark.parametrize("boundary,shape,kshape", CASES, ids=CASE_IDS)
def test_adjoint_identity_and_fused_residual(boundary, shape, kshape):
    A = Blur(_kernel(kshape), boundary)
    g = torch.Generator().manual_seed(zlib.crc32(repr((boundary, shape, kshape)).encode()))
    x = torch.randn(shape, generator=g, dtype=F64)
    ax = A(x)
    assert ax.shape == x.shape
    y = torch.randn(ax.shape, generator=g, dtype=F64)
    lhs, rhs = (ax * y).sum(), (x * A.adjoint(y)).sum()
    assert abs(float(lhs - rhs)) <= 1e-12 * max(1.0, abs(float(lhs))), (float(lhs), float(rhs))
    # the fused residual (4 FFTs on the padded grid + the spectral stage) == adjoint(A x - y)
    w, rn2 = A.residual(x, A.prepare(y))
    r = ax - y
    torch.testing.assert_close(w, A.adjoint(r), rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(rn2, r.square().flatten(1).sum(1), rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(A.normal_residual(x, y), A.adjoint(r), rtol=1e-10, atol=1e-11)


def _padded_valid_conv(x: torch.Tensor, k: torch.Tensor, mode: str) -> torch.Tensor:
    """Independent construction: pad (torch's F.pad) by (k-1)//2 before and k//2 after each axis
    (the centre tap k//2 sits at offset 0), then a valid conv (a correlation, so flip the kernel)."""
    c = x.shape[1]
    if k.dim() == 1:
        xp = F.pad(x, ((k.shape[0] - 1) // 2, k.shape[0] // 2), mode=mode)
        return F.conv1d(xp, k.flip(0).expand(c, 1, -1), groups=c)
    kh, kw = k.shape
    xp = F.pad(x, ((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2), mode=mode)
    return F.conv2d(xp, k.flip(0, 1).expand(c, 1, kh, kw), groups=c)


@pytest.mark.parametrize("boundary,mode", [("reflect", "reflect"), ("replicate", "replicate"), ("zero", "constant")])
@pytest.mark.parametrize("shape,kshape", [((2, 3, 17), (5,)), ((1, 1, 12), (6,)), ((2, 3, 16, 13), (7, 5)),
                                          ((1, 2, 9, 10), (4, 6)), ((3, 1, 8, 8), (7, 7))],
                         ids=["1d-17-k5", "1d-12-k6", "2d-16x13-k7x5", "2d-9x10-k4x6", "2d-8x8-k7x7"])
def test_blur_equals_padding_then_valid_conv(boundary, mode, shape, kshape):
    g = torch.Generator().manual_seed(4)
    k = torch.randn(kshape, generator=g, dtype=F64)  # asymmetric: a flipped kernel would fail
    x = torch.randn(shape, generator=g, dtype=F64)
    torch.testing.assert_close(Blur(k, boundary)(x), _padded_valid_conv(x, k, mode), rtol=0, atol=1e-12)


@pytest.mark.parametrize("boundary,np_mode", [("reflect", "reflect"), ("replicate", "edge"), ("zero", "constant")])
def test_kernel_larger_than_the_image_against_numpy_padding(boundary, np_mode):
    """Padding wider than the signal (numpy keeps reflecting; torch's F.pad refuses), 2-D."""
    g = torch.Generator().manual_seed(8)
    k = torch.randn(13, 11, generator=g, dtype=F64)
    x = torch.randn(2, 1, 5, 4, generator=g, dtype=F64)
    xp = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (6, 6), (5, 5)), mode=np_mode))
    want = F.conv2d(xp, k.flip(0, 1)[None, None])
    torch.testing.assert_close(Blur(k, boundary)(x), want, rtol=0, atol=1e-12)


def test_dps2022_gaussian_blur():
    """DPS2022's GaussialBlurOperator(kernel_size=61, intensity=3): scipy's gaussian_filter of a
    centred delta (a sampled Gaussian of radius int(4 * 3 + 0.5) = 12, normalised), reflection
    padding of 30, valid conv. Built here from that description, independently of the operator."""
    j = torch.arange(-12, 13, dtype=F64)
    g1 = torch.exp(-j**2 / 18)
    g1 = g1 / g1.sum()
    k = torch.zeros(61, 61, dtype=F64)
    k[18:43, 18:43] = torch.outer(g1, g1)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=F64) * 2 - 1
    want = F.conv2d(F.pad(x, (30, 30, 30, 30), mode="reflect"), k.expand(3, 1, 61, 61), groups=3)
    got = GaussianBlur(3.0, 61, boundary="reflect", truncate=4.0)(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_fft_size_is_smooth_and_minimal():
    for n in (1, 7, 11, 13, 316, 1000, 1031):
        m = fft_size(n)
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        assert r == 1 and m >= n
        assert all(fft_size(q) != q for q in range(n, m))  # nothing smaller in between is smooth
    assert fft_size(316) == 320  # the 61-tap kernel on 256 pixels


def test_circular_kernel_larger_than_image_warns_once_per_shape(caplog):
    A = GaussianBlur(3.0, 61)
    x = torch.zeros(1, 3, 32, 32)
    with caplog.at_level(logging.WARNING, logger="dps_fast.operators.blur"):
        A(x), A(x), A.adjoint(x), A.prepare(x)
        A(torch.zeros(1, 1, 40, 40))
        GaussianBlur(3.0, 61, boundary="reflect")(x)
        GaussianBlur(1.0, 5)(x)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2, msgs
    assert "61x61 kernel is larger than the 32x32 signal" in msgs[0] and "boundary='reflect'" in msgs[0]
    assert "40x40" in msgs[1]


def test_boundaries_differ_only_near_the_edges():
    """A sanity check that the boundary matters where it should: away from the edges by more than
    the kernel radius every boundary gives the same blur."""
    x = torch.randn(1, 1, 24, 24, dtype=F64)
    outs = {b: GaussianBlur(1.0, 5, boundary=b)(x) for b in BOUNDARIES}
    for b in BOUNDARIES[1:]:
        torch.testing.assert_close(outs[b][..., 2:-2, 2:-2], outs["circular"][..., 2:-2, 2:-2])
        assert float((outs[b] - outs["circular"]).abs().max()) > 1e-3


def test_bad_boundary_is_a_clear_error():
    with pytest.raises(ValueError, match=r"boundary: expected one of .*'mirror'"):
        Blur(torch.ones(3), boundary="mirror")
    with pytest.raises(ValueError, match="truncate"):
        GaussianBlur(1.0, truncate=-1.0)


def _step_problem(boundary):
    g = torch.Generator().manual_seed(0)
    A = Blur(torch.rand(3, 4, generator=g, dtype=F64), boundary)
    x0 = torch.rand(2, 2, 7, 6, generator=g, dtype=F64) * 2 - 1
    y = A(x0) + 0.05 * torch.randn(x0.shape, generator=g, dtype=F64)
    return A, TinyEps(2, 8).double(), y


@pytest.mark.parametrize("boundary", BOUNDARIES[1:])
def test_torch_backend_equals_autograd_reference(boundary):
    A, net, y = _step_problem(boundary)
    sched = NoiseSchedule.linear(1000).respace(5)
    opts = dict(zeta=0.5, sigma_n=0.1, compile=False, clip_x0=(-1.0, 1.0), guidance=["squared", "normalized"])
    res = {be: UntrainedDPS(net, sched, A, backend=be, **opts).sample(y, num_samples=2, seed=3, record="all")
           for be in ("reference", "torch")}
    for i in range(5):
        a, b = res["torch"].trajectory[i], res["reference"].trajectory[i]
        assert float((a - b).norm() / b.norm()) < 1e-10, f"step {i}"
    torch.testing.assert_close(res["torch"].residual_norm, res["reference"].residual_norm, rtol=1e-10, atol=1e-12)


def test_triton_backend_equals_torch_backend_on_a_reflect_blur_step():
    """The triton op set's fused spectral kernel (interpreter on CPU) in the padded-domain residual."""
    A, net, y = _step_problem("reflect")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    net, y = net.to(dev), y.to(dev)
    sched = NoiseSchedule.linear(1000).respace(3)
    opts = dict(zeta=0.5, sigma_n=0.1, compile=False, guidance="normalized", clip_x0=(-1.0, 1.0))
    runs = {be: UntrainedDPS(net, sched, A, backend=be, **opts).sample(y, num_samples=2, seed=11, record="all")
            for be in ("torch", "triton")}
    for i in range(3):
        a, b = runs["triton"].trajectory[i], runs["torch"].trajectory[i]
        assert float((a - b).norm() / b.norm()) < 1e-9, f"step {i}"
    torch.testing.assert_close(runs["triton"].residual_norm, runs["torch"].residual_norm, rtol=1e-9, atol=1e-12)


def test_triton_spectral_stage_is_called_for_a_reflect_blur(monkeypatch):
    """The FusedBackend hands its op set to the blur: the triton spectral kernel runs (not torch's)."""
    from dps_fast.backends import triton_ops

    calls = []
    real = triton_ops.spectral_residual
    monkeypatch.setattr(triton_ops, "spectral_residual", lambda *a: calls.append(1) or real(*a))
    A, net, y = _step_problem("reflect")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sched = NoiseSchedule.linear(1000).respace(2)
    UntrainedDPS(net.to(dev), sched, A, backend="triton", compile=False).sample(y.to(dev), seed=0)
    assert len(calls) == 2  # one guided step and the final x0hat step
