"""Every op of the Triton backend against its pure-torch reference (``torch_ops``).

float64 states compare elementwise at rtol 1e-10 (the kernels then compute in float64);
float32 within ``TOL``; bfloat16 by the flash-attention rule: the kernel's error against the
float64 reference of the same (bfloat16) inputs is at most 2x the error of torch_ops run in
bfloat16. Outputs are poisoned with NaN before every kernel (an ``empty`` that fills NaN, and
NaN-filled ``out``), so an element that is never written fails. On CPU the kernels run under
``TRITON_INTERPRET=1`` (tests/conftest.py), so shapes stay small.
"""

from __future__ import annotations

import json
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
    """The coefficient row the ops take for a ``dtype`` state: float32 (float64 for float64)."""
    return SCHEDULE.table(torch.float64 if dtype == torch.float64 else torch.float32, device)[step]


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
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dps_fast.backends import triton_ops  # noqa: F401  (registers dps_fast.kernels)
from dps_fast.kernels import philox, prep, spectral, update

FLOATS = {"lo_hi", "lo_lo", "hi_hi", "hi_lo"}
# what the JIT specializes on for the usual (multiple-of-16) sizes: 16-aligned pointers and sizes
DIV16 = {"S", "eps_sn", "v_sn", "numel", "P", "KP", "F_LAST"}

def compile_(fn, ptrs, consts, num_warps=4):
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in consts else ptrs.get(name, "fp32" if name in FLOATS else "i32")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and (sig[n].startswith("*") or n in DIV16)}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))

def same(dt, names):
    return {n: "*" + dt for n in names}

U = ("x_ptr", "eps_ptr", "w_ptr", "u_ptr", "v_ptr", "z_ptr", "out_ptr")
P = ("x_ptr", "eps_ptr", "y_ptr", "x0_ptr", "w_ptr")
common = {"gscale_ptr": "*fp32", "seeds_ptr": "*i64", "coefs_ptr": "*fp32", "mask_ptr": "*u8", "step_ptr": "*i64"}
F32, BF16, F64 = (dict(F64=False, BLOCK=1024), dict(F64=False, BLOCK=1024), dict(F64=True, BLOCK=1024))
T32, TB16, T64 = (dict(F64=False, ROWS=256), dict(F64=False, ROWS=256), dict(F64=True, ROWS=256))
jobs = {
    "update-f32-philox": (update._dps_update_kernel, {**same("fp32", U), **common},
                          dict(CLIP=True, VARIANCE=2, PHILOX=True, STEP_PTR=False, **T32)),
    "update-bf16-noise": (update._dps_update_kernel, {**same("bf16", U), **common},
                          dict(CLIP=False, VARIANCE=0, PHILOX=False, STEP_PTR=False, **TB16)),
    "update-bf16-philox": (update._dps_update_kernel, {**same("bf16", U), **common},
                           dict(CLIP=True, VARIANCE=0, PHILOX=True, STEP_PTR=True, **TB16)),
    "update-f64-philox": (update._dps_update_kernel, {**same("fp64", U), **common},
                          dict(CLIP=True, VARIANCE=1, PHILOX=True, STEP_PTR=True, **T64)),
    "prep-bf16": (prep._prep_kernel, {**same("bf16", P), **common, "part_ptr": "*fp32"},
                  dict(CLIP=True, HAS_MASK=True, MASK_PER_SAMPLE=False, **BF16)),
    "tweedie-f32": (prep._tweedie_kernel, {**same("fp32", ("x_ptr", "eps_ptr", "out_ptr")), **common},
                    dict(CLIP=True, **F32)),
    "clip-bf16": (prep._clip_mask_kernel, same("bf16", ("w_ptr", "x0_ptr")), BF16),
    "spectral-f32": (spectral._spectral_kernel, same("fp32", ("x_ptr", "k_ptr", "y_ptr", "w_ptr", "part_ptr")),
                     dict(EVEN=True, **F32)),
    "normal-bf16": (philox._normal_kernel, {"seeds_ptr": "*i64", "out_ptr": "*bf16"}, TB16),
    "words": (philox._philox_words_kernel,
              same("i64", ("c0_ptr", "c1_ptr", "c2_ptr", "c3_ptr", "k0_ptr", "k1_ptr", "out_ptr")), dict(BLOCK=1024)),
}
try:
    compile_(*jobs.pop("words"))
except (TypeError, ImportError, RuntimeError, FileNotFoundError) as e:  # API or toolchain missing
    print(f"cannot AOT-compile here: {e!r}")
    sys.exit(3)
stats = {}
for name, job in jobs.items():
    ptx = compile_(*job).asm["ptx"]
    lines = [ln.strip() for ln in ptx.splitlines()]
    masked = [ln for ln in lines if ln.startswith("@%p") and ("ld.global" in ln or "st.global" in ln)]
    stats[name] = {"mul_hi": sum("mul.hi.u32" in ln for ln in lines),
                   "masked_vector": sum(".v2." in ln or ".v4." in ln for ln in masked),
                   "masked_scalar": sum(".v2." not in ln and ".v4." not in ln for ln in masked)}
print("JSON" + json.dumps(stats))
"""


@pytest.fixture(scope="module")
def sm90_ptx_stats() -> dict:
    """Representative variants of every kernel built down to a cubin for sm_90 (Triton ships
    ptxas; no GPU needed) in a process without TRITON_INTERPRET, and counts read from the PTX."""
    if HAS_CUDA:
        pytest.skip("with a GPU the tests above run the compiled kernels")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, cwd=root,
                       capture_output=True, text=True, timeout=600)
    if r.returncode == 3:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("JSON")][-1][4:])


def test_kernels_compile_for_sm90(sm90_ptx_stats: dict) -> None:
    """The interpreter is not the compiler: every variant compiles for sm_90."""
    assert len(sm90_ptx_stats) == 9


@pytest.mark.parametrize("name", ["update-f32-philox", "update-bf16-philox", "normal-bf16"])
def test_one_philox_call_per_four_elements(sm90_ptx_stats: dict, name: str) -> None:
    """A [256, 4] tile on 4 warps is 2 rows (2 Philox calls, 8 elements) per thread: at most
    2 x 10 rounds x 2 mulhi, where one call per element (the old layout) needed 8 x 20 = 160,
    and a layout that spread a row over several threads would repeat the call on each."""
    assert 0 < sm90_ptx_stats[name]["mul_hi"] <= 40, sm90_ptx_stats[name]


@pytest.mark.parametrize("name", ["update-f32-philox", "update-bf16-noise", "update-bf16-philox"])
def test_update_loads_and_stores_are_vectorized(sm90_ptx_stats: dict, name: str) -> None:
    """The 2-D tile keeps each row's 4 contiguous elements in one thread: every streamed (masked)
    global access is a 16-byte (float32) or 8-byte (bfloat16) vector access, at least 4 tensor
    loads + 1 store per row, 2 rows per thread."""
    st = sm90_ptx_stats[name]
    assert st["masked_scalar"] == 0 and st["masked_vector"] >= 10, st


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


# ---- issue 9: strided eps/v, device guard, float32 coefficients ------------------------------
def _learned_output(shape, dtype, device, seed: int) -> torch.Tensor:
    """A model output ``[N, 2C, *S]`` whose channel halves are eps and v (v in [-1, 1])."""
    gen = torch.Generator().manual_seed(seed)
    out = _randn(gen, (shape[0], 2 * shape[1], *shape[2:]), dtype, device)
    out[:, shape[1]:] = out[:, shape[1]:].clamp(-1, 1)
    return out


def _record_launch_args(monkeypatch, module, fn_name: str, names: tuple[str, ...]) -> list[dict]:
    """Wrap a kernel launcher so each call records the data_ptr of the named arguments."""
    import inspect

    real = getattr(module, fn_name)
    sig = inspect.signature(real)
    calls: list[dict] = []

    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        calls.append({n: (bound.arguments[n].data_ptr() if isinstance(bound.arguments.get(n), torch.Tensor)
                          else None) for n in names})
        return real(*args, **kwargs)

    monkeypatch.setattr(module, fn_name, wrapper)
    return calls


@pytest.mark.parametrize("variance", ["learned_range", "fixed_small"])
@pytest.mark.parametrize("shape", [(3, 3, 5, 7), (1, 2, 1, 37), (2, 1, 4, 4)], ids=["3x3x5x7", "1x2x1x37", "2x1x4x4"])
def test_update_reads_model_output_slices_in_place(device, monkeypatch, shape, variance) -> None:
    """eps = out[:, :C] and v = out[:, C:] of a learned-variance output reach the kernel as the
    very same memory (no .contiguous() copy) and give the contiguous result bit for bit."""
    from dps_fast.kernels import update as kupdate

    t, seeds, _ = _update_inputs(shape, torch.float32, device, seed=21)
    out = _learned_output(shape, torch.float32, device, seed=22)
    c = shape[1]
    eps, v = out[:, :c], out[:, c:]
    assert not eps.is_contiguous() or shape[0] == 1
    kw = dict(coefs=_coefs(device, torch.float32), step=STEP, clip=(-1.0, 1.0), variance=variance,
              v=v if variance == "learned_range" else None, seeds=seeds)
    want = ops.dps_update(t["x"], eps.contiguous(), t["w"], t["u"], t["gscale"],
                          **{**kw, "v": kw["v"].contiguous() if kw["v"] is not None else None})
    calls = _record_launch_args(monkeypatch, kupdate, "dps_update", ("eps", "v"))
    got = ops.dps_update(t["x"], eps, t["w"], t["u"], t["gscale"], **kw)
    assert torch.equal(got, want)
    (call,) = calls
    assert call["eps"] == eps.data_ptr()
    if variance == "learned_range":
        assert call["v"] == v.data_ptr()


@pytest.mark.parametrize("op", ["tweedie", "prep_elementwise"])
def test_prep_reads_eps_slice_in_place(device, monkeypatch, op) -> None:
    from dps_fast.kernels import prep as kprep

    shape = (3, 2, 5, 9)
    gen = torch.Generator().manual_seed(23)
    x, y = _randn(gen, (2, *shape), torch.float32, device).unbind(0)
    eps = _learned_output(shape, torch.float32, device, seed=24)[:, : shape[1]]
    c = _coefs(device, torch.float32)
    args = (x, eps, c, (-1.0, 1.0)) + ((y, None) if op == "prep_elementwise" else ())
    want = getattr(ops, op)(*args[:1], eps.contiguous(), *args[2:])
    calls = _record_launch_args(monkeypatch, kprep, op, ("eps",))
    got = getattr(ops, op)(*args)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(g, w)
    assert calls == [{"eps": eps.data_ptr()}]


def test_rows_helper_copies_only_what_it_must(device) -> None:
    """Samples that are not contiguous inside (a spatial stride) are copied, never misread."""
    base = torch.randn(3, 4, 6, 10, device=device)
    t, sn = ops._rows(base[:, :2])
    assert t.data_ptr() == base.data_ptr() and sn == 4 * 6 * 10
    t, sn = ops._rows(base[..., ::2])
    assert t.is_contiguous() and sn == 4 * 6 * 5 and t.data_ptr() != base.data_ptr()
    t, sn = ops._rows(base[:1, 1:3])  # one sample: its stride is never used
    assert t.data_ptr() == base[:1, 1:3].data_ptr() and sn == 2 * 6 * 10


class _DeviceRecorder:
    """Stands in for ``torch.cuda.device``: records the device made current while it is entered."""

    def __init__(self) -> None:
        self.current: list = [None]
        self.entered: list = []

    def __call__(self, device):
        rec = self

        class _Ctx:
            def __enter__(self_inner):
                rec.entered.append(device)
                rec.current.append(device)

            def __exit__(self_inner, *exc):
                rec.current.pop()
                return False

        return _Ctx()


def _launch_spy(monkeypatch, module, kernel_name: str, recorder: _DeviceRecorder, seen: list) -> None:
    """Replace ``module.<kernel>`` by an object whose ``[grid]`` launch records the current device
    of ``recorder`` and then launches the real kernel."""
    real = getattr(module, kernel_name)

    class _Spy:
        def __getitem__(self, grid):
            launch = real[grid]

            def run(*args, **kwargs):
                seen.append((kernel_name, recorder.current[-1]))
                return launch(*args, **kwargs)

            return run

    monkeypatch.setattr(module, kernel_name, _Spy())


def test_every_launch_runs_under_the_tensors_device(device, monkeypatch) -> None:
    """Triton launches on the current device: each host launcher must make the state's device
    current first. On CPU the guard is forced on (needs_device_guard) and torch.cuda.device is
    replaced by a recorder, so the test sees which device was current at each launch."""
    from dps_fast.kernels import launch as klaunch
    from dps_fast.kernels import philox as kp
    from dps_fast.kernels import prep as kprep
    from dps_fast.kernels import spectral as kspec
    from dps_fast.kernels import update as kupdate

    rec = _DeviceRecorder()
    monkeypatch.setattr(torch.cuda, "device", rec)
    monkeypatch.setattr(klaunch, "needs_device_guard", lambda dev: True)
    seen: list = []
    for mod, name in ((kupdate, "_dps_update_kernel"), (kprep, "_prep_kernel"), (kprep, "_tweedie_kernel"),
                      (kprep, "_clip_mask_kernel"), (kspec, "_spectral_kernel"), (kp, "_normal_kernel"),
                      (kp, "_philox_words_kernel")):
        _launch_spy(monkeypatch, mod, name, rec, seen)
    t, seeds, _ = _update_inputs((2, 3, 4, 6), torch.float32, device, seed=25)
    c = _coefs(device, torch.float32)
    ops.dps_update(**t, coefs=c, step=STEP, clip=(-1.0, 1.0), seeds=seeds)
    ops.prep_elementwise(t["x"], t["eps"], c, None, t["w"], None)
    x0 = ops.tweedie(t["x"], t["eps"], c, (-1.0, 1.0))
    ops.apply_clip_mask(t["w"].clone(), x0, (-1.0, 1.0))
    x0b, K, Y, ndim, _ = _blur_inputs((2, 3, 4, 6), torch.float32, device, torch.Generator().manual_seed(26))
    ops.blur_normal_residual(x0b, K, Y, ndim)
    kp.normal(seeds, 10, 3, 0, torch.float32)
    z = torch.zeros(3, dtype=torch.int64, device=device)
    kp.philox_words(z, z, z, z, z, z)
    assert sorted({name for name, _ in seen}) == sorted(
        ["_dps_update_kernel", "_prep_kernel", "_tweedie_kernel", "_clip_mask_kernel", "_spectral_kernel",
         "_normal_kernel", "_philox_words_kernel"])
    assert all(dev == torch.device(device) for _, dev in seen), seen


def test_device_guard_selects_cuda_devices_only() -> None:
    from dps_fast.kernels import launch as klaunch

    assert klaunch.needs_device_guard(torch.device("cuda", 1))
    assert not klaunch.needs_device_guard(torch.device("cpu"))
    with klaunch.device_guard(torch.zeros(1)):  # a no-op context on the CPU
        pass


def _late_step_inputs(shape, device, i: int = 995):
    """bf16 ``x_t, eps`` consistent with a step near t = 999 (x_t = sqrt(abar) x0 + sqrt(1-abar) eps
    with a slightly wrong eps, as a network gives): x0hat = O(1) from terms of size ~157."""
    sched = NoiseSchedule.linear(1000)
    tab64 = sched.table(torch.float64, device)
    gen = torch.Generator().manual_seed(27)
    x0 = torch.rand(shape, generator=gen, dtype=torch.float64).to(device) * 2 - 1
    e = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    abar = 1.0 / float(tab64[i, Coef.SQRT_RECIP_ABAR]) ** 2
    x = (abar**0.5 * x0 + (1 - abar) ** 0.5 * e).to(torch.bfloat16)
    eps = (e + 0.002 * torch.randn(shape, generator=gen, dtype=torch.float64).to(device)).to(torch.bfloat16)
    return x, eps, tab64[i], sched.table(torch.float32, device)[i]


def test_bf16_state_x0hat_error_is_storage_rounding(device) -> None:
    """With float32 coefficients the kernels' x0hat of a bfloat16 state is the float64 x0hat of
    the same inputs rounded once to bfloat16; a bfloat16 coefficient row (sqrt(1/abar) ~157
    rounded by up to 0.2%) costs more than twice that, and is refused."""
    x, eps, c64, c32 = _late_step_inputs((2, 3, 16, 16), device)
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
    t, seeds, _ = _update_inputs((3, 2, 4, 5), torch.float64, device, seed=28)
    eps, v = t["eps"][:1].expand_as(t["x"]), t["v"][:1].expand_as(t["x"])
    assert ops._rows(eps)[1] == 0
    kw = dict(coefs=_coefs(device, torch.float64), step=STEP, clip=(-1.0, 1.0), variance="learned_range", seeds=seeds)
    got = ops.dps_update(t["x"], eps, t["w"], t["u"], t["gscale"], v=v, **kw)
    want = ref_ops.dps_update(t["x"], eps.contiguous(), t["w"], t["u"], t["gscale"], v=v.contiguous(), **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
