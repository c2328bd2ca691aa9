"""NVTX ranges in one ``dps_fast`` domain around each phase of a step; no-ops without nvtx."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

try:  # nvtx is a declared dependency on Linux, but the library must run without it.
    import nvtx as _nvtx
except Exception:  # pragma: no cover - depends on the platform
    _nvtx = None

__all__ = ["nvtx_range", "NVTX_ENABLED"]

NVTX_ENABLED = _nvtx is not None and os.environ.get("DPS_FAST_NVTX", "1") != "0"
_DOMAIN = _nvtx.get_domain("dps_fast") if NVTX_ENABLED else None


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """``with nvtx_range("vjp"): ...`` marks a phase for Nsight Systems (domain ``dps_fast``)."""
    if _DOMAIN is None:
        yield
        return
    rng = _DOMAIN.start_range(message=name)
    try:
        yield
    finally:
        _DOMAIN.end_range(rng)
