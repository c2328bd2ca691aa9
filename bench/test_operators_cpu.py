"""Operator costs, as ratios against baselines timed in the same run (CPU here; the same cases on a GPU).

1. Blur normal residual ``A^H(A x - y)`` + ``||A x - y||^2`` at [32, 3, 256, 256] with the DPS code's
   Gaussian kernel (sigma 3, 61 taps) for every boundary, against the circular one (two FFTs of
   256^2) and against four circular FFTs (the unfused normal residual). The exact non-circular
   residual needs four FFTs of the padded grid (320^2 here: 256 + 61 - 1 = 316 rounded up to a
   7-smooth size) plus one padding and one fold pass; the issue's GPU target is reflect within
   1.3x of circular, which four 320^2 FFTs against two 256^2 ones cannot meet (~3.1x in FFT work
   alone), so the ratio is reported, not asserted. Op set: torch on the CPU; on CUDA the triton
   op set (the default backend's fused spectral stage).
2. A DPS step with a user operator (``Differentiable``) against a built-in of the same cost: the
   antialiased bicubic ``SuperResolution(2)`` (two GEMMs per axis forward, two for the adjoint)
   and ``Differentiable`` of the very same GEMMs (forward with a graph + one VJP). The generic
   path should add only A's own forward and VJP: the step-time ratio is reported with the
   network floor (forward + input VJP alone) and each operator's residual cost alone.

Run: ``python -m pytest bench/test_operators_cpu.py --benchmark-only`` (DPS_BENCH_BLUR_BATCH
overrides the blur batch of 32, e.g. for a quick look).
"""

from __future__ import annotations

import os

import pytest
import torch

from _adm import floor
from _memory import peak_bytes
from _timing import interleaved_medians
from _util import gpu_info
from dps_fast import DPS, NoiseSchedule, operators
from dps_fast.operators import BOUNDARIES
from tests.nets import TinyEps

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
BLUR_SHAPE = (int(os.environ.get("DPS_BENCH_BLUR_BATCH", "32")), 3, 256, 256)
STEP_SHAPE = (8, 3, 64, 64)
STEP = 500


def _op_set():
    if CUDA:
        from dps_fast.backends import triton_ops

        return triton_ops, "triton"
    return None, "torch"  # None: the operator's own torch functions (= torch_ops)


@pytest.fixture(scope="module")
def blur_cases():
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.rand(BLUR_SHAPE, device=DEV, generator=g) * 2 - 1
    ops, ops_name = _op_set()
    fns = {}
    for b in BOUNDARIES:
        A = operators.GaussianBlur(3.0, 61, boundary=b)
        meas = A.prepare(A(x) + 0.05 * torch.randn(BLUR_SHAPE, device=DEV, generator=g))
        fns[b] = (lambda A=A, meas=meas: A.residual(x, meas, ops=ops))
    C = operators.GaussianBlur(3.0, 61)
    y = C(x)
    fns["four-circular-ffts"] = lambda: C.adjoint(C(x) - y)
    medians = interleaved_medians(fns, reps=5, device=DEV)
    return fns, medians, ops_name


@pytest.mark.parametrize("boundary", list(BOUNDARIES))
def test_blur_normal_residual_boundary(benchmark, blur_cases, boundary):
    fns, med, ops_name = blur_cases
    A = operators.GaussianBlur(3.0, 61, boundary=boundary)
    benchmark.group = "blur-normal-residual"
    benchmark.extra_info.update(gpu_info() | {
        "shape": list(BLUR_SHAPE), "dtype": "float32", "kernel": "gaussian sigma 3, 61x61", "boundary": boundary,
        "op_set": ops_name, "fft_grid": list(A.padded_shape(BLUR_SHAPE[2:])),
        "median_s_interleaved": med,
        "ratio_vs_circular": round(med[boundary] / med["circular"], 3),
        "ratio_vs_four_circular_ffts": round(med[boundary] / med["four-circular-ffts"], 3)})
    benchmark.pedantic(fns[boundary], rounds=3, iterations=1, warmup_rounds=1)


def _bicubic_gemms(factor: int, n: int):
    M = operators.SuperResolution(factor, filter="bicubic").matrix(n, DEV, torch.float32)
    return lambda x: M @ x @ M.T


@pytest.fixture(scope="module")
def step_cases():
    torch.manual_seed(0)
    net = TinyEps(3, 32).to(DEV)
    sched = NoiseSchedule.linear(1000)
    g = torch.Generator(device=DEV).manual_seed(1)
    x0 = torch.rand(STEP_SHAPE, device=DEV, generator=g) * 2 - 1
    ops = {"builtin": operators.SuperResolution(2, filter="bicubic"),
           "differentiable": operators.Differentiable(_bicubic_gemms(2, STEP_SHAPE[-1]), input_shape=STEP_SHAPE[1:])}
    y = ops["builtin"](x0)
    fns, residual_fns, first = {}, {}, None
    for name, A in ops.items():
        dps = DPS(net, sched, A, zeta=0.5, sigma_n=0.05, guidance="normalized", clip_x0=(-1, 1), backend="torch",
                  compile=False)
        p, x = dps.prepare(y, 1, seed=0)
        be = dps.backend(DEV)
        fns[name] = (lambda be=be, p=p, x=x: be.step(p, x, STEP))
        residual_fns[f"{name}-residual"] = (lambda A=A, p=p, x=x: A.residual(x, p.meas))
        if first is None:  # the floor runs the first case's network and state
            first = (p, x)
    p0, xs0 = first

    with p0.net.frozen():
        net_floor = floor(p0.net, p0, xs0)  # forward + one input-only VJP of the same network wrapper
        medians = interleaved_medians(fns | residual_fns | {"network-floor": net_floor}, reps=15, device=DEV)
        yield fns, medians, {k: peak_bytes(fn, DEV) for k, fn in fns.items()}


@pytest.mark.parametrize("operator", ["builtin", "differentiable"])
def test_generic_operator_step(benchmark, step_cases, operator):
    fns, med, mem = step_cases
    benchmark.group = "step-generic-operator"
    op_cost = med[f"{operator}-residual"]
    benchmark.extra_info.update(gpu_info() | {
        "shape": list(STEP_SHAPE), "dtype": "float32", "operator": operator,
        "builtin": "SuperResolution(2, filter='bicubic')", "differentiable": "Differentiable(M_h @ x @ M_w^T)",
        "median_s_interleaved": med, "memory": mem,
        "step_ratio_differentiable_vs_builtin": round(med["differentiable"] / med["builtin"], 3),
        "residual_ratio_differentiable_vs_builtin": round(med["differentiable-residual"] / med["builtin-residual"], 3),
        "operator_share_of_step": round(op_cost / med[operator], 3),
        "step_over_network_floor": round(med[operator] / med["network-floor"], 3)})
    benchmark.pedantic(fns[operator], rounds=10, iterations=1, warmup_rounds=1)
