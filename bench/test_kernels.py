"""Triton kernels vs the unfused torch sequence (torch_ops) vs a copy of the same bytes.

GPU only (skipped without CUDA). Run: ``pytest bench/test_kernels.py --benchmark-only``.
Each case is timed three ways in the same run and grouped by case, so the table compares
``triton``, ``torch`` (the reference ops, unfused) and ``copy`` (a device-to-device copy moving
the kernel's minimal bytes: every input read once, every output written once). ``extra_info``
holds the device, versions, commit, dtype, shape, the minimal bytes, the achieved GB/s (CUDA
events, median), the % of the measured copy bandwidth and, for triton, the speed-up over torch.
States are >= 64 MiB so that caches do not flatter the numbers.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA device")

triton = pytest.importorskip("triton")

try:  # pytest's rootdir/bench on sys.path, whichever import mode is in use
    from bench._util import copy_gbps, cuda_timer, record
except ImportError:
    from _util import copy_gbps, cuda_timer, record

from dps_fast.backends import torch_ops as ref_ops  # noqa: E402
from dps_fast.backends import triton_ops as ops  # noqa: E402
from dps_fast.kernels import philox as kphilox  # noqa: E402
from dps_fast.noise import STREAM_INIT, philox_normal  # noqa: E402
from dps_fast.schedule import NoiseSchedule  # noqa: E402

SCHEDULE = NoiseSchedule.linear(1000)
STEP = 500
CLIP = (-1.0, 1.0)
BIG = (128, 3, 256, 256)       # 25.2 M elements: 96 MiB in float32
BIG_BF16 = (256, 3, 256, 256)  # 96 MiB in bfloat16


def _coef_dtype(dtype: torch.dtype) -> torch.dtype:
    """The coefficient rows the ops take: float32 for float32/bfloat16 states, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _state(shape, dtype, k: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(shape, device="cuda", dtype=torch.float32, generator=gen).to(dtype) for _ in range(k)]


Case = tuple[Callable[[], Any], Callable[[], Any], int]


def _update(shape, dtype, noise: str, variance: str, ops=ops) -> Case:
    gen = torch.Generator("cuda").manual_seed(0)
    x, eps, w, u, v, z = _state(shape, dtype, 6, gen)
    v = v.clamp(-1, 1)
    gscale = torch.rand(shape[0], device="cuda", generator=gen)
    seeds = torch.randint(0, 2**62, (shape[0],), device="cuda", generator=gen)
    coefs = SCHEDULE.table(_coef_dtype(dtype), "cuda")[STEP]
    out = torch.empty_like(x)
    z = z if noise == "explicit" else None
    kw = dict(coefs=coefs, step=STEP, clip=CLIP, variance=variance,
              v=v if variance == "learned_range" else None, seeds=seeds, noise=z)
    reads = [x, eps, w, u] + ([v] if variance == "learned_range" else []) + ([z] if z is not None else [])
    return (lambda: ops.dps_update(x, eps, w, u, gscale, **kw, out=out),
            lambda: ref_ops.dps_update(x, eps, w, u, gscale, **kw),
            _nbytes(*reads, out))


def _prep(shape, dtype, ops=ops) -> Case:
    gen = torch.Generator("cuda").manual_seed(1)
    x, eps, y = _state(shape, dtype, 3, gen)
    mask = torch.rand(shape[1:], device="cuda", generator=gen) > 0.5
    coefs = SCHEDULE.table(_coef_dtype(dtype), "cuda")[STEP]
    return (lambda: ops.prep_elementwise(x, eps, coefs, CLIP, y, mask),
            lambda: ref_ops.prep_elementwise(x, eps, coefs, CLIP, y, mask.to(dtype)),
            _nbytes(x, eps, y, mask) + 2 * _nbytes(x))


def _tweedie(shape, dtype, ops=ops) -> Case:
    gen = torch.Generator("cuda").manual_seed(2)
    x, eps = _state(shape, dtype, 2, gen)
    coefs = SCHEDULE.table(_coef_dtype(dtype), "cuda")[STEP]
    return (lambda: ops.tweedie(x, eps, coefs, CLIP), lambda: ref_ops.tweedie(x, eps, coefs, CLIP),
            3 * _nbytes(x))


def _clip_mask(shape, dtype, ops=ops) -> Case:
    gen = torch.Generator("cuda").manual_seed(3)
    w, x0 = _state(shape, dtype, 2, gen)
    return (lambda: ops.apply_clip_mask(w, x0, CLIP), lambda: ref_ops.apply_clip_mask(w, x0, CLIP),
            3 * _nbytes(w))


def _spectral(shape, dtype, ops=ops) -> Case:
    gen = torch.Generator("cuda").manual_seed(4)
    x, y = _state(shape, dtype, 2, gen)
    X, Y = torch.fft.rfft2(x), torch.fft.rfft2(y)
    K = torch.fft.rfft2(torch.rand(shape[-2:], device="cuda", generator=gen))
    return (lambda: ops.spectral_residual(X, K, Y, shape[-1]),
            lambda: ref_ops.spectral_residual(X, K, Y, shape[-1]),
            3 * _nbytes(X) + _nbytes(K))


def _blur(shape, dtype, ops=ops) -> Case:
    gen = torch.Generator("cuda").manual_seed(5)
    x, y = _state(shape, dtype, 2, gen)
    Y = torch.fft.rfft2(y)
    K = torch.fft.rfft2(torch.rand(shape[-2:], device="cuda", generator=gen))
    return (lambda: ops.blur_normal_residual(x, K, Y, 2), lambda: ref_ops.blur_normal_residual(x, K, Y, 2),
            2 * _nbytes(x) + _nbytes(Y, K))


def _noise(shape, dtype, ops=ops) -> Case:
    seeds = torch.arange(shape[0], device="cuda")
    numel = int(torch.Size(shape[1:]).numel())
    return (lambda: kphilox.normal(seeds, numel, STEP, STREAM_INIT, dtype),
            lambda: philox_normal(seeds, numel, STEP, STREAM_INIT, dtype),
            shape[0] * numel * torch.empty((), dtype=dtype).element_size())


CASES: dict[str, tuple[Callable[..., Case], tuple, dict]] = {
    "update-philox-f32": (_update, (BIG, torch.float32), dict(noise="philox", variance="fixed_small")),
    "update-philox-learned-f32": (_update, (BIG, torch.float32), dict(noise="philox", variance="learned_range")),
    "update-noise-f32": (_update, (BIG, torch.float32), dict(noise="explicit", variance="fixed_small")),
    "update-philox-bf16": (_update, (BIG_BF16, torch.bfloat16), dict(noise="philox", variance="fixed_small")),
    "prep-mask-f32": (_prep, (BIG, torch.float32), {}),
    "prep-mask-bf16": (_prep, (BIG_BF16, torch.bfloat16), {}),
    "tweedie-f32": (_tweedie, (BIG, torch.float32), {}),
    "clip-mask-f32": (_clip_mask, (BIG, torch.float32), {}),
    "spectral-c64": (_spectral, (BIG, torch.float32), {}),
    "blur-f32": (_blur, (BIG, torch.float32), {}),
    "philox-normal-f32": (_noise, (BIG, torch.float32), {}),
}


# CUDA-extension ops with the same signatures as triton_ops (a column of the same table).
CUDA_CASES = {"update-philox-f32", "update-philox-learned-f32", "update-noise-f32", "update-philox-bf16",
              "spectral-c64", "blur-f32"}


def _fft_baselines(shape) -> dict[str, Callable[[], Any]]:
    """The blur's normal residual with four FFTs (A x, then A^H of the residual: the unfused way)
    and the floor of two bare FFTs (one rfft2 + one irfft2 of the same size)."""
    gen = torch.Generator("cuda").manual_seed(5)
    x, y = _state(shape, torch.float32, 2, gen)
    K = torch.fft.rfft2(torch.rand(shape[-2:], device="cuda", generator=gen))
    s = shape[-2:]

    def four() -> torch.Tensor:
        ax = torch.fft.irfft2(K * torch.fft.rfft2(x), s=s)
        return torch.fft.irfft2(K.conj() * torch.fft.rfft2(ax - y), s=s)

    X = torch.fft.rfft2(x)
    return {"fft4": four, "fft2": lambda: (torch.fft.rfft2(x), torch.fft.irfft2(X, s=s))}


@pytest.mark.parametrize("impl", ["triton", "cuda", "torch", "copy", "fft4", "fft2"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel(benchmark, case: str, impl: str) -> None:
    build, (shape, dtype), kw = CASES[case]
    if impl in ("fft4", "fft2") and case != "blur-f32":
        pytest.skip("FFT baselines belong to the blur case")
    if impl == "cuda":
        from dps_fast._cuda import load_extension

        if case not in CUDA_CASES or load_extension() is None:
            pytest.skip("no CUDA-extension op for this case" if case not in CUDA_CASES else "extension unavailable")
        from dps_fast.backends import cuda_ops

        fused, unfused, nbytes = build(shape, dtype, ops=cuda_ops, **kw)
    else:
        fused, unfused, nbytes = build(shape, dtype, **kw)
    if impl in ("fft4", "fft2"):
        fused = _fft_baselines(shape)[impl]
    if impl == "copy":
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    else:
        fn = unfused if impl == "torch" else fused
    fn()  # compile / warm up outside the timing
    torch.cuda.synchronize()

    def timed() -> None:
        fn()
        torch.cuda.synchronize()

    benchmark.group = case
    benchmark(timed)
    seconds = cuda_timer(fn)
    extra: dict[str, Any] = dict(impl=impl, op=case, dtype=str(dtype).replace("torch.", ""), shape=list(shape))
    if impl in ("triton", "cuda"):
        extra["speedup_vs_torch"] = round(cuda_timer(unfused, warmup=1, reps=5) / seconds, 2)
    if impl in ("triton", "cuda") and case == "blur-f32":
        base = _fft_baselines(shape)
        extra["speedup_vs_four_ffts"] = round(cuda_timer(base["fft4"], warmup=1, reps=5) / seconds, 2)
        extra["ratio_to_two_bare_ffts"] = round(seconds / cuda_timer(base["fft2"], warmup=1, reps=5), 2)
    record(benchmark, nbytes, seconds, copy_gbps(nbytes), **extra)
