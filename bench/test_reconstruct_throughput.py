"""``reconstruct`` throughput: images/s against the batch size (images per sampler call), outputs
written as in a real run (PNGs, tensors.pt, done markers, merge).

* CPU: a random-initialised tiny32 ADMUNet, 2 steps, 8 images of 32x32, batch 1/2/4/8.
* GPU (skipped without CUDA): the ffhq256 architecture (random weights, no checkpoint needed),
  5 steps, 64 images of 256x256, batch 4..64; then ``batch_size="auto"`` against the best fixed
  batch of the same run (ratio in ``extra_info``; auto should be within ~10% of the best).

All contenders of a suite are timed round-robin in one run (``interleaved_medians``), so load
changes on a shared machine hit them alike; ``extra_info`` holds images/s and the ratio to
batch 1 (CPU) or to the best fixed batch (GPU auto). torch.compile is off: it would recompile for
every batch shape and dominate these short runs.

Run: ``pytest bench/test_reconstruct_throughput.py --benchmark-only``.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from _timing import interleaved_medians
from _util import gpu_info
from dps_fast import operators
from dps_fast.models import ADMUNet
from dps_fast.reconstruct import reconstruct

HAS_CUDA = torch.cuda.is_available()
CPU_BATCHES = (1, 2, 4, 8)
CPU_IMAGES = 8
GPU_BATCHES = (4, 8, 16, 32, 64)
GPU_IMAGES = 64


def _model(config: str) -> ADMUNet:
    g = torch.Generator().manual_seed(0)
    model = ADMUNet.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def _runner(model: ADMUNet, images: torch.Tensor, device: str, steps: int,
            batch_size: Any, scratch: Path) -> Callable[[], Any]:
    counter = itertools.count()

    def run() -> Any:
        out = scratch / f"run{next(counter)}"  # a fresh folder: nothing to resume
        return reconstruct(images, out, model, operators.GaussianBlur(3.0), steps=steps, samples=1,
                           batch_size=batch_size, device=device, compile=False, progress=False,
                           model_id="bench")

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
    medians = interleaved_medians(fns, reps=3)
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
    summary = benchmark.pedantic(fns[batch], rounds=2, iterations=1)
    assert summary.done == CPU_IMAGES


@pytest.fixture(scope="module")
def gpu_suite(scratch):
    model = _model("ffhq256").cuda()
    images = torch.rand(GPU_IMAGES, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    fns: dict[Any, Callable[[], Any]] = {
        b: _runner(model, images, "cuda", 5, b, scratch / f"gpu{b}") for b in GPU_BATCHES}
    fns["auto"] = _runner(model, images, "cuda", 5, "auto", scratch / "gpuauto")
    torch.cuda.reset_peak_memory_stats()
    medians = interleaved_medians(fns, reps=3, device=torch.device("cuda"))
    auto_rows = fns["auto"]().rows
    return fns, medians, auto_rows


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="GPU throughput needs a CUDA device")
@pytest.mark.parametrize("batch", [*GPU_BATCHES, "auto"], ids=[*(f"batch{b}" for b in GPU_BATCHES), "auto"])
def test_gpu_images_per_s_vs_batch(benchmark, gpu_suite, batch):
    fns, medians, auto_rows = gpu_suite
    fixed = {k: v for k, v in medians.items() if k != "auto"}
    best = min(fixed, key=fixed.get)
    info = gpu_info() | {
        "model": "ffhq256 architecture (random)", "steps": 5, "samples": 1, "images": GPU_IMAGES,
        "batch": batch, "images_per_s": GPU_IMAGES / medians[batch], "best_fixed_batch": best,
        "median_s_interleaved": {str(k): v for k, v in medians.items()},
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    if batch == "auto":
        info |= {"auto_rows": auto_rows, "auto_vs_best_fixed": fixed[best] / medians["auto"]}
    benchmark.extra_info.update(info)
    summary = benchmark.pedantic(fns[batch], rounds=1, iterations=1)
    assert summary.done == GPU_IMAGES
