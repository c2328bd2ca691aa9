"""Every op of the Triton backend against its pure-torch reference (``torch_ops``).

float64 states compare elementwise at rtol 1e-10 (the kernels then compute in float64);
float32 within ``TOL``; bfloat16 by the flash-attention rule: the kernel's error against the
float64 reference of the same (bfloat16) inputs is at most 2x the error of torch_ops run in
bfloat16. Outputs are poisoned with NaN before every kernel (an ``empty`` that fills NaN, and
NaN-filled ``out``), so an element that is never written fails. On CPU the kernels run under
``TRITON_INTERPRET=1`` (tests/conftest.py), so shapes stay small.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dps_fast.backends import torch_ops as ref_ops
from dps_fast.backends import triton_ops as ops
from dps_fast.kernels import philox as kphilox
from dps_fast.noise import STREAM_INIT, STREAM_STEP, philox4x32, philox_normal
from dps_fast.schedule import Coef, NoiseSchedule
from tests.conftest import HAS_CUDA, TOL, rel_err

SHAPES = {"1": (1, 1, 1), "1x1x37": (1, 1, 37), "7x3x33x17": (7, 3, 33, 17), "2x1x1x37": (2, 1, 1, 37)}
DTYPES = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16}
CLIPS = {"noclip": None, "clip": (-1.0, 1.0)}
SCHEDULE = NoiseSchedule.linear(1000).respace(20)
STEP = 7  # a step i > 0 (noise on); step 0 has sigma = 0


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.empty`` returns NaN-filled floating tensors, so unwritten outputs show up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


def _coefs(device: torch.device, dtype: torch.dtype, step: int = STEP) -> torch.Tensor:
    return SCHEDULE.table(dtype, device)[step]


def _randn(gen: torch.Generator, shape, dtype, device, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)


def _d(t):
    return None if t is None else t.double()


def _check(out: torch.Tensor, lowp: torch.Tensor | None, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """``out`` (fast path) against the float64 ``ref``; ``lowp`` is torch_ops run in ``dtype``."""
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite output elements"
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    elif dtype == torch.float32:
        assert rel_err(out, ref) <= TOL[torch.float32]
    else:
        # flash-attention rule: at most 2x the error of plain torch in bfloat16
        assert lowp is not None
        assert rel_err(out, ref) <= 2 * rel_err(lowp, ref) + 1e-6, (rel_err(out, ref), rel_err(lowp, ref))


# ---- Philox ---------------------------------------------------------------------------------
def test_philox_known_answers(device: torch.device) -> None:
    """Random123's Philox4x32-10 known-answer vectors, on the raw uint32 words."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, expect in cases:
        args = [torch.tensor([v], dtype=torch.int64, device=device) for v in ctr + key]
        got = [int(w) for w in kphilox.philox_words(*args)]
        assert got == list(expect)


def test_philox_words_bit_exact(device: torch.device) -> None:
    """The Triton rounds equal noise.philox4x32 bit for bit: element counters, several steps and
    streams, 64-bit seeds above 2^32 (both key words non-zero)."""
    gen = torch.Generator().manual_seed(0)
    seeds = torch.tensor([2**32 + 5, 2**62 - 1, 0x5EADBEEF12345678, 1, -3], dtype=torch.int64)
    numel = 97
    c0 = torch.arange(numel, dtype=torch.int64).repeat(len(seeds) * 3 * 2)
    cols = []
    for s in seeds.tolist():
        for step in (0, 1, 2**31 + 3):
            for stream in (STREAM_STEP, STREAM_INIT):
                cols.append((s, step, stream))
    meta = torch.tensor(cols, dtype=torch.int64).repeat_interleave(numel, 0)
    seed, step, stream = meta.unbind(1)
    c3 = torch.randint(0, 2**32, c0.shape, generator=gen, dtype=torch.int64)
    args = (c0, step & 0xFFFFFFFF, stream, c3, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    want = philox4x32(*args)
    got = kphilox.philox_words(*(a.to(device) for a in args))
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_philox_normal_stream(device: torch.device, dtype: torch.dtype) -> None:
    seeds = torch.tensor([7, 2**40 + 3, 2**62 - 11, -5], dtype=torch.int64, device=device)
    for step, stream in ((0, STREAM_STEP), (13, STREAM_STEP), (999, STREAM_INIT)):
        got = kphilox.normal(seeds, 301, step, stream, dtype)
        want = philox_normal(seeds, 301, step, stream, dtype)
        if dtype == torch.float64:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        else:
            # float32 log/cos of the interpreter (numpy) or libdevice vs torch: a few ulp
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---- tweedie / clip mask -----------------------------------------------------------------
@pytest.mark.parametrize("clip", CLIPS.values(), ids=CLIPS.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_tweedie(device, shape, dtype, clip) -> None:
    gen = torch.Generator().manual_seed(1)
    x, eps = _randn(gen, (2, *shape), dtype, device).unbind(0)
    c = _coefs(device, dtype)
    out = ops.tweedie(x, eps, c, clip)
    assert out.dtype == dtype
    ref = ref_ops.tweedie(x.double(), eps.double(), c.double(), clip)
    _check(out, ref_ops.tweedie(x, eps, c, clip), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_apply_clip_mask(device, shape, dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    w, x0 = _randn(gen, (2, *shape), dtype, device).unbind(0)
    x0 = x0.clamp(-1, 1)  # values on the bounds must be masked out too
    want = ref_ops.apply_clip_mask(w.double().clone(), x0.double(), (-1.0, 1.0))
    w_in = w.clone()
    got = ops.apply_clip_mask(w_in, x0, (-1.0, 1.0))
    assert got is w_in
    assert torch.equal(got.double(), want)  # a multiply by 0/1 is exact in any dtype
    same = ops.apply_clip_mask(w_in, x0, None)
    assert same is w_in and torch.equal(same.double(), want)


def test_apply_clip_mask_non_contiguous(device) -> None:
    gen = torch.Generator().manual_seed(3)
    base = _randn(gen, (2, 7, 3, 9, 12), torch.float32, device)
    w, x0 = base[0][..., ::2], base[1].transpose(-1, -2)[..., :9, :6]
    assert not w.is_contiguous() and not x0.is_contiguous()
    want = ref_ops.apply_clip_mask(w.clone(), x0, (-0.5, 0.5))
    got = ops.apply_clip_mask(w, x0, (-0.5, 0.5))
    assert got is w and torch.equal(w, want)
    assert torch.equal(base[0][..., 1::2], base[0][..., 1::2].clone())  # untouched neighbours


# ---- elementwise-operator residual ----------------------------------------------------------
MASKS = ["none", "bool-S", "float-1S", "per-sample"]


def _mask(kind: str, shape, dtype, device, gen):
    if kind == "none":
        return None
    if kind == "bool-S":
        return (torch.rand(shape[1:], generator=gen) > 0.3).to(device)
    if kind == "float-1S":
        return (torch.rand((1, *shape[1:]), generator=gen) > 0.3).to(device=device, dtype=dtype)
    return (torch.rand(shape, generator=gen) > 0.3).to(device=device, dtype=dtype)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("clip", CLIPS.values(), ids=CLIPS.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_prep_elementwise(device, shape, dtype, clip, mask_kind) -> None:
    gen = torch.Generator().manual_seed(4)
    x, eps, y = _randn(gen, (3, *shape), dtype, device).unbind(0)
    m = _mask(mask_kind, shape, dtype, device, gen)
    c = _coefs(device, dtype)
    x0, w, rn = ops.prep_elementwise(x, eps, c, clip, y, m)
    assert x0.dtype == dtype and w.dtype == dtype and rn.shape == (shape[0],)
    assert rn.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    md = None if m is None else m.double()
    rx0, rw, rrn = ref_ops.prep_elementwise(x.double(), eps.double(), c.double(), clip, y.double(), md)
    if dtype == torch.bfloat16:
        # The kernel forms r from the float32 x0hat, torch from the bfloat16-rounded one; near a
        # clip bound the two may disagree on the mask, which the flash rule (L2) absorbs.
        lx0, lw, lrn = ref_ops.prep_elementwise(x, eps, c, clip, y, None if m is None else m.to(dtype))
    else:
        lx0 = lw = lrn = None
    _check(x0, lx0, rx0, dtype)
    _check(w, lw, rw, dtype)
    _check(rn, lrn, rrn, dtype)


def test_prep_elementwise_non_contiguous(device) -> None:
    gen = torch.Generator().manual_seed(5)
    base = _randn(gen, (3, 7, 3, 17, 66), torch.float64, device)
    x, eps, y = (b[..., ::2] for b in base.unbind(0))
    m = (torch.rand(17, 3, generator=gen) > 0.5).to(device).t()  # [3, 17] broadcast over H
    m = m[:, :, None].expand(3, 17, 33)
    c = _coefs(device, torch.float64)
    got = ops.prep_elementwise(x, eps, c, (-1.0, 1.0), y, m)
    want = ref_ops.prep_elementwise(x, eps, c, (-1.0, 1.0), y, m.double())
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


# ---- blur: spectral stage and normal residual -----------------------------------------------
def _blur_inputs(shape, real, device, gen):
    ndim = len(shape) - 2
    dims = tuple(range(-ndim, 0))
    x0 = _randn(gen, shape, real, device)
    kern = torch.rand(shape[-ndim:], generator=gen, dtype=torch.float64)
    K = torch.fft.rfftn((kern / kern.sum()).to(device=device, dtype=real), dim=dims)
    Y = torch.fft.rfftn(_randn(gen, shape, real, device), dim=dims)
    return x0, K, Y, ndim, dims


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_spectral_residual(device, shape, dtype) -> None:
    gen = torch.Generator().manual_seed(6)
    x0, K, Y, ndim, dims = _blur_inputs(shape, dtype, device, gen)
    X = torch.fft.rfftn(x0, dim=dims)
    W, rn = ops.spectral_residual(X, K, Y, shape[-1])
    rW, rrn = ref_ops.spectral_residual(X.to(torch.complex128), K.to(torch.complex128),
                                        Y.to(torch.complex128), shape[-1])
    assert W.dtype == X.dtype and rn.dtype == dtype and rn.shape == (shape[0],)
    _check(W, None, rW, dtype)
    _check(rn, None, rrn, dtype)


def test_spectral_residual_channel_kernel(device) -> None:
    """A per-channel transfer function ``[C, *F]`` broadcasts like torch does."""
    gen = torch.Generator().manual_seed(7)
    X, Y = torch.randn(2, 4, 3, 5, 4, generator=gen, dtype=torch.complex128).to(device).unbind(0)
    K = torch.randn(3, 5, 4, generator=gen, dtype=torch.complex128).to(device)
    for k in (K, K[:1], K[0], K[None]):
        got = ops.spectral_residual(X, k, Y, 6)
        want = ref_ops.spectral_residual(X, k, Y, 6)
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_blur_normal_residual(device, shape, dtype) -> None:
    gen = torch.Generator().manual_seed(8)
    spec_real = torch.float64 if dtype == torch.float64 else torch.float32
    x0, K, Y, ndim, _ = _blur_inputs(shape, spec_real, device, gen)
    x0 = x0.to(dtype)
    r, rn = ops.blur_normal_residual(x0, K, Y, ndim)
    assert r.dtype == dtype and r.shape == x0.shape
    rr, rrn = ref_ops.blur_normal_residual(x0.double(), K.to(torch.complex128), Y.to(torch.complex128), ndim)
    if dtype == torch.bfloat16:
        # torch.fft has no bfloat16: the spectra are float32 and only the residual is rounded to
        # bfloat16, whose relative L2 error is at most the unit roundoff 2^-8.
        assert torch.isfinite(r).all()
        assert rel_err(r, rr) <= 2.0**-8
        assert rel_err(rn, rrn) <= TOL[torch.float32]
    else:
        _check(r, None, rr, dtype)
        _check(rn, None, rrn, dtype)


# ---- the fused update -----------------------------------------------------------------------
VARIANCES = ["fixed_small", "fixed_large", "learned_range"]


def _update_inputs(shape, dtype, device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x, eps, w, u, noise = _randn(gen, (5, *shape), dtype, device).unbind(0)
    v = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).to(device=device, dtype=dtype)
    gscale = torch.rand(shape[0], generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    seeds = torch.randint(2**33, 2**62, (shape[0],), generator=gen, dtype=torch.int64).to(device)
    return dict(x=x, eps=eps, w=w, u=u, v=v, gscale=gscale), seeds, noise


@pytest.mark.parametrize("noise_mode", ["explicit", "philox"])
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_dps_update(device, shape, dtype, variance, noise_mode) -> None:
    t, seeds, noise = _update_inputs(shape, dtype, device, seed=9)
    for step in (0, STEP):
        c = _coefs(device, dtype, step)
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
            ref = ref_ops.dps_update(**{k: _d(a) for k, a in t.items()}, coefs=c.double(), step=step,
                                     clip=clip, variance=variance, noise=z64)
            lowp = ref_ops.dps_update(**t, **kw, noise=z) if dtype == torch.bfloat16 else None
            _check(got, lowp, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_dps_update_step0_has_no_noise(device, dtype) -> None:
    """At step 0 sigma = 0: the result does not depend on the seeds (and equals zero noise)."""
    t, seeds, _ = _update_inputs((3, 2, 5, 7), dtype, device, seed=10)
    c = _coefs(device, dtype, 0)
    assert float(c[Coef.NONZERO]) == 0.0
    for variance in VARIANCES:
        a = ops.dps_update(**t, coefs=c, step=0, variance=variance, seeds=seeds)
        b = ops.dps_update(**t, coefs=c, step=0, variance=variance, seeds=seeds + 12345)
        z = ops.dps_update(**t, coefs=c, step=0, variance=variance, noise=torch.zeros_like(t["x"]))
        assert torch.equal(a, b) and torch.equal(a, z)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_dps_update_in_place(device, dtype) -> None:
    """``out=x``: the state is updated in place and equals the out-of-place result."""
    t, seeds, _ = _update_inputs((7, 3, 33, 17), dtype, device, seed=11)
    c = _coefs(device, dtype)
    want = ops.dps_update(**t, coefs=c, step=STEP, clip=(-1.0, 1.0), seeds=seeds)
    x = t["x"]
    got = ops.dps_update(**t, coefs=c, step=STEP, clip=(-1.0, 1.0), seeds=seeds, out=x)
    assert got is x and torch.equal(x, want)


def test_dps_update_non_contiguous(device) -> None:
    """Strided inputs and a strided ``out`` aliasing ``x`` (including the in-place case)."""
    gen = torch.Generator().manual_seed(12)
    base = _randn(gen, (6, 4, 3, 9, 24), torch.float64, device)
    x, eps, w, u, v = (b[..., ::3] for b in base[:5].unbind(0))
    noise = base[5, ..., :8, :9].transpose(-1, -2)
    gscale = torch.rand(8, generator=gen, dtype=torch.float64).to(device)[::2]
    c = _coefs(device, torch.float64)
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
    t, seeds, _ = _update_inputs((2, 3, 8, 8), torch.float32, device, seed=13)
    x = t["x"].to(torch.bfloat16)
    c = _coefs(device, torch.float32)
    got = ops.dps_update(x, t["eps"], t["w"], t["u"], t["gscale"].double(), c, STEP, seeds=seeds)
    ref = ref_ops.dps_update(x.double(), t["eps"].double(), t["w"].double(), t["u"].double(),
                             t["gscale"].double(), c.double(), STEP, seeds=seeds).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ref.double()) <= 2.0**-8


# ---- bad input ------------------------------------------------------------------------------
def test_bad_inputs(device) -> None:
    t, seeds, noise = _update_inputs((2, 3, 4, 5), torch.float32, device, seed=14)
    c = _coefs(device, torch.float32)
    x, eps, w, u, g = t["x"], t["eps"], t["w"], t["u"], t["gscale"]
    with pytest.raises(ValueError, match=r"eps: expected the shape of x \(2, 3, 4, 5\), got \(2, 3, 4, 4\)"):
        ops.dps_update(x, eps[..., :4], w, u, g, c, STEP, seeds=seeds)
    with pytest.raises(ValueError, match="w: expected a tensor on x's device"):
        ops.dps_update(x, eps, w.to("meta"), u, g, c, STEP, seeds=seeds)
    with pytest.raises(TypeError, match="u: expected dtype float32, float64, bfloat16, got int32"):
        ops.dps_update(x, eps, w, u.to(torch.int32), g, c, STEP, seeds=seeds)
    with pytest.raises(TypeError, match="x: expected dtype .* got float16"):
        ops.tweedie(x.half(), eps, c)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        ops.tweedie([1.0], eps, c)
    with pytest.raises(TypeError, match="seeds: expected dtype int64, got int32"):
        ops.dps_update(x, eps, w, u, g, c, STEP, seeds=seeds.int())
    with pytest.raises(ValueError, match=r"seeds: expected an int64 tensor \[N\] = \[2\], got shape \(3,\)"):
        ops.dps_update(x, eps, w, u, g, c, STEP, seeds=torch.arange(3, device=device))
    with pytest.raises(ValueError, match="seeds: needed when noise is None"):
        ops.dps_update(x, eps, w, u, g, c, STEP)
    with pytest.raises(ValueError, match=r"gscale: expected one value per sample \[N\] = \[2\]"):
        ops.dps_update(x, eps, w, u, torch.ones(3, device=device), c, STEP, seeds=seeds)
    with pytest.raises(ValueError, match=r"coefs: expected one row \[Coef.COUNT\]"):
        ops.dps_update(x, eps, w, u, g, SCHEDULE.table(torch.float32, device), STEP, seeds=seeds)
    with pytest.raises(ValueError, match="variance: expected"):
        ops.dps_update(x, eps, w, u, g, c, STEP, variance="fixed", seeds=seeds)
    with pytest.raises(ValueError, match="v: learned_range variance needs"):
        ops.dps_update(x, eps, w, u, g, c, STEP, variance="learned_range", seeds=seeds)
    with pytest.raises(TypeError, match="step: expected an int or an int64 tensor, got float"):
        ops.dps_update(x, eps, w, u, g, c, 1.5, seeds=seeds)
    with pytest.raises(TypeError, match="clip: expected None or a pair"):
        ops.tweedie(x, eps, c, clip=1.0)
    with pytest.raises(ValueError, match=r"out: expected the shape of x"):
        ops.dps_update(x, eps, w, u, g, c, STEP, noise=noise, out=x[:1])
    with pytest.raises(ValueError, match="y: expected the shape of x"):
        ops.prep_elementwise(x, eps, c, None, y=x[:, :1], mask=None)
    with pytest.raises(ValueError, match="mask: expected a shape that broadcasts against one sample"):
        ops.prep_elementwise(x, eps, c, None, y=x, mask=torch.ones(2, device=device))
    X = torch.fft.rfftn(x, dim=(-2, -1))
    K = torch.ones(4, 3, dtype=torch.complex64, device=device)
    with pytest.raises(ValueError, match="n_last: expected the signal length"):
        ops.spectral_residual(X, K, X, 6)
    with pytest.raises(ValueError, match=r"K: expected a transfer function \[\*F\] = \(4, 3\)"):
        ops.spectral_residual(X, K[:2], X, 5)
    with pytest.raises(TypeError, match="Y: expected dtype complex64, got complex128"):
        ops.spectral_residual(X, K, X.to(torch.complex128), 5)
    with pytest.raises(ValueError, match="ndim: expected 1 or 2"):
        ops.blur_normal_residual(x, K, X, 3)
    with pytest.raises(ValueError, match=r"x0hat: expected \[N, C, \*S\] with 1 signal axes"):
        ops.blur_normal_residual(x, K, X, 1)


def test_needs_cuda_when_not_interpreting(monkeypatch, device) -> None:
    if device.type == "cuda":
        pytest.skip("CUDA tensors are valid here")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="x: the triton backend runs on CUDA tensors"):
        ops.tweedie(x, x, _coefs(device, torch.float32))


def test_empty_batch(device) -> None:
    x = torch.zeros(0, 3, 4, device=device)
    c = _coefs(device, torch.float32)
    assert ops.tweedie(x, x, c).shape == x.shape
    x0, w, rn = ops.prep_elementwise(x, x, c, None, x, None)
    assert x0.shape == x.shape and rn.shape == (0,)
    assert ops.dps_update(x, x, x, x, torch.zeros(0, device=device), c, 1,
                          seeds=torch.zeros(0, dtype=torch.int64, device=device)).shape == x.shape


def test_partial_sums_are_deterministic(device) -> None:
    """rnorm2 comes from per-block partials summed by torch: bitwise reproducible."""
    gen = torch.Generator().manual_seed(15)
    x, eps, y = _randn(gen, (3, 2, 3, 64, 64), torch.float32, device).unbind(0)
    c = _coefs(device, torch.float32)
    a = ops.prep_elementwise(x, eps, c, None, y, None)[2]
    b = ops.prep_elementwise(x, eps, c, None, y, None)[2]
    assert torch.equal(a, b)
    assert math.isfinite(float(a.sum()))


# ---- compiled mode without a GPU -------------------------------------------------------------
_AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dps_fast.backends import triton_ops  # noqa: F401  (registers dps_fast.kernels)
from dps_fast.kernels import philox, prep, spectral, update

FLOATS = {"lo_hi", "lo_lo", "hi_hi", "hi_lo"}
def compile_(fn, ptrs, consts):
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in consts else ptrs.get(name, "fp32" if name in FLOATS else "i32")
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))

def same(dt, names):
    return {n: "*" + dt for n in names}

U = ("x_ptr", "eps_ptr", "w_ptr", "u_ptr", "v_ptr", "z_ptr", "out_ptr")
P = ("x_ptr", "eps_ptr", "y_ptr", "x0_ptr", "w_ptr")
common = {"gscale_ptr": "*fp32", "seeds_ptr": "*i64", "coefs_ptr": "*fp32", "mask_ptr": "*u8", "step_ptr": "*i64"}
F32, BF16, F64 = (dict(F64=False, BLOCK=1024), dict(F64=False, BLOCK=1024), dict(F64=True, BLOCK=1024))
jobs = [
    (update._dps_update_kernel, {**same("fp32", U), **common},
     dict(CLIP=True, VARIANCE=2, PHILOX=True, STEP_PTR=False, **F32)),
    (update._dps_update_kernel, {**same("bf16", U), **common},
     dict(CLIP=False, VARIANCE=0, PHILOX=False, STEP_PTR=False, **BF16)),
    (update._dps_update_kernel, {**same("fp64", U), **common},
     dict(CLIP=True, VARIANCE=1, PHILOX=True, STEP_PTR=True, **F64)),
    (prep._prep_kernel, {**same("bf16", P), **common, "part_ptr": "*fp32"},
     dict(CLIP=True, HAS_MASK=True, MASK_PER_SAMPLE=False, **BF16)),
    (prep._tweedie_kernel, {**same("fp32", ("x_ptr", "eps_ptr", "out_ptr")), **common}, dict(CLIP=True, **F32)),
    (prep._clip_mask_kernel, same("bf16", ("w_ptr", "x0_ptr")), BF16),
    (spectral._spectral_kernel, same("fp32", ("x_ptr", "k_ptr", "y_ptr", "w_ptr", "part_ptr")),
     dict(EVEN=True, **F32)),
    (philox._normal_kernel, {"seeds_ptr": "*i64", "out_ptr": "*bf16"}, BF16),
    (philox._philox_words_kernel,
     same("i64", ("c0_ptr", "c1_ptr", "c2_ptr", "c3_ptr", "k0_ptr", "k1_ptr", "out_ptr")), dict(BLOCK=1024)),
]
try:
    compile_(*jobs[-1])
except (TypeError, ImportError, RuntimeError, FileNotFoundError) as e:  # API or toolchain missing
    print(f"cannot AOT-compile here: {e!r}")
    sys.exit(3)
for job in jobs[:-1]:
    compile_(*job)
"""


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the tests above run the compiled kernels")
def test_kernels_compile_for_sm90() -> None:
    """The interpreter is not the compiler: build representative variants of every kernel down
    to a cubin for sm_90 (Triton ships ptxas; no GPU needed), in a process without
    TRITON_INTERPRET."""
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, cwd=root,
                       capture_output=True, text=True, timeout=600)
    if r.returncode == 3:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stderr[-4000:]


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
