"""Fair timing of several callables in one run: round-robin (interleaved) repetitions, so a load
change on a shared machine hits every contender alike; medians, synchronised on CUDA."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def interleaved_medians(fns: dict[str, Callable[[], Any]], reps: int = 7, warmup: int = 1,
                        device: torch.device | None = None) -> dict[str, float]:
    cuda = device is not None and device.type == "cuda"

    def timed(fn: Callable[[], Any]) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for fn in fns.values():
        for _ in range(warmup):
            timed(fn)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}
