"""Super-resolution: exact adjoints for both filters (1-D/2-D, odd/even sizes, batch > 1), the
bicubic filter against an independent implementation of MATLAB's antialiased imresize kernel
written from its formula, and clear errors."""

import math

import pytest
import torch

from dps_fast.operators import SuperResolution

F64 = torch.float64


def _keys_cubic(t: float) -> float:
    """Keys (1981) cubic convolution, a = -0.5: MATLAB's imresize 'bicubic' kernel."""
    a = abs(t)
    if a <= 1:
        return (1.5 * a - 2.5) * a * a + 1
    if a <= 2:
        return ((-0.5 * a + 2.5) * a - 4) * a + 2
    return 0.0


def _imresize_weights(n: int, s: int) -> list[list[tuple[int, float]]]:
    """MATLAB imresize's contributions for scale 1/s with antialiasing, one axis, in plain Python:
    out pixel i (1-based) maps to u = i/scale + 0.5 (1 - 1/scale); the kernel is h(x) = scale *
    cubic(scale * x) of width 4/scale; P = ceil(width) + 2 taps from floor(u - width/2); weights
    normalised; out-of-range indices mirrored with aux = [1..n, n..1]."""
    scale = 1.0 / s
    width = 4.0 / scale
    out = []
    for i in range(1, n // s + 1):
        u = i / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - width / 2)
        taps = [(left + p, scale * _keys_cubic(scale * (u - (left + p)))) for p in range(math.ceil(width) + 2)]
        total = sum(w for _, w in taps)
        aux = list(range(1, n + 1)) + list(range(n, 0, -1))
        out.append([(aux[(j - 1) % (2 * n)] - 1, w / total) for j, w in taps])
    return out


def _imresize(x: torch.Tensor, s: int) -> torch.Tensor:
    """Apply the contributions axis by axis with explicit sums (the last axis, then the one before)."""
    for ax in range(x.dim() - 1, 1, -1):
        contrib = _imresize_weights(x.shape[ax], s)
        cols = []
        for taps in contrib:
            acc = torch.zeros_like(x.select(ax, 0))
            for j, w in taps:
                acc = acc + w * x.select(ax, j)
            cols.append(acc)
        x = torch.stack(cols, dim=ax)
    return x


@pytest.mark.parametrize("shape,factor", [((2, 3, 16, 12), 4), ((1, 1, 9, 15), 3), ((7, 2, 6, 6), 2),
                                          ((2, 1, 20), 4), ((3, 1, 10), 5), ((1, 1, 2, 4), 2), ((1, 1, 5, 5), 1)],
                         ids=["2d-16x12-f4", "2d-9x15-f3-odd", "2d-6x6-f2-b7", "1d-20-f4", "1d-10-f5",
                              "2d-2x4-f2-tiny", "2d-f1"])
def test_bicubic_equals_independent_matlab_imresize(shape, factor):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    got = SuperResolution(factor, filter="bicubic")(x)
    torch.testing.assert_close(got, _imresize(x, factor), rtol=0, atol=1e-12)


def test_bicubic_known_properties():
    A = SuperResolution(4, filter="bicubic")
    ones = torch.ones(1, 3, 32, 32, dtype=F64)
    torch.testing.assert_close(A(ones), torch.ones(1, 3, 8, 8, dtype=F64))  # weights sum to 1
    ramp = torch.arange(32, dtype=F64).expand(1, 1, 32, 32)
    # away from the mirrored edges a linear ramp is sampled at u - 1 = 4 i + (1 - 4)/2 - 1 (0-based)
    got = A(ramp)[0, 0, 0, 2:-2]
    want = torch.tensor([4 * i - 2.5 for i in range(3, 7)], dtype=F64)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("filt", ["box", "bicubic"])
@pytest.mark.parametrize("shape,factor", [((2, 3, 12, 8), 4), ((3, 1, 9, 15), 3), ((2, 2, 21), 7),
                                          ((1, 1, 6), 2), ((7, 1, 1, 3), 1)],
                         ids=["2d-even", "2d-odd", "1d-odd", "1d-even", "2d-1px-b7"])
def test_adjoint_identity(filt, shape, factor):
    A = SuperResolution(factor, filter=filt)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=F64)
    ax = A(x)
    assert tuple(ax.shape) == A.output_shape(shape) and A.input_shape(tuple(ax.shape)) == shape
    y = torch.randn(ax.shape, generator=g, dtype=F64)
    lhs, rhs = (ax * y).sum(), (x * A.adjoint(y)).sum()
    assert abs(float(lhs - rhs)) <= 1e-12 * max(1.0, abs(float(lhs)))
    w, rn2 = A.residual(x, A.prepare(y))
    torch.testing.assert_close(w, A.adjoint(ax - y))
    torch.testing.assert_close(rn2, (ax - y).square().flatten(1).sum(1))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="filter: expected one of"):
        SuperResolution(2, filter="lanczos")
    with pytest.raises(ValueError, match=r"divisible by factor=4.*\(10, 8\)"):
        SuperResolution(4, filter="bicubic")(torch.ones(1, 1, 10, 8))
    with pytest.raises(ValueError, match="factor"):
        SuperResolution(True)
