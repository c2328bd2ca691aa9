"""Fair timing of several callables in one run, and confidence intervals for their ratios.

* :func:`interleaved_times` -- round-robin (interleaved) repetitions, so a load change on a
  shared machine (or a clock change on a GPU) hits every contender alike; synchronised on CUDA;
* :func:`interleaved_medians` -- the medians of those times;
* :func:`paired_ratio` -- the ratio of two contenders from the same repetitions: its median and a
  bootstrap confidence interval of that median. Repetition ``i`` of both ran back to back, so the
  per-repetition ratios cancel slow drifts that separate medians would not.

Example:
    >>> t = {"a": [1.0, 1.1, 1.0, 1.2, 1.0], "b": [2.0, 2.1, 2.0, 2.3, 2.1]}
    >>> r = paired_ratio(t["a"], t["b"])
    >>> round(r["median"], 3), r["n"]
    (0.5, 5)
"""

from __future__ import annotations

import math
import random
import statistics
import time
from typing import Any, Callable, Sequence

import torch

__all__ = ["interleaved_times", "interleaved_medians", "paired_ratio"]


def interleaved_times(fns: dict[str, Callable[[], Any]], reps: int = 10, warmup: int = 1,
                      device: torch.device | None = None,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of ``reps`` calls of each callable, called round-robin after ``warmup`` calls each.

    On CUDA each call is bracketed by ``torch.cuda.synchronize`` (host clock): the figures are
    what a caller waits, launch overhead included. ``clock``: the clock read around each call
    (e.g. ``time.thread_time`` for the CPU time of a one-thread CPU run)."""
    cuda = device is not None and device.type == "cuda"

    def timed(fn: Callable[[], Any]) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = clock()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        return clock() - t0

    for fn in fns.values():
        for _ in range(warmup):
            timed(fn)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return times


def interleaved_medians(fns: dict[str, Callable[[], Any]], reps: int = 7, warmup: int = 1,
                        device: torch.device | None = None,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each callable (see :func:`interleaved_times`)."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, reps, warmup, device, clock).items()}


def paired_ratio(num: Sequence[float], den: Sequence[float], level: float = 0.95,
                 resamples: int = 4000, seed: int = 0) -> dict[str, Any]:
    """``num[i] / den[i]`` over paired repetitions: median, and a percentile-bootstrap
    ``level`` confidence interval of the median (``resamples`` resamples, fixed ``seed``).

    Why a bootstrap of the median: step times have a long right tail (a preempted repetition),
    so a t-interval of the mean would be dominated by outliers; the median's bootstrap interval
    needs no distribution. With fewer than 5 pairs the interval is reported as NaN.
    """
    if len(num) != len(den) or not num:
        raise ValueError(f"num, den: expected two equally long non-empty sequences, got {len(num)} and {len(den)}")
    ratios = [a / b for a, b in zip(num, den)]
    med = statistics.median(ratios)
    out: dict[str, Any] = {"median": med, "n": len(ratios), "level": level, "lo": math.nan, "hi": math.nan}
    if len(ratios) >= 5:
        rng = random.Random(seed)
        meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
        alpha = (1.0 - level) / 2
        out["lo"] = meds[int(math.floor(alpha * (resamples - 1)))]
        out["hi"] = meds[int(math.ceil((1 - alpha) * (resamples - 1)))]
    return out
