"""Memory-aware batching: pick the chunk size (rows = images x samples per sampler call) that fits
the GPU, stream work through it, and halve it when a chunk still runs out of memory.

* :func:`auto_rows` probes one guided step (forward + VJP) at two sizes, fits
  ``peak(rows) = a + b * rows`` from ``torch.cuda.max_memory_allocated`` and returns the largest
  size that leaves ``margin`` of the free memory unused (CPU: a small fixed size).
* :func:`stream_chunks` feeds items through a ``run(jobs)`` callable; on an out-of-memory error
  (:func:`is_oom`: torch's own, or the cuDNN / cuBLAS / cuFFT allocation failures)
  it halves the size and retries the same jobs (below one image per call it splits an image's
  samples), so a job never aborts for memory while one row fits. ``fault`` lets tests inject a
  fake OOM on CPU.

Example:
    >>> out = list(stream_chunks(["a", "b", "c"], samples=2, rows=4,
    ...                          run=lambda jobs: [j.stop - j.start for j in jobs]))
    >>> [([j.key for j in jobs], res) for jobs, res, _ in out]
    [(['a', 'b'], [2, 2]), (['c'], [2])]
"""

from __future__ import annotations

import gc
import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = ["Job", "is_oom", "OOM_MARKERS", "stream_chunks", "auto_rows", "pick_checkpointing", "time_step", "CPU_ROWS",
           "MAX_ROWS"]

#: Rows per call on CPU when the batch size is "auto": 8 rows gave 2.1x the images/s of 1 row
#: (tiny32, 2 steps, 2 threads; bench/test_reconstruct_throughput.py), 4 rows 1.9x; with 1 thread on
#: a loaded machine 1.39x and 1.27x (bench/results/cpu-20261129-6bd8e0e): 8 is the best either way.
CPU_ROWS = 8
#: Upper bound of an automatically chosen chunk (beyond it the GPU is saturated for any ADM size).
MAX_ROWS = 1024


@dataclass(frozen=True)
class Job:
    """Samples ``start .. stop - 1`` of the item ``key`` (``stop - start`` rows of one call)."""

    key: Any
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


#: Texts of the errors that CUDA libraries raise (as RuntimeError, through torch's checks) instead
#: of ``torch.cuda.OutOfMemoryError`` when an allocation fails near the memory limit. Each one is
#: the status name or phrase as torch prints it; the comment gives a full message as users report it.
OOM_MARKERS = (
    # cuDNN: "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a
    # non-contiguous input." -- the classic message of a convolution whose workspace did not fit
    "CUDNN_STATUS_NOT_SUPPORTED",
    "CUDNN_STATUS_ALLOC_FAILED",      # "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"
    "CUDNN_STATUS_INTERNAL_ERROR",    # "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR" (failed internal allocation)
    # cuDNN v8/v9 frontend: "GET was unable to find an engine to execute this computation" (and
    # "FIND was unable ..." with cudnn.benchmark): no engine's workspace fits the free memory
    "unable to find an engine to execute this computation",
    # cuBLAS: "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
    "CUBLAS_STATUS_ALLOC_FAILED",
    # cublasCreate also reports a failed workspace allocation as NOT_INITIALIZED:
    # "CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`"
    "CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate",
    "CUFFT_ALLOC_FAILED",             # "cuFFT error: CUFFT_ALLOC_FAILED" (plan work area)
    # "cuFFT error: CUFFT_INTERNAL_ERROR", raised by plan creation on low free memory (pytorch#119420)
    "CUFFT_INTERNAL_ERROR",
)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is a device out-of-memory error: ``torch.cuda.OutOfMemoryError``, a
    RuntimeError saying "out of memory" (paths that do not raise the typed error, e.g. "CUDA error:
    out of memory"), or a cuDNN / cuBLAS / cuFFT error of :data:`OOM_MARKERS`, which those
    libraries raise for allocations that fail near the memory limit.

    Other errors, including other statuses of the same libraries (e.g. CUDNN_STATUS_EXECUTION_FAILED,
    CUFFT_INVALID_PLAN) and non-RuntimeErrors with these texts, are not out-of-memory.

    Example:
        >>> is_oom(RuntimeError("cuFFT error: CUFFT_ALLOC_FAILED"))
        True
        >>> is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"))
        False
    """
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return "out of memory" in text.lower() or any(m in text for m in OOM_MARKERS)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stream_chunks(
    keys: Iterable[Any], samples: int, rows: int, run: Callable[[list[Job]], Sequence[Any]],
    pad: bool = True, fault: Optional[Callable[[int], None]] = None,
    on_resize: Optional[Callable[[int], None]] = None,
) -> Iterator[tuple[list[Job], list[Any], int]]:
    """Run every key's ``samples`` samples through ``run`` in calls of at most ``rows`` rows.

    ``keys`` is consumed lazily (load items in the generator). Each call gets jobs with the same
    sample count: whole items (``rows // samples`` of them) or, when ``rows < samples``, one
    slice of one item. With ``pad`` the job list is padded to the call's full size by repeating
    its last job, so every call of a given size has the same shape: a row's floating-point result
    then does not depend on which other items share its call (tested bit for bit on CPU).

    ``run(jobs)`` returns one result per job; padded results are dropped. On an out-of-memory
    error (:func:`is_oom`) the size is halved and the same jobs retried; with one row left the
    error propagates. ``fault(rows)`` is called before each call (tests inject a fake OOM).

    Yields:
        ``(jobs, results, rows)`` per successful call, jobs in input order (an item's slices in
        sample order), ``rows`` the size in force.
    """
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples: expected an int >= 1, got {samples!r}")
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows: expected an int >= 1, got {rows!r}")
    source = iter(keys)
    pending: deque[Job] = deque()  # jobs taken from `source` but not finished (retries, remainders)

    def take() -> Optional[Job]:
        if pending:
            return pending.popleft()
        for key in source:
            return Job(key, 0, samples)
        return None

    while True:
        head = take()
        if head is None:
            return
        remainder: Optional[Job] = None
        if head.count <= rows:
            jobs = [head]
            if head.count == samples:  # whole items: fill the call with more whole items
                while len(jobs) < rows // samples:
                    nxt = take()
                    if nxt is None:
                        break
                    if nxt.count != samples:
                        pending.appendleft(nxt)
                        break
                    jobs.append(nxt)
            per_call = rows // head.count
        else:  # fewer rows than samples: one slice of one item
            jobs = [Job(head.key, head.start, head.start + rows)]
            remainder = Job(head.key, head.start + rows, head.stop)
            per_call = 1
        padded = jobs + [jobs[-1]] * (per_call - len(jobs)) if pad else jobs
        oom = False
        try:
            if fault is not None:
                fault(sum(j.count for j in padded))
            results = list(run(padded))
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is an OOM
            if not is_oom(exc):
                raise
            oom = True
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if oom:
            # Outside the except block, so the traceback's frames (and their tensors) are freed.
            if rows == 1:
                raise torch.cuda.OutOfMemoryError(
                    f"out of memory with a single row (one sample of one image): {msg}")
            for j in reversed([head] if remainder is not None else jobs):
                pending.appendleft(j)
            rows //= 2
            logger.warning("out of memory (%s); retrying with %d rows per call", msg, rows)
            _release_memory()
            if on_resize is not None:
                on_resize(rows)
            continue
        if remainder is not None:
            pending.appendleft(remainder)
        if len(results) != len(padded):
            raise RuntimeError(f"run: expected one result per job ({len(padded)}), got {len(results)}")
        yield jobs, results[:len(jobs)], rows


def auto_rows(
    step: Callable[[int], None], device: torch.device, samples: int, max_rows: int = MAX_ROWS,
    margin: float = 0.1, probe: Sequence[int] = (2, 8),
) -> tuple[int, dict[str, Any]]:
    """The largest rows per call whose guided step fits the free memory of ``device``.

    ``step(r)`` runs one guided step (network forward + VJP) on ``r`` rows. Peak memory above the
    current allocation is measured at the two ``probe`` sizes and extrapolated linearly; the
    result leaves ``margin`` of the free memory (after the probes) unused, is capped at
    ``max_rows`` and rounded down to whole images (a multiple of ``samples``) when at least one
    image fits. On CPU it returns ``min(max_rows, max(samples, CPU_ROWS // samples * samples))``
    without probing.

    Returns:
        ``(rows, info)``: ``info`` holds the measured figures for the run manifest.
    """
    if not 0 <= margin < 1:
        raise ValueError(f"margin: expected a fraction in [0, 1), got {margin!r}")
    max_rows = max(1, int(max_rows))
    if device.type != "cuda":
        rows = min(max_rows, max(samples, CPU_ROWS // samples * samples))
        return rows, {"mode": "cpu-default", "rows": rows}
    r0, r1 = (min(max(1, r), max_rows) for r in probe)
    peaks: dict[int, int] = {}
    for r in sorted({r0, r1}):
        torch.cuda.synchronize(device)
        _release_memory()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        oom = False
        try:
            step(r)
            torch.cuda.synchronize(device)
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
            oom = True
        if oom:
            _release_memory()
            rows = max(1, r // 2)
            logger.warning("auto batch: the probe with %d rows ran out of memory; using %d", r, rows)
            return rows, {"mode": "probe-oom", "rows": rows}
        peaks[r] = torch.cuda.max_memory_allocated(device) - base
    _release_memory()
    free, total = torch.cuda.mem_get_info(device)
    if r1 > r0:
        per_row = max(1.0, (peaks[r1] - peaks[r0]) / (r1 - r0))
        fixed = max(0.0, peaks[r0] - per_row * r0)
    else:
        per_row, fixed = float(max(1, peaks[r0])) / r0, 0.0
    budget = free * (1.0 - margin)
    rows = int(max(1, min(max_rows, math.floor((budget - fixed) / per_row))))
    if rows >= samples:
        rows = rows // samples * samples
    info = {"mode": "probe", "rows": rows, "probe_rows": [r0, r1],
            "probe_peak_bytes": [peaks[r0], peaks[r1]], "bytes_per_row": round(per_row),
            "fixed_bytes": round(fixed), "free_bytes": free, "total_bytes": total, "margin": margin}
    logger.info("auto batch: %.1f MiB per row + %.1f MiB, %.1f GiB free -> %d rows per call",
                per_row / 2**20, fixed / 2**20, free / 2**30, rows)
    return rows, info


def time_step(step: Callable[[int], None], rows: int, device: torch.device, reps: int = 2) -> float:
    """Seconds of one ``step(rows)`` (after one warm-up call; the faster of ``reps`` timed calls)."""
    import time

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step(rows)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    once()
    return min(once() for _ in range(max(1, reps)))


def pick_checkpointing(measure: Callable[[bool], tuple[int, float]]) -> tuple[bool, dict[str, Any]]:
    """Whether activation checkpointing raises the throughput: measured, not guessed.

    ``measure(flag)`` sets the network's checkpointing to ``flag`` and returns ``(rows, seconds)``:
    the chunk that fits with it and the time of one step at that chunk. Checkpointing recomputes
    activations in the VJP (slower per row) but frees memory for larger chunks; the flag with the
    higher rows per second wins (ties keep it off).

    Example:
        >>> pick_checkpointing(lambda on: (64, 2.0) if on else (16, 1.0))[0]
        True
    """
    res = {flag: measure(flag) for flag in (False, True)}
    rate = {flag: rows / max(sec, 1e-12) for flag, (rows, sec) in res.items()}
    best = rate[True] > rate[False]
    info = {"checkpointing": best,
            "checkpointing_rows": {"off": res[False][0], "on": res[True][0]},
            "checkpointing_rows_per_s": {"off": round(rate[False], 3), "on": round(rate[True], 3)}}
    logger.info("auto batch: checkpointing %s (%.1f rows/s off at %d rows, %.1f on at %d rows)",
                "on" if best else "off", rate[False], res[False][0], rate[True], res[True][0])
    return best, info
