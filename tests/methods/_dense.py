"""Dense-matrix ground truth for the methods' tests: every operator as a real matrix ``[m, d]``
(complex measurements as stacked real and imaginary parts), built from ``operator.as_matrix``
and nothing of ``dps_fast.methods``; and a float64 network with its Jacobian by autograd."""

import torch

from dps_fast import NoiseSchedule, operators
from tests.nets import TinyEps

F64 = torch.float64


def real_matrix(A, sample_shape) -> torch.Tensor:
    """``A`` on one sample ``[C, *S]`` as a real ``[m', d]`` matrix (complex rows split in two)."""
    M = A.as_matrix(tuple(sample_shape), F64)
    return torch.cat([M.real, M.imag], 0) if M.is_complex() else M


def real_rows(y: torch.Tensor) -> torch.Tensor:
    """``[N, *out]`` measurements as real rows ``[N, m']`` matching :func:`real_matrix`."""
    f = y.reshape(y.shape[0], -1)
    return torch.cat([f.real, f.imag], 1) if f.is_complex() else f


def svd(M: torch.Tensor, rcond: float = 0.0):
    """``(U, s, V)`` of ``M [m, d]`` with ``s`` zero-padded to ``d`` and cut at ``rcond * max(s)``."""
    U, s, Vh = torch.linalg.svd(M, full_matrices=True)
    d = M.shape[1]
    s_full = torch.zeros(d, dtype=M.dtype)
    s_full[: s.numel()] = s
    s_full = torch.where(s_full > rcond * s_full.max(), s_full, torch.zeros_like(s_full))
    return U, s_full, Vh.T


def ut(U: torch.Tensor, y_rows: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``U^T y`` per row, truncated/zero-padded to ``d`` coordinates, zero where ``s == 0``."""
    uy = y_rows @ U
    d = s.numel()
    uy = uy[:, :d] if uy.shape[1] >= d else torch.cat([uy, uy.new_zeros(uy.shape[0], d - uy.shape[1])], 1)
    return torch.where(s > 0, uy, torch.zeros_like(uy))


# name -> (operator, sample shape [C, *S], network); awkward sizes: odd lengths, a 1-row image
OPERATORS = {
    "identity": lambda: (operators.Identity(), (2, 5, 3), TinyEps(2, 6)),
    "inpaint": lambda: (operators.Inpainting.random((5, 7), 0.4, seed=1), (3, 5, 7), TinyEps(3, 6)),
    "inpaint-weighted": lambda: (operators.Inpainting(torch.tensor([0.0, 0.5, -1.0, 1.0, 0.0, 2.0, 0.3], dtype=F64)),
                                 (1, 7), TinyEps(1, 6, ndim=1)),
    "blur1d": lambda: (operators.Blur(torch.tensor([0.25, 0.5, 0.25], dtype=F64)), (1, 17), TinyEps(1, 6, ndim=1)),
    "blur2d": lambda: (operators.GaussianBlur(0.8, 3), (2, 6, 5), TinyEps(2, 6)),
    "superres1d": lambda: (operators.SuperResolution(3), (1, 12), TinyEps(1, 6, ndim=1)),
    "superres2d": lambda: (operators.SuperResolution(2), (2, 4, 6), TinyEps(2, 6)),
    "fourier1d": lambda: (operators.SubsampledFourier(torch.tensor([1., 1., 0., 1., 0., 0., 1., 1., 0.], dtype=F64)),
                          (1, 9), TinyEps(1, 6, ndim=1)),
    "fourier2d": lambda: (operators.SubsampledFourier(
        (torch.rand(6, 5, generator=torch.Generator().manual_seed(2)) < .5).double()), (1, 6, 5), TinyEps(1, 6)),
    "matrix": lambda: (operators.Matrix(torch.randn(5, 11, dtype=F64, generator=torch.Generator().manual_seed(0))),
                       (1, 11), TinyEps(1, 6, ndim=1)),
    "matrix-tall": lambda: (operators.Matrix(torch.randn(9, 4, dtype=F64, generator=torch.Generator().manual_seed(1))),
                            (2, 4), TinyEps(2, 6, ndim=1)),
}


class NearScoreEps(torch.nn.Module):
    """``sqrt(1 - abar_t) x + 0.1 sqrt(abar_t) TinyEps(x, t)``: the exact eps of a ``N(0, I)`` prior
    plus a small nonlinear network (``x0hat = sqrt(abar) x - 0.1 sqrt(1 - abar) TinyEps``), so chains
    stay bounded while every Jacobian is still non-trivial."""

    def __init__(self, net: torch.nn.Module, abar: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("sqrt_1m_abar", (1.0 - abar).sqrt())
        self.register_buffer("sqrt_abar", abar.sqrt())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        view = (-1,) + (1,) * (x.dim() - 1)
        c = self.sqrt_1m_abar.to(x.dtype)[t].view(view)
        out = 0.1 * self.sqrt_abar.to(x.dtype)[t].view(view) * self.net(x, t)
        return torch.cat([c * x, torch.zeros_like(x)], 1) + out if out.shape[1] > x.shape[1] else c * x + out


def setup(name: str, batch: int = 2, samples: int = 2, seed: int = 7, sigma: float = 0.05):
    """``(A, net, y, x_t, noise, noise2)`` in float64: ``y`` ``[batch, *out]``, states ``[batch*samples, C, *S]``."""
    A, shape, net = OPERATORS[name]()
    net = NearScoreEps(net, NoiseSchedule.linear(1000).alphas_cumprod).double()
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((batch,) + shape, generator=g, dtype=F64) * 0.5
    y = A(x0)
    if y.is_complex():
        y = y + sigma * torch.complex(torch.randn(y.shape, generator=g, dtype=F64), torch.randn(y.shape, generator=g, dtype=F64))
    else:
        y = y + sigma * torch.randn(y.shape, generator=g, dtype=F64)
    n = batch * samples
    x_t, noise, noise2 = (torch.randn((n,) + shape, generator=g, dtype=F64) for _ in range(3))
    return A, net, y, x_t, noise, noise2


def eps_and_vjp(net, x: torch.Tensor, t: torch.Tensor):
    """``eps(x)`` and ``w -> J_eps(x)^T w`` by plain autograd."""
    xin = x.detach().requires_grad_(True)
    with torch.enable_grad():
        e = net(xin, t)

    def vjp(w: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(e, xin, grad_outputs=w, retain_graph=True)[0]

    return e.detach(), vjp
