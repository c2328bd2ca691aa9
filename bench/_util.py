"""Helpers shared by the pytest-benchmark suites (``pytest bench/ --benchmark-only``).

* :func:`gpu_info` -- what a reader needs to trust a number: device, versions, commit;
* :func:`gbps` -- bandwidth arithmetic;
* :func:`cuda_timer` -- median CUDA-event time of a callable (setup stays outside);
* :func:`copy_gbps` -- the measured device-to-device copy bandwidth, the roofline that a
  memory-bound kernel's "% of copy" is computed against.

Example:
    >>> t = cuda_timer(lambda: y.copy_(x))                 # doctest: +SKIP
    >>> gbps(2 * x.numel() * x.element_size(), t)          # doctest: +SKIP
"""

from __future__ import annotations

import functools
import statistics
import subprocess
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["gpu_info", "gbps", "cuda_timer", "copy_gbps", "record"]


@functools.lru_cache(maxsize=1)
def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_info(device: torch.device | int | None = None) -> dict[str, Any]:
    """Device and software facts for ``benchmark.extra_info`` (no CUDA: device ``"cpu"``)."""
    info: dict[str, Any] = {"torch": torch.__version__, "git_commit": _git_commit()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device() if device is None else
                           (device.index or 0) if isinstance(device, torch.device) else device)
        p = torch.cuda.get_device_properties(dev)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info["device"] = "cpu"
        info["cpu_threads"] = torch.get_num_threads()
        try:  # a shared CPU's load is context for every CPU figure (ratios are interleaved, times are not)
            import os

            info["load_avg_1min"] = round(os.getloadavg()[0], 2)
        except (AttributeError, OSError):
            pass
    return info


def gbps(nbytes: float, seconds: float) -> float:
    """Bandwidth in GB/s (10^9 bytes per second) of moving ``nbytes`` in ``seconds``."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def cuda_timer(fn: Callable[[], Any], warmup: int = 3, reps: int = 20) -> float:
    """Median seconds of one ``fn()`` call, timed with CUDA events on the current stream.

    ``fn`` must only launch work (allocation and inputs prepared beforehand)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_gbps(nbytes: int, device: torch.device | str = "cuda") -> float:
    """Measured bandwidth of a device-to-device copy that moves ``nbytes`` in total (reads
    ``nbytes / 2``, writes ``nbytes / 2``): ``torch.empty`` + ``copy_``."""
    half = max(1, nbytes // 2)
    src = torch.empty(half, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = cuda_timer(lambda: dst.copy_(src))
    return gbps(2 * half, t)


def record(benchmark: Any, nbytes: int | None = None, seconds: float | None = None,
           copy_bw: float | None = None, **extra: Any) -> None:
    """Fill ``benchmark.extra_info`` with :func:`gpu_info`, ``extra`` and, given the bytes moved
    and a time, the achieved GB/s and its percentage of the measured copy bandwidth."""
    info = gpu_info()
    info.update(extra)
    if nbytes is not None:
        info["bytes_moved"] = int(nbytes)
    if nbytes is not None and seconds is not None:
        bw = gbps(nbytes, seconds)
        info["seconds_cuda_events"] = seconds
        info["gbps"] = round(bw, 1)
        if copy_bw:
            info["copy_gbps"] = round(copy_bw, 1)
            info["pct_of_copy"] = round(100.0 * bw / copy_bw, 1)
    benchmark.extra_info.update(info)
