"""Inputs, tolerances and launch recorders shared by the Triton-backend tests (tests/kernels/test_*.py)."""

from __future__ import annotations

import inspect

import torch

from dps_fast.schedule import Coef, NoiseSchedule
from tests.conftest import TOL, rel_err

SHAPES = {"1": (1, 1, 1), "1x1x37": (1, 1, 37), "7x3x33x17": (7, 3, 33, 17), "2x1x1x37": (2, 1, 1, 37)}
DTYPES = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16}
CLIPS = {"noclip": None, "clip": (-1.0, 1.0)}
SCHEDULE = NoiseSchedule.linear(1000).respace(20)
STEP = 7  # a step i > 0 (noise on); step 0 has sigma = 0


def coefs(device: torch.device, dtype: torch.dtype, step: int = STEP) -> torch.Tensor:
    """The coefficient row the ops take for a ``dtype`` state: float32 (float64 for float64)."""
    return SCHEDULE.table(torch.float64 if dtype == torch.float64 else torch.float32, device)[step]


def randn(gen: torch.Generator, shape, dtype, device, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)


def d(t):
    return None if t is None else t.double()


def check(out: torch.Tensor, lowp: torch.Tensor | None, ref: torch.Tensor, dtype: torch.dtype) -> None:
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


VARIANCES = ["fixed_small", "fixed_large", "learned_range"]


def update_inputs(shape, dtype, device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x, eps, w, u, noise = randn(gen, (5, *shape), dtype, device).unbind(0)
    v = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).to(device=device, dtype=dtype)
    gscale = torch.rand(shape[0], generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    seeds = torch.randint(2**33, 2**62, (shape[0],), generator=gen, dtype=torch.int64).to(device)
    return dict(x=x, eps=eps, w=w, u=u, v=v, gscale=gscale), seeds, noise


def learned_output(shape, dtype, device, seed: int) -> torch.Tensor:
    """A model output ``[N, 2C, *S]`` whose channel halves are eps and v (v in [-1, 1])."""
    gen = torch.Generator().manual_seed(seed)
    out = randn(gen, (shape[0], 2 * shape[1], *shape[2:]), dtype, device)
    out[:, shape[1]:] = out[:, shape[1]:].clamp(-1, 1)
    return out


def record_launch_args(monkeypatch, module, fn_name: str, names: tuple[str, ...]) -> list[dict]:
    """Wrap a kernel launcher so each call records the data_ptr of the named arguments."""
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


def late_step_inputs(shape, device, i: int = 995):
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


def blur_inputs(shape, real, device, gen):
    ndim = len(shape) - 2
    dims = tuple(range(-ndim, 0))
    x0 = randn(gen, shape, real, device)
    kern = torch.rand(shape[-ndim:], generator=gen, dtype=torch.float64)
    K = torch.fft.rfftn((kern / kern.sum()).to(device=device, dtype=real), dim=dims)
    Y = torch.fft.rfftn(randn(gen, shape, real, device), dim=dims)
    return x0, K, Y, ndim, dims
