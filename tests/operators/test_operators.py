"""Property tests for every operator: exact adjoints, blur == direct circular convolution,
normal_residual == adjoint(A x - y), the fused blur residual == the plain one, clear errors."""

import pytest
import torch

from dps_fast.operators import (
    Blur, GaussianBlur, Identity, Inpainting, Matrix, MotionBlur, SubsampledFourier, SuperResolution,
)
from dps_fast.operators.blur import motion_kernel

F64 = torch.float64


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Real inner product <a, b> = Re sum conj(a) b."""
    return (a.conj() * b).real.sum() if a.is_complex() or b.is_complex() else (a * b).sum()


def _case(name: str, shape: tuple):
    g = torch.Generator().manual_seed(hash((name, shape)) % 2**31)
    sig = shape[2:]
    if name == "identity":
        return Identity()
    if name == "inpaint":
        return Inpainting.random(sig, missing=0.4, seed=3)
    if name == "blur":
        return Blur(torch.rand((5,) * len(sig), generator=g, dtype=F64))
    if name == "gauss":
        return GaussianBlur(1.5, kernel_size=7)
    if name == "matrix":
        return Matrix(torch.randn(5, shape[-1], generator=g, dtype=F64))
    if name == "superres":
        return SuperResolution(3)
    if name == "fourier":
        return SubsampledFourier((torch.rand(sig, generator=g) < 0.5).double())
    raise KeyError(name)


SHAPES = {
    "identity": [(2, 1, 37), (1, 3, 33, 17), (7, 1, 1, 37)],
    "inpaint": [(2, 1, 37), (1, 3, 33, 17), (7, 1, 1, 37)],
    "blur": [(2, 1, 37), (1, 3, 33, 17), (7, 1, 1, 37), (1, 1, 3)],
    "gauss": [(2, 1, 37), (1, 3, 33, 17), (2, 2, 4, 6)],
    "matrix": [(2, 1, 16), (7, 3, 9)],
    "superres": [(2, 1, 36), (1, 3, 33, 18), (7, 1, 3, 3)],
    "fourier": [(2, 1, 37), (1, 3, 33, 17), (1, 1, 16, 16)],
}
CASES = [(n, s) for n, ss in SHAPES.items() for s in ss]
IDS = [f"{n}-{'x'.join(map(str, s))}" for n, s in CASES]


@pytest.mark.parametrize("name,shape", CASES, ids=IDS)
def test_adjoint_identity(name, shape):
    A = _case(name, shape)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=g, dtype=F64)
    ax = A(x)
    y = torch.randn(ax.shape, generator=g, dtype=F64)
    if ax.is_complex():
        y = torch.complex(y, torch.randn(ax.shape, generator=g, dtype=F64))
    lhs, rhs = _inner(ax, y), _inner(x, A.adjoint(y))
    assert abs(float(lhs - rhs)) <= 1e-10 * max(1.0, abs(float(lhs)))
    assert tuple(ax.shape) == A.output_shape(tuple(shape))
    assert A.input_shape(tuple(ax.shape)) == tuple(shape)


@pytest.mark.parametrize("name,shape", CASES, ids=IDS)
def test_normal_residual_and_fused_residual(name, shape):
    A = _case(name, shape)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g, dtype=F64)
    ax = A(x)
    y = torch.randn(ax.shape, generator=g, dtype=F64)
    if ax.is_complex():
        y = torch.complex(y, torch.randn(ax.shape, generator=g, dtype=F64))
    want = A.adjoint(ax - y)
    torch.testing.assert_close(A.normal_residual(x, y), want, rtol=1e-10, atol=1e-12)
    w, rn2 = A.residual(x, A.prepare(y))
    torch.testing.assert_close(w, want, rtol=1e-10, atol=1e-12)
    r = ax - y
    torch.testing.assert_close(rn2, (r.conj() * r).real.flatten(1).sum(1), rtol=1e-10, atol=1e-12)


def _direct_circular(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y[i] = sum_j k[j] x[(i - j + k//2) mod n], per signal axis, by explicit loops over taps."""
    out = torch.zeros_like(x)
    if k.dim() == 1:
        for j in range(k.shape[0]):
            out += k[j] * torch.roll(x, shifts=j - k.shape[0] // 2, dims=-1)
    else:
        for a in range(k.shape[0]):
            for b in range(k.shape[1]):
                out += k[a, b] * torch.roll(x, shifts=(a - k.shape[0] // 2, b - k.shape[1] // 2), dims=(-2, -1))
    return out


@pytest.mark.parametrize("shape,ksize", [((2, 1, 37), 5), ((1, 3, 33, 17), 4), ((1, 1, 1, 37), 3),
                                         ((2, 1, 6), 9), ((1, 1, 5, 4), 7)],
                         ids=["1d-37", "2d-33x17-even-kernel", "2d-1x37", "1d-kernel-wraps", "2d-kernel-wraps"])
def test_blur_is_direct_circular_convolution(shape, ksize):
    g = torch.Generator().manual_seed(2)
    k = torch.rand((ksize,) * (len(shape) - 2), generator=g, dtype=F64)
    x = torch.randn(shape, generator=g, dtype=F64)
    torch.testing.assert_close(Blur(k)(x), _direct_circular(x, k), rtol=1e-10, atol=1e-12)


def test_gaussian_and_motion_kernels():
    k = GaussianBlur(3.0).kernel(2)
    assert k.shape == (25, 25) and abs(float(k.sum()) - 1) < 1e-12
    assert torch.allclose(k, k.T) and int(k.argmax()) == 12 * 25 + 12
    m1, m2 = motion_kernel(15, 0.5, seed=4), motion_kernel(15, 0.5, seed=4)
    assert torch.equal(m1, m2) and abs(float(m1.sum()) - 1) < 1e-12 and (m1 >= 0).all()
    assert not torch.equal(m1, motion_kernel(15, 0.5, seed=5))
    # a motion kernel is a path: clearly not isotropic (Gaussian-like) mass
    assert float((m1 > 0).float().mean()) < 0.6
    x = torch.randn(1, 1, 20, 20, dtype=F64)
    torch.testing.assert_close(MotionBlur(15, 0.5, 4)(x), _direct_circular(x, m1), rtol=1e-10, atol=1e-12)


def test_float32_and_complex_dtypes():
    x = torch.randn(2, 3, 8, 8)
    for A in (GaussianBlur(1.0), Inpainting.box((8, 8), (2, 2)), SuperResolution(2)):
        assert A(x).dtype == torch.float32 and A.adjoint(A(x)).dtype == torch.float32
    F = SubsampledFourier(torch.ones(8, 8))
    assert F(x).dtype == torch.complex64 and F.adjoint(F(x)).dtype == torch.float32
    torch.testing.assert_close(F.adjoint(F(x)), x, rtol=1e-5, atol=1e-5)  # full mask: unitary
    xc = torch.complex(x.double(), torch.randn_like(x).double())
    Fc = SubsampledFourier(torch.ones(8, 8), real=False)
    torch.testing.assert_close(Fc.adjoint(Fc(xc)), xc)
    # complex domain: <A x, y> = <x, A^H y> with the complex inner product
    Fm = SubsampledFourier((torch.rand(8, 8) < 0.4).double(), real=False)
    yc = torch.complex(torch.randn(2, 3, 8, 8, dtype=F64), torch.randn(2, 3, 8, 8, dtype=F64))
    lhs, rhs = (Fm(xc).conj() * yc).sum(), (xc.conj() * Fm.adjoint(yc)).sum()
    assert abs(complex(lhs - rhs)) <= 1e-10 * abs(complex(lhs))


def test_as_matrix_matches_forward():
    A = GaussianBlur(1.2, kernel_size=5)
    M = A.as_matrix((1, 12))
    x = torch.randn(3, 1, 12, dtype=F64)
    torch.testing.assert_close(A(x).reshape(3, 12), x.reshape(3, 12) @ M.T)


def test_box_and_random_masks():
    m = Inpainting.box((10, 12), (4, 6)).mask
    assert m.sum() == 10 * 12 - 24 and m[3:7, 3:9].sum() == 0
    r1, r2 = Inpainting.random((64, 64), 0.7, seed=1).mask, Inpainting.random((64, 64), 0.7, seed=1).mask
    assert torch.equal(r1, r2) and abs(float(r1.mean()) - 0.3) < 0.03  # 5 sigma of Binomial(4096, .3)/4096


@pytest.mark.parametrize("make,msg", [
    (lambda: Blur(torch.ones(2, 2, 2)), "kernel"),
    (lambda: GaussianBlur(-1.0), "sigma"),
    (lambda: MotionBlur(9, 2.0), "intensity"),
    (lambda: Matrix(torch.ones(3)), "A"),
    (lambda: SuperResolution(0), "factor"),
    (lambda: Inpainting.random((4, 4), 1.5), "missing"),
    (lambda: SuperResolution(2)(torch.ones(1, 1, 5)), "divisible"),
    (lambda: Blur(torch.ones(3))(torch.ones(1, 1, 4, 4)), "1-D kernel"),
    (lambda: Matrix(torch.ones(2, 3))(torch.ones(1, 1, 4)), "x: expected"),
    (lambda: Identity()(torch.ones(4, 4)), "x: expected"),
])
def test_bad_input_errors_name_the_argument(make, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        make()
