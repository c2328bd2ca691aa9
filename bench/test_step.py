"""Headline: one DPS step of an ADM UNet -- ours, the network floor, and the original DPS code.

GPU (phase b of bench/gpu_suite.sh; ffhq256 with random weights, whose compute is the
checkpoint's), run in this order so that a cut phase keeps the most important numbers:

1. ``test_bf16_matmul_rate``: the bf16 matmul rate of this device, the ceiling of "% of bf16 matmul";
2. ``test_step[...]``: our step variants at batch 8 and 32 -- bf16 + CUDA graph (NCHW, then
   channels_last), the original code path at batch 1 and at the largest batch it fits, bf16
   eager NCHW and channels_last side by side, then compile + bf16 + channels_last (its compile
   takes longest, so it runs last);
3. ``test_headline``: images/s of our best against the original's best (target >= 15x),
   seconds per image for 1000 steps, TFLOP/s and % of the bf16 matmul rate (bench/report.py
   recomputes the same from the streamed rows if this case was cut).

Each variant is timed interleaved with its network floor (forward + input-only VJP in the same
precision, memory format, compile and graph mode), >= 10 paired repetitions; the overhead over
the floor is the median of the per-repetition ratios with a 95% bootstrap interval. FLOPs per
image-step are counted in the run (torch.utils.flop_counter on the meta device: 776 GFLOP for
ffhq256) and every row's TFLOP/s uses that useful count (the original code's recomputed attention
and weight-gradient bookkeeping are not credited).

CPU: tiny32 at batch 4 (``DPS_BENCH_QUICK=1``: batch 2, fewer repetitions, for the suite's dry
run), our torch-backend step interleaved with the floor and the original code path.
Timings are reported, never asserted.
"""

from __future__ import annotations

import functools
import os
import statistics
from typing import Any

import pytest
import torch

import report
from _adm import (VARIANTS, adm_model, flops_per_image_step, floor, max_batch, original, ours, problem,
                  release)
from _memory import peak_bytes
from _timing import interleaved_times, paired_ratio
from _util import gpu_info

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
QUICK = bool(os.environ.get("DPS_BENCH_QUICK"))
CONFIG = "ffhq256" if CUDA else "tiny32"
# >= 10 paired repetitions for the overhead interval (GPU steps are 30-300 ms: ~5 s per case)
REPS = 12 if CUDA else (5 if QUICK else 15)

if CUDA:
    # (variant, batch) in order of importance; "original" rows are the DPS code path
    CASES: list[tuple[str, Any]] = [
        ("bf16+graph", 8), ("bf16+graph", 32), ("bf16+cl+graph", 8), ("bf16+cl+graph", 32),
        ("original", 1), ("original", "max"),
        ("bf16", 8), ("bf16+cl", 8), ("bf16", 32), ("bf16+cl", 32),
        ("compile+bf16+cl", 8), ("compile+bf16+cl", 32),
    ]
    if os.environ.get("DPS_BENCH_FULL"):
        CASES += [("triton", 8), ("bf16+graph", 1), ("bf16", 1)]
else:
    CASES = [("eager", 2 if QUICK else 4)]

_RESULTS: list[dict[str, Any]] = []  # this session's rows, for test_headline


@functools.cache
def _model() -> Any:
    """The session's one model (built at the first case that needs it)."""
    return adm_model(CONFIG, DEV)


@functools.cache
def _matmul_tflops() -> float:
    """The bf16 matmul rate of this device, measured once per session."""
    n = 8192
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    t = statistics.median(interleaved_times({"mm": lambda: a @ b}, reps=10, warmup=3, device=DEV)["mm"])
    return 2 * n**3 / t / 1e12


def _rates(info: dict[str, Any], seconds: float, batch: int) -> None:
    flops = flops_per_image_step(CONFIG)
    info.update(images_per_s=batch / seconds, seconds_per_image_1000_steps=seconds * 1000 / batch,
                gflop_per_image_step=flops / 1e9, tflops=flops * batch / seconds / 1e12)
    if CUDA:
        info["bf16_matmul_tflops"] = _matmul_tflops()
        info["pct_of_bf16_matmul"] = 100.0 * info["tflops"] / info["bf16_matmul_tflops"]


@pytest.mark.skipif(not CUDA, reason="the bf16 matmul ceiling is a GPU figure")
def test_bf16_matmul_rate(benchmark):
    rate = _matmul_tflops()
    benchmark.extra_info.update(gpu_info() | {"kind": "ceiling", "bf16_matmul_tflops": rate,
                                              "shape": [8192, 8192, 8192]})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def _time_original(benchmark, batch: Any) -> dict[str, Any]:
    model = _model()
    found = None
    if batch == "max":
        found = max_batch(lambda b: original(model, *problem(model, b)), start=1, limit=512)
        if found == 0:
            pytest.skip("the original code path does not fit even one image")
        batch = found
    fn = original(model, *problem(model, batch))
    times = interleaved_times({"original": fn}, reps=5 if CUDA else REPS, warmup=1, device=DEV)["original"]
    med = statistics.median(times)
    info = gpu_info() | {"kind": "original", "config": CONFIG, "batch": batch, "median_s": med,
                         "memory": peak_bytes(fn, DEV)}
    if found is not None:
        info["max_batch_original"] = found
    _rates(info, med, batch)
    benchmark.extra_info.update(info)
    benchmark.pedantic(fn, rounds=1, iterations=1)
    return info


def _time_ours(benchmark, variant: str, batch: int) -> dict[str, Any]:
    v = VARIANTS[variant]
    model = _model()
    A, y = problem(model, batch)
    before = torch.cuda.memory_allocated() if CUDA else 0
    step, net, p, x = ours(model, A, y, v)
    with net.frozen():
        fl = floor(net, p, x.clone(), graph=v.graph)
        setup = (torch.cuda.memory_allocated() - before) if CUDA else None
        fns = {"ours": step, "floor": fl}
        if not CUDA:  # on the CPU the original code path is cheap enough to interleave with every case
            fns["original"] = original(model, A, y)
        times = interleaved_times(fns, reps=REPS, warmup=1 if QUICK else 2, device=DEV)
        mem = {"ours": peak_bytes(step, DEV), "floor": peak_bytes(fl, DEV)}
        med = {k: statistics.median(t) for k, t in times.items()}
        over = paired_ratio(times["ours"], times["floor"])
        info = gpu_info() | {
            "kind": "ours", "config": CONFIG, "batch": batch, "variant": variant, **v.options(),
            "autocast": str(v.autocast) if v.autocast else None, "reps": REPS, "median_s": med,
            "memory": mem, "setup_bytes": setup,
            "overhead_over_floor_pct": 100.0 * (over["median"] - 1.0),
            "overhead_ci95_pct": [100.0 * (over["lo"] - 1.0), 100.0 * (over["hi"] - 1.0)],
            "floor_images_per_s": batch / med["floor"],
        }
        if "original" in med:
            info["speedup_vs_original"] = med["original"] / med["ours"]
        _rates(info, med["ours"], batch)
        benchmark.extra_info.update(info)
        benchmark.pedantic(step, rounds=1 if QUICK else 3, iterations=1, warmup_rounds=0)
    return info


@pytest.mark.parametrize("variant,batch", CASES, ids=[f"{v}-b{b}" for v, b in CASES])
def test_step(benchmark, variant, batch):
    if variant == "compile+bf16+cl" and QUICK:
        pytest.skip("compile is not part of the quick run")
    try:
        info = _time_original(benchmark, batch) if variant == "original" else _time_ours(benchmark, variant, batch)
        _RESULTS.append({"name": f"test_step[{variant}-b{batch}]", "extra_info": info})
    finally:
        release()


def test_headline(benchmark):
    """Our best images/s against the original's best, from this session's cases."""
    head = report.headline(_RESULTS)
    if not head:
        pytest.skip("no step case ran in this session")
    benchmark.extra_info.update(gpu_info() | {"kind": "headline", **head})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
