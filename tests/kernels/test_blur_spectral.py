"""The blur's fused spectral stage and normal residual.

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
from tests.conftest import TOL, rel_err
from tests.kernels.triton_cases import DTYPES, SHAPES, blur_inputs, check


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_spectral_residual(device, shape, dtype) -> None:
    gen = torch.Generator().manual_seed(6)
    x0, K, Y, ndim, dims = blur_inputs(shape, dtype, device, gen)
    X = torch.fft.rfftn(x0, dim=dims)
    W, rn = ops.spectral_residual(X, K, Y, shape[-1])
    rW, rrn = ref_ops.spectral_residual(X.to(torch.complex128), K.to(torch.complex128),
                                        Y.to(torch.complex128), shape[-1])
    assert W.dtype == X.dtype and rn.dtype == dtype and rn.shape == (shape[0],)
    check(W, None, rW, dtype)
    check(rn, None, rrn, dtype)


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
    x0, K, Y, ndim, _ = blur_inputs(shape, spec_real, device, gen)
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
        check(r, None, rr, dtype)
        check(rn, None, rrn, dtype)
