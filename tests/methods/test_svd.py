"""The implicit SVDs of the built-in operators against their dense matrices (float64)."""

import pytest
import torch

from dps_fast import operators
from dps_fast.methods.svd import SUPPORTED, svd_view
from tests.methods._dense import OPERATORS, F64, real_matrix, real_rows, setup


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_view_reproduces_the_dense_operator(name):
    A, _, y, x, _, _ = setup(name, batch=3, samples=1)
    view = svd_view(A, "test")
    M = real_matrix(A, x.shape[1:])
    # V is orthonormal: V V^T = I on the state
    torch.testing.assert_close(view.v(view.vt(x), x.shape), x, rtol=1e-12, atol=1e-12)
    # V diag(s^2) V^T = A^T A
    s = view.singular(x)
    ata = (x.reshape(3, -1) @ (M.T @ M)).reshape(x.shape)
    torch.testing.assert_close(view.v(s.square() * view.vt(x), x.shape), ata, rtol=1e-10, atol=1e-12)
    # V diag(s) U^T y = A^T y (U^T read through ut)
    aty = (real_rows(y) @ M).reshape(x.shape)
    torch.testing.assert_close(view.v(s * view.ut(y, x.shape), x.shape), aty, rtol=1e-10, atol=1e-12)
    # U^T A x = s V^T x, and U^T y vanishes where s = 0
    torch.testing.assert_close(view.ut(A(x), x.shape), (s * view.vt(x)).to(view.ut(A(x), x.shape).dtype),
                               rtol=1e-10, atol=1e-12)


def test_rcond_zeroes_small_singular_values():
    A = operators.GaussianBlur(3.0)
    x = torch.randn(1, 1, 64, dtype=F64)
    s0 = svd_view(A, "t").singular(x)
    s1 = svd_view(A, "t", rcond=1e-3).singular(x)
    small = s0 <= 1e-3 * s0.max()
    assert small.any() and (~small).any()  # the blur of the demo has both kinds
    assert torch.equal(s1[small], torch.zeros_like(s1[small])) and torch.equal(s1[~small], s0[~small])


class _Custom(operators.Identity):
    pass


@pytest.mark.parametrize("op,msg", [
    (_Custom(), r"operator: X supports .*Identity.*got Identity\(\)"),
    (operators.SubsampledFourier(torch.ones(4), real=False), r"operator: X supports .*SubsampledFourier\(real=True\)"),
    (operators.Matrix(torch.ones(2, 3, dtype=torch.complex128)), r"got Matrix\(\(2, 3\)\)"),
    # the block DCT is the SVD of box averaging only; the other boundaries are not diagonal in Fourier
    (operators.SuperResolution(2, filter="bicubic"), r"SuperResolution \(box\).*got SuperResolution"),
    (operators.GaussianBlur(1.0, boundary="reflect"), r"Blur \(circular\).*got GaussianBlur"),
])
def test_unsupported_operators_are_named(op, msg):
    with pytest.raises(TypeError, match=msg):
        svd_view(op, "X")


def test_every_builtin_linear_operator_class_is_covered():
    # a new built-in operator must be added to SUPPORTED or rejected on purpose
    assert set(SUPPORTED) >= {operators.Identity, operators.Inpainting, operators.Blur, operators.GaussianBlur,
                              operators.MotionBlur, operators.SuperResolution, operators.SubsampledFourier,
                              operators.Matrix}
