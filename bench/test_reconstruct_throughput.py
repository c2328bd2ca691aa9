"""``reconstruct`` throughput: images/s against the batch size (images per sampler call), outputs
written as in a real run (PNGs, tensors.pt, done markers, merge).

* CPU: a random-initialised tiny32 ADMUNet, 2 steps, 8 images of 32x32, batch 1/2/4/8.
* GPU (phase e of bench/gpu_suite.sh; skipped without CUDA): the ffhq256 architecture (random
  weights, no checkpoint needed), bf16 autocast, 8 steps, 32 images of 256x256, batch 32, 16, 8,
  then ``batch_size="auto"`` (its probe included) against the best fixed batch of the same run
  (``auto_vs_best_fixed`` in ``extra_info``). Each contender is its own case, streamed as it ends.

CPU contenders are timed round-robin in one run (``interleaved_medians``), so load changes on a
shared machine hit them alike; the GPU is not shared, so there each contender runs back to back
(a warm-up run first). torch.compile is off: its one-time compile (minutes for ffhq256) would
dominate these short runs.

Run: ``pytest bench/test_reconstruct_throughput.py --benchmark-only``.
"""

from __future__ import annotations

import itertools
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

from _timing import interleaved_medians, interleaved_times
from _util import gpu_info
from dps_fast import operators
from dps_fast.models import ADMUNet
from dps_fast.reconstruct import reconstruct

HAS_CUDA = torch.cuda.is_available()
QUICK = bool(os.environ.get("DPS_BENCH_QUICK"))  # the GPU suite's dry run: the plumbing only
CPU_BATCHES = (1, 2) if QUICK else (1, 2, 4, 8)
CPU_IMAGES = 2 if QUICK else 8
CPU_REPS = 1 if QUICK else 3
# Largest first: the most informative contenders finish before a time limit can cut the phase.
GPU_BATCHES = (32, 16, 8)
GPU_IMAGES = 32
GPU_STEPS = 8
GPU_REPS = 2


def _model(config: str) -> ADMUNet:
    g = torch.Generator().manual_seed(0)
    model = ADMUNet.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def _runner(model: ADMUNet, images: torch.Tensor, device: str, steps: int,
            batch_size: Any, scratch: Path, autocast: Optional[torch.dtype] = None) -> Callable[[], Any]:
    counter = itertools.count()

    def run() -> Any:
        out = scratch / f"run{next(counter)}"  # a fresh folder: nothing to resume
        return reconstruct(images, out, model, operators.GaussianBlur(3.0), steps=steps, samples=1,
                           batch_size=batch_size, device=device, compile=False, autocast=autocast,
                           progress=False, model_id="bench")

    return run


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="dps_reconstruct_bench_") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def cpu_suite(scratch):
    model = _model("tiny32")
    images = torch.rand(CPU_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    fns = {b: _runner(model, images, "cpu", 2, b, scratch / f"cpu{b}") for b in CPU_BATCHES}
    medians = interleaved_medians(fns, reps=CPU_REPS)
    return fns, medians


@pytest.mark.parametrize("batch", CPU_BATCHES, ids=[f"batch{b}" for b in CPU_BATCHES])
def test_cpu_images_per_s_vs_batch(benchmark, cpu_suite, batch):
    fns, medians = cpu_suite
    benchmark.extra_info.update(gpu_info() | {
        "model": "tiny32 (random)", "device_used": "cpu", "steps": 2, "samples": 1, "images": CPU_IMAGES,
        "batch": batch, "threads": torch.get_num_threads(),
        "images_per_s": CPU_IMAGES / medians[batch],
        "speedup_vs_batch1": medians[1] / medians[batch],
        "median_s_interleaved": {str(k): v for k, v in medians.items()}})
    summary = benchmark.pedantic(fns[batch], rounds=1 if QUICK else 2, iterations=1)
    assert summary.done == CPU_IMAGES


@pytest.fixture(scope="module")
def gpu_setup(scratch):
    model = _model("ffhq256").cuda()
    images = torch.rand(GPU_IMAGES, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    # one short run first: Triton compiles, cuDNN and cuFFT plans, the CUDA context's pools
    _runner(model, images[:GPU_BATCHES[0]], "cuda", 2, GPU_BATCHES[0], scratch / "gpuwarm", torch.bfloat16)()
    return model, images, {}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="GPU throughput needs a CUDA device")
@pytest.mark.parametrize("batch", [*GPU_BATCHES, "auto"], ids=[*(f"batch{b}" for b in GPU_BATCHES), "auto"])
def test_gpu_images_per_s_vs_batch(benchmark, gpu_setup, scratch, batch):
    """One contender per case, streamed as it ends (a cut phase keeps the finished ones); the
    "auto" case runs last and is compared with the best fixed batch measured before it."""
    model, images, done = gpu_setup
    run = _runner(model, images, "cuda", GPU_STEPS, batch, scratch / f"gpu{batch}", torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    last: dict[str, Any] = {}  # the last run's summary
    times = interleaved_times({"run": lambda: last.update(summary=run())}, reps=GPU_REPS, warmup=0,
                              device=torch.device("cuda"))["run"]
    summary = last["summary"]
    med = statistics.median(times)
    done[batch] = med
    info = gpu_info() | {
        "model": "ffhq256 architecture (random)", "steps": GPU_STEPS, "samples": 1, "images": GPU_IMAGES,
        "autocast": "bfloat16", "compile": False, "batch": batch, "rows": summary.rows,
        "images_per_s": GPU_IMAGES / med, "seconds": times,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    fixed = {k: v for k, v in done.items() if k != "auto"}
    if batch == "auto" and fixed:
        best = min(fixed, key=fixed.get)
        info |= {"best_fixed_batch": best, "auto_vs_best_fixed": fixed[best] / med,
                 "auto_batch_info": summary.manifest.get("batch")}
    benchmark.extra_info.update(info)
    benchmark.pedantic(lambda: summary, rounds=1, iterations=1)
