"""Tweedie's x0hat, the clip mask and the elementwise (mask) operator's residual pass.

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
from tests.kernels.triton_cases import (CLIPS, DTYPES, SHAPES, check, coefs, learned_output, randn,
                                        record_launch_args)


@pytest.mark.parametrize("clip", CLIPS.values(), ids=CLIPS.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_tweedie(device, shape, dtype, clip) -> None:
    gen = torch.Generator().manual_seed(1)
    x, eps = randn(gen, (2, *shape), dtype, device).unbind(0)
    c = coefs(device, dtype)
    out = ops.tweedie(x, eps, c, clip)
    assert out.dtype == dtype
    ref = ref_ops.tweedie(x.double(), eps.double(), c.double(), clip)
    check(out, ref_ops.tweedie(x, eps, c, clip), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_apply_clip_mask(device, shape, dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    w, x0 = randn(gen, (2, *shape), dtype, device).unbind(0)
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
    base = randn(gen, (2, 7, 3, 9, 12), torch.float32, device)
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
    x, eps, y = randn(gen, (3, *shape), dtype, device).unbind(0)
    m = _mask(mask_kind, shape, dtype, device, gen)
    c = coefs(device, dtype)
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
    check(x0, lx0, rx0, dtype)
    check(w, lw, rw, dtype)
    check(rn, lrn, rrn, dtype)


def test_prep_elementwise_non_contiguous(device) -> None:
    gen = torch.Generator().manual_seed(5)
    base = randn(gen, (3, 7, 3, 17, 66), torch.float64, device)
    x, eps, y = (b[..., ::2] for b in base.unbind(0))
    m = (torch.rand(17, 3, generator=gen) > 0.5).to(device).t()  # [3, 17] broadcast over H
    m = m[:, :, None].expand(3, 17, 33)
    c = coefs(device, torch.float64)
    got = ops.prep_elementwise(x, eps, c, (-1.0, 1.0), y, m)
    want = ref_ops.prep_elementwise(x, eps, c, (-1.0, 1.0), y, m.double())
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", ["tweedie", "prep_elementwise"])
def test_prep_reads_eps_slice_in_place(device, monkeypatch, op) -> None:
    from dps_fast.kernels import prep as kprep

    shape = (3, 2, 5, 9)
    gen = torch.Generator().manual_seed(23)
    x, y = randn(gen, (2, *shape), torch.float32, device).unbind(0)
    eps = learned_output(shape, torch.float32, device, seed=24)[:, : shape[1]]
    c = coefs(device, torch.float32)
    args = (x, eps, c, (-1.0, 1.0)) + ((y, None) if op == "prep_elementwise" else ())
    want = getattr(ops, op)(*args[:1], eps.contiguous(), *args[2:])
    calls = record_launch_args(monkeypatch, kprep, op, ("eps",))
    got = getattr(ops, op)(*args)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(g, w)
    assert calls == [{"eps": eps.data_ptr()}]
