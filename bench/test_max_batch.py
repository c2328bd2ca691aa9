"""Phase d of bench/gpu_suite.sh: the largest batch whose DPS step runs, ours against the
original DPS code path (GPU only; ffhq256 with random weights).

Ours: the bf16 step as a user runs it (triton backend, channels_last by default) inside
``net.frozen()``, so the weights do not require grad and autograd keeps only what the input VJP
needs. The original: weights requiring grad, float32, autograd through the whole step. Both
searched by doubling then bisection; "does not fit" is any out-of-memory error of torch, cuDNN,
cuBLAS or cuFFT. The original's maximum is taken from phase b's row when this run streamed one
(``$DPS_BENCH_JSONL``), else searched here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import report
from _adm import VARIANTS, adm_model, max_batch, original, ours, problem, release
from _util import gpu_info

CUDA = torch.cuda.is_available()


def _ours_at(model):
    """The bf16 channels_last step (the ``bf16+cl`` variant: what ``DPS(..., autocast=bfloat16)``
    resolves to on CUDA, backend auto = triton, channels_last auto = on), weights frozen."""
    def run_at(batch: int):
        step, net, _, _ = ours(model, *problem(model, batch), VARIANTS["bf16+cl"])

        def frozen_step():
            with net.frozen():
                step()

        return frozen_step

    return run_at


def _streamed_original_max() -> int | None:
    path = os.environ.get("DPS_BENCH_JSONL")
    if not path or not Path(path).is_file():
        return None
    for r in report.read_rows(Path(path)):
        mb = r.get("extra_info", {}).get("max_batch_original")
        if mb:
            return int(mb)
    return None


@pytest.mark.skipif(not CUDA, reason="GPU memory figure")
def test_max_batch_ours_vs_original(benchmark):
    model = adm_model("ffhq256", torch.device("cuda"))
    try:
        ours_max = max_batch(_ours_at(model), start=8, limit=4096)
        streamed = _streamed_original_max()
        orig = streamed if streamed is not None else max_batch(
            lambda b: original(model, *problem(model, b)), start=1, limit=512)
    finally:
        release()
    benchmark.extra_info.update(gpu_info() | {
        "config": "ffhq256", "max_batch_ours": ours_max, "max_batch_ours_variant": "bf16 (frozen weights)",
        "max_batch_original": orig, "original_from_phase_b": streamed is not None,
        "max_batch_ratio": ours_max / max(orig, 1)})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
