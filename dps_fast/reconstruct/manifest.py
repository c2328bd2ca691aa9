"""The identity and status of a ``reconstruct`` run: the settings fingerprint, the environment
and the manifest's status (see :mod:`dps_fast.reconstruct.runner` for the files).

Example:
    >>> fingerprint({"zeta": 1.0}) == fingerprint({"zeta": 1.0})
    True
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..operators.base import Operator
from ..schedule import NoiseSchedule

__all__ = ["MANIFEST_FORMAT", "fingerprint", "model_id", "describe_operator", "schedule_id", "check_resumable",
           "environment", "now", "this_process", "run_status"]

MANIFEST_FORMAT = 1


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")


def model_id(model: Any) -> str:
    """``Type:hash`` of the model's parameters and buffers (exact bytes)."""
    h = hashlib.blake2b(digest_size=12)
    if isinstance(model, nn.Module):
        for name, t in model.state_dict().items():
            h.update(name.encode())
            _hash_tensor(h, t)
    return f"{type(model).__name__}:{h.hexdigest()}"


def describe_operator(op: Operator) -> dict[str, Any]:
    """The operator's type, scalar settings, a hash of each defining tensor (mask, kernel) and
    what ``op.describe()`` adds (e.g. a ``Differentiable``'s function and weights)."""
    desc: dict[str, Any] = {"type": type(op).__name__, "repr": repr(op)}
    for k, v in sorted(vars(op).items()):
        if k.startswith("_cache"):
            continue
        if isinstance(v, torch.Tensor):
            h = hashlib.blake2b(digest_size=8)
            _hash_tensor(h, v)
            desc[k] = h.hexdigest()
        elif isinstance(v, (int, float, str, bool)) or v is None:
            desc[k] = v
    if hasattr(op, "describe"):
        desc.update(op.describe())
    return desc


def schedule_id(schedule: NoiseSchedule) -> dict[str, Any]:
    """The schedule's step count and a hash of its coefficient table and timesteps."""
    h = hashlib.blake2b(digest_size=8)
    _hash_tensor(h, schedule.table(torch.float64))
    _hash_tensor(h, schedule.timesteps)
    return {"steps": schedule.num_steps, "hash": h.hexdigest()}


def fingerprint(settings: dict[str, Any]) -> str:
    """The 16-hex-digit identity of a run's result-affecting ``settings`` (in the manifest and every marker)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_resumable(previous: Optional[dict[str, Any]], settings: dict[str, Any], fingerprint: str, out: Path,
                    flag: str = "out", other: str = "another output folder") -> None:
    """Refuse to write into ``out`` when its manifest ``previous`` (None: a new folder) is of a
    run with other settings: a ValueError naming ``flag`` and the differing top-level settings."""
    if previous is None or previous.get("fingerprint") == fingerprint:
        return
    old = previous.get("settings", {})
    diff = sorted(k for k in set(old) | set(settings)
                  if json.dumps(old.get(k), default=str, sort_keys=True)
                  != json.dumps(settings.get(k), default=str, sort_keys=True))
    raise ValueError(f"{flag}: {str(out)!r} holds a run with other settings (differing: {', '.join(diff) or '?'}); "
                     f"use {other}, or the same settings to resume")


def _git_commit() -> Optional[dict[str, Any]]:
    """Commit of the checkout dps_fast is imported from (None if it is not one)."""
    pkg = Path(__file__).resolve().parents[1]
    try:
        top = subprocess.run(["git", "-C", str(pkg), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != pkg.parent:
            return None
        head = subprocess.run(["git", "-C", str(pkg), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(pkg), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def _version(dist_name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or device.type


def _package_version() -> str:
    from .. import __version__  # at call time: the package face imports reconstruct lazily

    return __version__


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, device and git commit for the run manifest."""
    import PIL

    return {
        "versions": {
            "dps_fast": _package_version(), "torch": torch.__version__, "triton": _version("triton"),
            "python": platform.python_version(), "numpy": np.__version__, "pillow": PIL.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        },
        "device": str(device), "device_name": _device_name(device), "hostname": socket.gethostname(),
        "platform": platform.platform(), "git": _git_commit(),
    }


def now() -> str:
    """The UTC time, ISO 8601, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _process_start(pid: int) -> Optional[int]:
    """Start time of process ``pid`` in clock ticks since boot (Linux /proc), to tell a live run
    from a reused pid; None where /proc is unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def this_process() -> dict[str, Any]:
    """Host, pid and start time of this process (:func:`run_status` tells a live run from a dead one)."""
    return {"hostname": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def run_status(manifest: dict[str, Any]) -> str:
    """The run's status from its manifest, with a "running" run whose process is gone (killed:
    nothing could update the file) shown as "interrupted". A run on another host keeps
    "running" (it cannot be checked from here)."""
    status = str(manifest.get("status", "unknown"))
    proc = manifest.get("process")
    if status != "running" or not isinstance(proc, dict) or proc.get("hostname") != socket.gethostname():
        return status
    pid = proc.get("pid")
    if not isinstance(pid, int):
        return status
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "interrupted"
    except PermissionError:
        pass  # it exists, owned by someone else
    start = _process_start(pid)
    if proc.get("start") is not None and start is not None and start != proc.get("start"):
        return "interrupted"  # the pid was reused
    return status
