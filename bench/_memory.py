"""Memory figures for benchmarks: CUDA peak allocation, or on the CPU the bytes autograd holds.

On CUDA, ``peak_bytes`` is ``torch.cuda.max_memory_allocated`` during the call minus what was
allocated before it. The CPU allocator keeps no such statistic, so there the figure is the bytes of
the distinct storages autograd saved for the backward pass during the call (the activation memory
that separates the methods compared here; inputs and weights are common to all of them).
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def autograd_saved_bytes(fn: Callable[[], Any]) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """``{"peak_bytes": ...}`` on CUDA, ``{"autograd_saved_bytes": ...}`` on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - base}
    return {"autograd_saved_bytes": autograd_saved_bytes(fn)}
