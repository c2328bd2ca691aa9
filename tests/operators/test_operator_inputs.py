"""Operator inputs a new user got wrong (issue 19): ``A.residual(x, y)`` with ``y`` a tensor, a wrong-rank
``Inpainting.box`` shape, an all-zero blur kernel."""

from __future__ import annotations

import re

import pytest
import torch

from dps_fast import operators

F64 = torch.float64


def _ops() -> dict[str, operators.Operator]:
    g = torch.Generator().manual_seed(0)
    return {
        "identity": operators.Identity(),
        "inpaint-box": operators.Inpainting.box((7, 9), (3, 4)),
        "blur-circular": operators.GaussianBlur(1.0, kernel_size=5),
        "blur-reflect": operators.Blur(torch.rand(3, 3, generator=g, dtype=F64), boundary="reflect"),
        "fourier": operators.SubsampledFourier(torch.rand(7, 9, generator=g) > 0.5),
        "phase": operators.PhaseRetrieval(oversample=1.0),
        "differentiable": operators.Differentiable(lambda x: torch.tanh(x) * 2),
    }


@pytest.mark.parametrize("name", list(_ops()))
def test_residual_takes_y_as_a_tensor_or_prepared(name):
    A = _ops()[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 7, 9, generator=g, dtype=F64)
    y = A(torch.randn(2, 1, 7, 9, generator=g, dtype=F64))
    w_tensor, r_tensor = A.residual(x, y)
    w_prepared, r_prepared = A.residual(x, A.prepare(y))
    torch.testing.assert_close(w_tensor, w_prepared, rtol=0, atol=0)
    torch.testing.assert_close(r_tensor, r_prepared, rtol=0, atol=0)
    assert w_tensor.shape == x.shape and r_tensor.shape == (2,) and bool((r_tensor > 0).all())


def test_residual_names_what_it_expected():
    with pytest.raises(TypeError, match=r"meas: expected the measurement y \(a tensor\) or A.prepare\(y\), got list"):
        operators.Identity().residual(torch.zeros(1, 1, 3), [0.0, 0.0, 0.0])


def test_box_with_a_wrong_rank_shape_says_so():
    with pytest.raises(ValueError, match=r"box: expected one size per axis of shape \(3, 32, 32\) \(3 sizes\), "
                                         r"got 2: \(16, 16\); for one box shared by the channels pass "
                                         r"shape=\(32, 32\)"):
        operators.Inpainting.box((3, 32, 32), (16, 16))
    with pytest.raises(ValueError, match="box: expected a size within the image"):
        operators.Inpainting.box((32, 32), (40, 4))
    with pytest.raises(ValueError, match=r"top_left: expected one index per axis of shape \(32, 32\)"):
        operators.Inpainting.box((32, 32), (4, 4), top_left=(1, 2, 3))
    m = operators.Inpainting.box((32, 32), (16, 16)).mask
    assert m.shape == (32, 32) and int((m == 0).sum()) == 256


@pytest.mark.parametrize("shape", [(5,), (3, 3)])
def test_an_all_zero_blur_kernel_is_refused(shape):
    want = f"kernel: expected at least one non-zero tap, got all zeros (shape {tuple(shape)})"
    with pytest.raises(ValueError, match=re.escape(want)):
        operators.Blur(torch.zeros(shape))
    k = torch.zeros(shape)
    k.view(-1)[0] = 1e-3  # one non-zero tap is a (weak) blur, not an error
    operators.Blur(k)
