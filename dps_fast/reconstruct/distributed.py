"""torch.distributed for ``torchrun --nproc-per-node N -m dps_fast.cli reconstruct ...``.

The process group is created only when ``WORLD_SIZE > 1`` (set by torchrun): NCCL when the run
is on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on CPU. A plain ``python -m dps_fast.cli``
run is world size 1 and never touches torch.distributed. The runner needs just two collectives:
a barrier after every rank has listed the pending work, and an ``all_gather_object`` of the
ranks' summaries at the end (which rank 0 merges).

Example:
    >>> ctx = init("cpu")  # no torchrun: a world of one
    >>> ctx.rank, ctx.world_size, ctx.device
    (0, 1, device(type='cpu'))
"""

from __future__ import annotations

import csv
import datetime
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from .data import DONE, ITEMS, METRICS, atomic_write_bytes, read_json

logger = logging.getLogger(__name__)

__all__ = ["DistContext", "init", "barrier", "all_gather_object", "teardown", "merge", "collect_done", "cell", "TIMEOUT",
           "METRIC_COLUMNS"]

#: Collective timeout. Ranks meet only after listing the work and at the end, and the work is
#: sharded evenly, so the wait at the final gather is about one chunk; an hour leaves room for
#: slow checkpoint loading and torch.compile on some ranks.
TIMEOUT = datetime.timedelta(minutes=60)


@dataclass
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, its ``device`` and whether this
    module created the process group (and so must destroy it)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str] = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer environment variable, got {value!r}") from None


def init(device: Union[str, torch.device, None] = None) -> DistContext:
    """Join the torchrun job if there is one; resolve the device of this rank.

    ``device``: None picks ``cuda`` when available, else ``cpu``. Under torchrun a CUDA device
    becomes ``cuda:LOCAL_RANK`` (an explicit index is overridden, with a log line).
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {str(dev)!r} requested but CUDA is not available (torch {torch.__version__})")
    if world <= 1:
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return DistContext(0, 1, 0, dev)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if dev.type == "cuda":
        if dev.index is not None and dev.index != local:
            logger.info("rank %d: using cuda:%d (LOCAL_RANK) instead of %s", rank, local, dev)
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices are visible")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    owns = False
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": TIMEOUT}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
        owns = True
    logger.info("rank %d/%d on %s (%s)", rank, world, dev, backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), local, dev, backend, owns)


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (a no-op for a world of one)."""
    if ctx.active:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def all_gather_object(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` for a world of one); also a barrier."""
    if not ctx.active:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        ctx.owns_group = False


# ---- merging the ranks' outputs ---------------------------------------------------------------
#: Columns of metrics.csv: one row per posterior sample and one ("mean") for the posterior mean.
METRIC_COLUMNS = ("image", "index", "sample", "seed", "psnr", "ssim", "residual_norm", "seconds", "rank")


def cell(v: Any) -> str:
    """One metrics.csv cell: "" for None, floats that round-trip (inf/nan as "inf"/"nan")."""
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # round-trips; inf/nan as "inf"/"nan"
    return str(v)


def collect_done(out_dir: Union[str, os.PathLike], fingerprint: Optional[str] = None) -> list[dict[str, Any]]:
    """The done markers of every finished item in ``out_dir`` (written by any rank of any run),
    sorted by input index. Markers of other settings (``fingerprint`` mismatch) raise ValueError."""
    root = Path(out_dir) / ITEMS
    records = []
    if root.is_dir():
        for folder in root.iterdir():
            rec = read_json(folder / DONE) if folder.is_dir() else None
            if rec is None:
                continue
            if fingerprint is not None and rec.get("fingerprint") != fingerprint:
                raise ValueError(f"out: {str(folder)!r} was produced with other settings (fingerprint "
                                 f"{rec.get('fingerprint')} != {fingerprint}); use another output folder")
            records.append(rec)
    records.sort(key=lambda r: (r.get("index", 0), r.get("name", "")))
    return records


def merge(out_dir: Union[str, os.PathLike], fingerprint: Optional[str] = None) -> list[dict[str, Any]]:
    """Write ``OUT/metrics.csv`` from the done markers of all finished items; returns them.

    Depends only on the files in ``out_dir``, so it also completes the merge of a run in which a
    rank died (after the re-run finished that rank's items) or runs alone (``--merge-only``).
    """
    records = collect_done(out_dir, fingerprint)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(METRIC_COLUMNS)
    for rec in records:
        for row in rec.get("metrics", []):
            writer.writerow([cell(row.get(c)) for c in METRIC_COLUMNS])
    atomic_write_bytes(Path(out_dir) / METRICS, buf.getvalue().encode())
    return records
