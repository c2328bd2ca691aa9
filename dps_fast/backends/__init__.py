"""Backend dispatch: ``reference`` (autograd), ``torch`` (fast path in plain PyTorch), ``triton``
(fused Triton kernels) and ``cuda`` (the CUDA extension). All answer :meth:`Backend.step`."""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from . import torch_ops
from .base import Backend, FusedBackend, ReferenceBackend, StepOutput, StepProblem

logger = logging.getLogger(__name__)

__all__ = ["Backend", "FusedBackend", "ReferenceBackend", "StepProblem", "StepOutput", "get_backend", "check_backend",
           "BACKENDS"]

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")


def _triton_backend() -> Backend:
    from . import triton_ops

    return FusedBackend(triton_ops, "triton")


def _cuda_backend() -> Backend | None:
    from .._cuda import load_extension

    if load_extension() is None:
        return None
    from . import cuda_ops

    return FusedBackend(cuda_ops, "cuda")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def check_backend(name: str, device: Optional[torch.device] = None) -> None:
    """Raise ValueError now if backend ``name`` cannot run on ``device`` (None: not known yet).

    Called when a sampler is built, so that a run fails before it writes anything rather than at
    its first step. ``triton`` needs the triton package and CUDA tensors (or any device under
    ``TRITON_INTERPRET=1``, Triton's CPU interpreter); ``cuda`` needs CUDA tensors.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name == "triton":
        if not triton_available():
            raise ValueError("backend: 'triton' needs the triton package (pip install triton); "
                             "use 'auto' or 'torch' without it")
        # the same test as kernels/launch.py::interpreting, without importing the kernels
        interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        if device is not None and device.type != "cuda" and not interpreting:
            raise ValueError(f"backend: 'triton' runs on CUDA devices, got the model on {device}; use 'auto' or "
                             f"'torch' there (or set TRITON_INTERPRET=1 for Triton's slow CPU interpreter)")
    if name == "cuda" and device is not None and device.type != "cuda":
        raise ValueError(f"backend: 'cuda' runs on CUDA devices, got the model on {device}; use 'auto' or 'torch'")


def get_backend(name: str, device: torch.device) -> Backend:
    """The backend ``name`` for tensors on ``device``; ``auto`` picks the fastest that works.

    ``auto``: on CUDA the Triton backend when triton imports (the CUDA extension is opt-in with
    ``backend="cuda"`` until GPU measurements say it wins; see README), else ``torch``.
    """
    check_backend(name, device)
    if name == "reference":
        return ReferenceBackend()
    if name == "torch":
        return FusedBackend(torch_ops, "torch")
    if name == "triton":
        return _triton_backend()
    if name == "cuda":
        be = _cuda_backend()
        if be is None:
            logger.warning("backend 'cuda': the extension is unavailable; using the triton backend instead")
            return _triton_backend() if triton_available() else FusedBackend(torch_ops, "torch")
        return be
    if device.type == "cuda" and triton_available():
        return _triton_backend()
    return FusedBackend(torch_ops, "torch")
