"""The reconstruction loop behind ``dps-fast reconstruct`` and :func:`reconstruct`.

For every input item ``x`` (or given measurement ``y``) it draws ``S`` posterior samples with
:class:`~dps_fast.DPS` and writes, under ``OUT/items/NAME/``: ``measurement.png``,
``sample_000.png`` ..., ``mean.png``, ``std.png``, ``tensors.pt`` (the float tensors) and, last,
``done.json`` (the item's metrics). Each finished item's rows are appended to ``OUT/metrics.csv``
at once; at the end ``OUT/metrics.csv`` is rewritten, sorted, from the done markers (as
``--merge-only`` does) and ``OUT/manifest.json`` gets the run's status. The ``seconds`` column is
the item's share of the wall time of the sampler calls it was part of (a batched call's time
split evenly over the samples it ran), not a per-image latency.

Reproducibility and resumption:

* **Seeds per item.** Item ``NAME`` gets the 62-bit key ``blake2b(seed, NAME)``; its sample ``j``
  has the sampler seed ``seeds_from(key)[j]`` and the simulated measurement noise its own key.
  The sampler's noise depends only on a sample's seed, never on its batch position, so a
  resumed, re-sharded or re-batched run draws the same samples.
* **Same shapes.** Calls are padded to the chunk size (see :func:`stream_chunks`); with the same
  chunk size the float results are bit-identical whichever items share a call. The chunk size
  depends only on ``batch_size`` and the dataset size (``auto`` on CUDA: the probe's choice,
  agreed by all ranks and reused from the manifest when a run is resumed).
* **Atomic outputs.** Every file is written to a temporary name and ``os.replace``'d; the done
  marker is written last, so an interrupted run loses at most the chunk in flight, and a re-run
  of the same command skips finished items. A run stopped by Ctrl-C (or an error) marks its
  manifest "interrupted" ("failed", "diverged"); one that was killed still says "running", and
  :func:`run_status` (``--merge-only``, a resumed run) shows it as "interrupted" once its
  process is gone. A run with other result-affecting settings in the
  same folder is refused (the settings' fingerprint is in the manifest and every marker).
* **Sharding.** Under torchrun, the items still pending are split by position
  (``pending[rank::world_size]``) after every rank listed them; each rank writes its items'
  folders, rank 0 merges after an ``all_gather`` of the ranks' summaries.

Example:
    >>> from dps_fast.models import ADMUNet  # doctest: +SKIP
    >>> model = ADMUNet.from_checkpoint("ffhq_10m.pt", config="ffhq256")  # doctest: +SKIP
    >>> reconstruct("faces/", "out/", model, operators.GaussianBlur(3.0), steps=1000,
    ...             samples=4, sigma_n=0.05)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import platform
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
from torch import nn

from .. import __version__ as dps_fast_version
from ..noise import philox_normal, seeds_from
from ..operators.base import Operator
from ..operators.poisson import NOISE_MODELS, PoissonNoise
from ..sampler import DPS
from ..schedule import NoiseSchedule
from . import distributed
from .batching import auto_rows, pick_checkpointing, stream_chunks, time_step
from .data import (DONE, IMAGE_EXTENSIONS, MANIFEST, METRICS, TENSORS, DataSource, InputError, item_dir,
                   open_dataset, open_measurements, read_json, remove_stale_tmp, save_png, save_tensors,
                   write_json)
from .metrics import psnr, ssim

logger = logging.getLogger(__name__)

__all__ = ["reconstruct", "ReconstructSummary", "model_geometry", "probe_step", "item_key", "item_seeds",
           "simulate_measurement", "apply_operator", "noise_model", "environment", "run_status", "check_resumable",
           "STD_PNG_GAIN", "MANIFEST_FORMAT"]

#: ``std.png`` shows ``clamp(STD_PNG_GAIN * std, 0, 1)`` (std in the model's [-1, 1] units): white
#: is a standard deviation of 1/8 of the intensity range or more.
STD_PNG_GAIN = 4.0
MANIFEST_FORMAT = 1
_KEY_MASK = (1 << 62) - 1
_MEASUREMENT_STREAM = 2  # philox stream of the simulated measurement noise (the sampler uses 0 and 1)


# ---- seeds and measurements -------------------------------------------------------------------
def item_key(seed: int, name: str, purpose: str = "samples") -> int:
    """A 62-bit key for item ``name``: ``blake2b(seed, name, purpose)``; independent of the
    item's position, the shard and the batch."""
    h = hashlib.blake2b(f"{seed}\x00{name}\x00{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & _KEY_MASK


def item_seeds(seed: int, name: str, samples: int) -> torch.Tensor:
    """The sampler seeds ``[samples]`` (int64) of item ``name``; sample ``j`` is the same for
    any ``samples > j``."""
    return seeds_from(None, samples, seed=item_key(seed, name))


def apply_operator(operator: Operator, x: torch.Tensor) -> torch.Tensor:
    """``A(x)`` without a graph where the operator must run (``operator.placement()``; default
    float64 on the CPU, e.g. a ``Differentiable`` module's own device and dtype), on the CPU."""
    dev, dt = operator.placement() if hasattr(operator, "placement") else (None, None)
    with torch.no_grad():
        y = operator(x.detach().to(device=dev or "cpu", dtype=dt or torch.float64))
    return y.cpu()


def noise_model(noise: Union[str, PoissonNoise], rate: Optional[float] = None) -> Optional[PoissonNoise]:
    """The measurement noise of ``reconstruct``/the CLI: None for "gaussian", a PoissonNoise for
    "poisson" (``rate`` counts per level, default 1.0) or a given PoissonNoise."""
    if isinstance(noise, PoissonNoise):
        if rate is not None:
            raise ValueError(f"rate: give the rate inside the PoissonNoise, got rate={rate!r} as well")
        return noise
    if noise not in NOISE_MODELS:
        raise ValueError(f"noise: expected one of {NOISE_MODELS} or a PoissonNoise, got {noise!r}")
    if noise == "gaussian":
        if rate is not None:
            raise ValueError(f"rate: only used with noise 'poisson', got rate={rate!r} with noise 'gaussian'")
        return None
    return PoissonNoise(1.0 if rate is None else rate)


def simulate_measurement(operator: Operator, x: torch.Tensor, sigma_n: float, seed: int,
                         name: str, noise: Optional[PoissonNoise] = None) -> torch.Tensor:
    """``y = A x + sigma_n * z`` for one item ``x [C, H, W]``, computed in float64 on the CPU (or
    on the operator's placement) with Philox noise keyed by ``(seed, name)``; returns float32 ``[*y]``.

    With ``noise`` (Poisson) ``y = noise.sample(A x)`` instead (``sigma_n`` unused), drawn by
    ``torch.poisson`` with a CPU generator seeded by the same per-item key: reproducible per item,
    independent of batches and shards.
    """
    y = apply_operator(operator, x[None])[0].double()
    key = item_key(seed, name, "measurement")
    if noise is not None:
        return noise.sample(y, torch.Generator().manual_seed(key)).float()
    if sigma_n > 0:
        keys = torch.tensor([key], dtype=torch.int64)
        y = y + sigma_n * philox_normal(keys, y.numel(), 0, _MEASUREMENT_STREAM, torch.float64).view_as(y)
    return y.float()


# ---- identity of a run ------------------------------------------------------------------------
def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")


def _model_id(model: Any) -> str:
    """``Type:hash`` of the model's parameters and buffers (exact bytes)."""
    h = hashlib.blake2b(digest_size=12)
    if isinstance(model, nn.Module):
        for name, t in model.state_dict().items():
            h.update(name.encode())
            _hash_tensor(h, t)
    return f"{type(model).__name__}:{h.hexdigest()}"


def _describe_operator(op: Operator) -> dict[str, Any]:
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


def _schedule_id(schedule: NoiseSchedule) -> dict[str, Any]:
    h = hashlib.blake2b(digest_size=8)
    _hash_tensor(h, schedule.table(torch.float64))
    _hash_tensor(h, schedule.timesteps)
    return {"steps": schedule.num_steps, "hash": h.hexdigest()}


def _fingerprint(settings: dict[str, Any]) -> str:
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


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, device and git commit for the run manifest."""
    import PIL

    return {
        "versions": {
            "dps_fast": dps_fast_version, "torch": torch.__version__, "triton": _version("triton"),
            "python": platform.python_version(), "numpy": np.__version__, "pillow": PIL.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        },
        "device": str(device), "device_name": _device_name(device), "hostname": socket.gethostname(),
        "platform": platform.platform(), "git": _git_commit(),
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _process_start(pid: int) -> Optional[int]:
    """Start time of process ``pid`` in clock ticks since boot (Linux /proc), to tell a live run
    from a reused pid; None where /proc is unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _this_process() -> dict[str, Any]:
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


def _append_metrics(out: Path, rows: list[dict[str, Any]]) -> None:
    """Append one finished item's rows to OUT/metrics.csv in one O_APPEND write (ranks of a
    torchrun job append concurrently; the merge at the end rewrites the file sorted)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in rows:
        writer.writerow([distributed._cell(row.get(c)) for c in distributed.METRIC_COLUMNS])
    fd = os.open(out / METRICS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, buf.getvalue().encode())
    finally:
        os.close(fd)


# ---- the loop ---------------------------------------------------------------------------------
@dataclass
class _Item:
    index: int
    name: str
    path: Optional[str]
    x: Optional[torch.Tensor]  # [C, H, W] clean input, float32
    y: torch.Tensor  # [*y] measurement, float32
    seeds: torch.Tensor  # [S] int64
    parts: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class ReconstructSummary:
    """What :func:`reconstruct` did. On rank 0 ``done``/``skipped``/``missing`` cover all ranks and
    ``status`` is the run's ("complete", or "incomplete" with ``missing`` items); other ranks
    report their shard ("shard-done")."""

    rank: int
    out_dir: Path
    total: int
    done: int
    finished_now: int
    already_done: int
    skipped: list[dict[str, Any]]
    missing: list[str]
    rows: int
    seconds: float
    status: str
    manifest: dict[str, Any]


def model_geometry(model: Any, image_size: Optional[int]) -> tuple[Optional[int], Optional[int]]:
    """(channels, square image size) the model expects, from ADMUNet / diffusers attributes."""
    channels = getattr(model, "in_channels", None)
    size = image_size if image_size is not None else getattr(model, "image_size", None)
    if size is None:
        cfg = getattr(getattr(model, "unet", None), "config", None)
        s = getattr(cfg, "sample_size", None)
        if isinstance(s, (list, tuple)):
            if len(set(s)) != 1:
                raise ValueError(f"model: only square images are supported, the model's sample_size is {s}")
            s = s[0]
        size = s
    return (int(channels) if channels is not None else None), (int(size) if size is not None else None)


def _metric_rows(item: _Item, samples: torch.Tensor, rnorm: torch.Tensor, mean: torch.Tensor,
                 rnorm_mean: float, rank: int) -> list[dict[str, Any]]:
    q_samples: list[Optional[float]] = [None] * samples.shape[0]
    s_samples: list[Optional[float]] = [None] * samples.shape[0]
    q_mean = s_mean = None
    if item.x is not None:
        ref = ((item.x.double() + 1) / 2).clamp(0, 1)
        s01 = ((samples.double() + 1) / 2).clamp(0, 1)
        m01 = ((mean.double() + 1) / 2).clamp(0, 1)
        q_samples = psnr(s01, ref.expand_as(s01)).tolist()
        s_samples = ssim(s01, ref.expand_as(s01)).tolist()
        q_mean, s_mean = float(psnr(m01, ref)), float(ssim(m01, ref))
    common = {"image": item.name, "index": item.index, "seconds": round(item.seconds, 4), "rank": rank}
    rows = [dict(common, sample="mean", seed=None, psnr=q_mean, ssim=s_mean, residual_norm=rnorm_mean)]
    for j in range(samples.shape[0]):
        rows.append(dict(common, sample=j, seed=int(item.seeds[j]), psnr=q_samples[j], ssim=s_samples[j],
                         residual_norm=float(rnorm[j])))
    return rows


def probe_step(dps: DPS, x_shape: tuple[int, ...], y_shape: tuple[int, ...],
               device: torch.device) -> Callable[[int], None]:
    """``f(rows)``: one guided step (forward + VJP + update) of ``dps`` on ``rows`` dummy rows,
    the memory probe of :func:`~dps_fast.reconstruct.batching.auto_rows`.

    The probe runs the network uncompiled (:func:`~dps_fast.models.wrapper.run_uncompiled`): probes
    at several sizes and with checkpointing on and off would otherwise trace a compiled network
    several times; the run itself then compiles once. Eager activations are at least as large as
    compiled ones, so the probed chunk errs on the small side."""
    from ..models.wrapper import run_uncompiled

    def step(rows: int) -> None:
        y0 = torch.zeros((rows,) + tuple(y_shape), device=device)
        x0 = torch.randn((rows,) + tuple(x_shape[1:]), device=device)
        with run_uncompiled():
            dps.step(x0, dps.schedule.num_steps - 1, y0, torch.zeros_like(x0))

    return step


def _write_item(out_dir: Path, item: _Item, operator: Operator, fingerprint: str, rank: int,
                noise: Optional[PoissonNoise] = None) -> dict:
    """All outputs of one finished item; the done marker last. Returns the marker."""
    item.parts.sort(key=lambda p: p[0])
    samples = torch.cat([p[1] for p in item.parts])  # [S, C, H, W]
    rnorm = torch.cat([p[2] for p in item.parts])  # [S]
    mean64 = samples.double().mean(0)
    std64 = samples.double().std(0, unbiased=False) if samples.shape[0] > 1 else torch.zeros_like(mean64)
    r_mean = apply_operator(operator, mean64[None])[0].double() - item.y.double()
    # the samples' residual_norm is the sampler's: ||r||_Lambda under Poisson noise
    rnorm_mean = float((r_mean.abs().square() * (1.0 if noise is None else noise.weight(item.y.double()))).sum().sqrt())
    rows = _metric_rows(item, samples, rnorm, mean64, rnorm_mean, rank)
    folder = item_dir(out_dir, item.name)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(folder)
    files = []
    if item.y.dim() == 3 and item.y.shape[0] in (1, 3) and not item.y.is_complex():
        save_png(folder / "measurement.png", item.y)
        files.append("measurement.png")
    for j in range(samples.shape[0]):
        save_png(folder / f"sample_{j:03d}.png", samples[j])
        files.append(f"sample_{j:03d}.png")
    save_png(folder / "mean.png", mean64.float())
    save_png(folder / "std.png", (STD_PNG_GAIN * std64).clamp(0, 1) * 2 - 1)
    tensors = {"measurement": item.y, "samples": samples, "mean": mean64.float(), "std": std64.float(),
               "residual_norm": rnorm, "seeds": item.seeds.clone(), "name": item.name, "index": item.index}
    if item.x is not None:
        tensors["x"] = item.x
    save_tensors(folder / TENSORS, tensors)
    files += ["mean.png", "std.png", TENSORS]
    marker = {"name": item.name, "index": item.index, "path": item.path, "fingerprint": fingerprint,
              "samples": int(samples.shape[0]), "seconds": round(item.seconds, 4), "rank": rank,
              "finished": _now(), "files": files, "metrics": rows}
    write_json(folder / DONE, marker)
    return marker


def reconstruct(
    inputs: Optional[DataSource], out_dir: Union[str, os.PathLike], model: Any, operator: Operator, *,
    schedule: Optional[NoiseSchedule] = None, steps: int = 1000, sigma_n: float = 0.05, zeta: float = 1.0,
    guidance: str = "normalized", samples: int = 1, seed: int = 0, batch_size: Union[int, str] = "auto",
    device: Union[str, torch.device, None] = None, backend: str = "auto", compile: Optional[bool] = None,
    autocast: Optional[torch.dtype] = None, clip: bool = True, variance: Optional[str] = None,
    resize: bool = False, image_size: Optional[int] = None, measurements: Optional[DataSource] = None,
    progress: bool = True, options: Optional[dict[str, Any]] = None, model_id: Optional[str] = None,
    pad: bool = True, fault: Optional[Callable[[int], None]] = None,
    on_item_done: Optional[Callable[[str], None]] = None,
    noise: Union[str, PoissonNoise] = "gaussian", rate: Optional[float] = None,
) -> ReconstructSummary:
    """Reconstruct every item of a dataset with DPS and write the outputs to ``out_dir``.

    Args:
        inputs: clean images (a folder, a ``.npy``/``.pt`` file ``[N, C, H, W]`` in [-1, 1], a
            tensor, or ``(name, [C, H, W])`` pairs); None when only ``measurements`` are given.
        out_dir: output folder (created); re-running into it resumes.
        model: ``eps(x_t, t)`` network (an ADMUNet or a ``from_diffusers`` model); moved to the
            run's device.
        operator: the forward model ``A``: any :class:`~dps_fast.operators.Operator` (e.g. a user
            module wrapped in ``operators.Differentiable``; it is evaluated on its own device).
        schedule: the sampling schedule (default ``NoiseSchedule.linear(1000).respace(steps)``).
        sigma_n: measurement noise std (simulated measurements and the DPS likelihood).
        zeta, guidance, clip, variance, backend, compile, autocast: passed to :class:`DPS`
            (``clip=True`` is ``clip_x0=(-1, 1)``, as in the DPS code).
        samples: posterior samples ``S`` per item. seed: root of every per-item seed.
        batch_size: images per sampler call, or ``"auto"`` (CUDA: probe the free memory; CPU:
            ``max(1, 8 // S)`` images); halved on out-of-memory errors.
        device: None = ``cuda`` if available; under torchrun ``cuda:LOCAL_RANK``.
        resize: scale + centre-crop inputs of another size (else they are skipped, with a message).
        image_size: the model's image size if it has no ``image_size``/``config.sample_size``.
        measurements: given measurements (folder or ``[N, *y]`` tensor) instead of simulated ones.
        options: extra entries for the manifest (the CLI's arguments).
        model_id: identifies the weights in the settings fingerprint (default: a hash of them).
        pad: pad every call to the chunk size (bit-reproducible samples across resumes/shards).
        fault: ``fault(rows)`` before each sampler call (tests inject a fake OOM).
        on_item_done: called with an item's name after its done marker is written.
        noise, rate: "gaussian" (``sigma_n``) or "poisson" with ``rate`` (default 1.0: the DPS
            code's Poisson noise on [-1, 1] images), or a :class:`~dps_fast.operators.PoissonNoise`;
            used to simulate measurements and by the sampler's likelihood.

    Returns:
        :class:`ReconstructSummary`; ``OUT/metrics.csv`` and ``OUT/manifest.json`` are written by
        rank 0.
    """
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples: expected an int >= 1, got {samples!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    if not (batch_size == "auto" or (isinstance(batch_size, int) and batch_size >= 1)):
        raise ValueError(f"batch_size: expected 'auto' or an int >= 1, got {batch_size!r}")
    if not isinstance(operator, Operator):
        raise TypeError(f"operator: expected a dps_fast.operators.Operator (wrap a callable in "
                        f"operators.Differentiable), got {type(operator).__name__}")
    poisson = noise_model(noise, rate)
    if inputs is None and measurements is None:
        raise ValueError("inputs: expected clean inputs, measurements, or both; got neither")
    if not (isinstance(sigma_n, (int, float)) and np.isfinite(sigma_n) and sigma_n >= 0):
        raise ValueError(f"sigma_n: expected a finite standard deviation >= 0, got {sigma_n!r}")
    t_start = time.perf_counter()
    started = _now()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {str(out)!r} is a file; expected a folder (created if missing)")

    # Everything that can fail on bad settings happens before the process group and any output.
    channels, size = model_geometry(model, image_size)
    dataset = open_dataset(inputs, channels, size, resize) if inputs is not None else None
    given = open_measurements(measurements, channels) if measurements is not None else None
    names = dataset.names if dataset is not None else given.names
    paths = dataset.paths if dataset is not None else [None] * len(names)
    if not names:
        src = inputs if dataset is not None else measurements
        where = repr(str(src)) if isinstance(src, (str, os.PathLike)) else "the given data"
        logger.warning("no inputs found in %s (images: %s at the folder's top level; or a tensor file); "
                       "nothing to do", where, "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS))
    if channels is not None and size is not None:
        x_shape = (1, channels, size, size)
        y_shape = tuple(apply_operator(operator, torch.zeros(x_shape)).shape[1:])
    else:
        x_shape = y_shape = None
    if schedule is None:
        schedule = NoiseSchedule.linear(1000).respace(steps)
    settings = {
        "model": model_id or _model_id(model), "operator": _describe_operator(operator),
        "schedule": _schedule_id(schedule), "sigma_n": float(sigma_n), "zeta": zeta, "guidance": guidance,
        "samples": samples, "seed": seed, "clip": bool(clip), "variance": variance, "resize": bool(resize),
        "image_size": size, "channels": channels, "autocast": str(autocast) if autocast else None,
        "measurements": "given" if given is not None else "simulated",
    }
    if poisson is not None:  # only then: Gaussian runs keep the fingerprints of earlier versions
        settings["noise"] = repr(poisson)
    fingerprint = _fingerprint(settings)
    previous = read_json(out / MANIFEST)
    check_resumable(previous, settings, fingerprint, out)

    ctx = distributed.init(device)
    bar = None
    manifest_written = False
    try:
        dev = ctx.device
        if isinstance(model, nn.Module):
            model = model.to(dev).eval()
        dps = DPS(model, schedule, operator, zeta=zeta, sigma_n=sigma_n, guidance=guidance,
                  clip_x0=(-1.0, 1.0) if clip else None, variance=variance, backend=backend,
                  compile=compile, autocast=autocast, noise=poisson if poisson is not None else "gaussian")
        done_before = {r["name"] for r in distributed.collect_done(out, fingerprint)}
        pending = [i for i, n in enumerate(names) if n not in done_before]
        # Every rank has listed the pending work before anyone writes a done marker.
        distributed.barrier(ctx)
        env = environment(dev)
        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT, "status": "running", "fingerprint": fingerprint, "settings": settings,
            "options": options or {}, "environment": env, "world_size": ctx.world_size,
            "started": started, "inputs": {"total": len(names)}, "process": _this_process(),
        }
        if previous is not None:
            manifest["resumed_from"] = run_status(previous)
            if manifest["resumed_from"] == "interrupted":
                logger.info("resuming an interrupted run in %s (%d of %d inputs done)", out, len(done_before),
                            len(names))
        if previous is not None and isinstance(previous.get("batch"), dict):
            manifest["batch"] = previous["batch"]
        mine = pending[ctx.rank::ctx.world_size]

        # ---- chunk size -----------------------------------------------------------------
        total_rows = max(1, len(names) * samples)
        if batch_size != "auto":
            rows, batch_info = batch_size * samples, {"mode": "fixed", "rows": batch_size * samples}
        elif dev.type == "cuda" and (manifest.get("batch") or {}).get("mode") == "probe":
            rows = int(manifest["batch"]["rows"])  # resume with the chunk size of the first run
            batch_info = dict(manifest["batch"], reused=True)
            if "checkpointing" in batch_info and hasattr(model, "set_checkpointing"):
                model.set_checkpointing(bool(batch_info["checkpointing"]))
        else:
            if dev.type == "cuda" and (x_shape is None or y_shape is None):
                raise ValueError("batch_size: 'auto' needs the model's image size; pass image_size= or a fixed batch")
            probe = probe_step(dps, x_shape, y_shape, dev) if x_shape is not None else (lambda r: None)
            ckpt_info: dict[str, Any] = {}
            if dev.type == "cuda" and hasattr(model, "set_checkpointing"):
                measured: dict[bool, tuple[int, dict[str, Any]]] = {}

                def measure(flag: bool) -> tuple[int, float]:
                    model.set_checkpointing(flag)
                    r, info = auto_rows(probe, dev, samples, max_rows=total_rows)
                    measured[flag] = (r, info)
                    return r, time_step(probe, r, dev)

                use_ckpt, ckpt_info = pick_checkpointing(measure)
                # Every rank follows rank 0's choice (identical GPUs measure alike).
                use_ckpt = bool(distributed.all_gather_object(ctx, use_ckpt)[0])
                model.set_checkpointing(use_ckpt)
                rows, batch_info = measured[use_ckpt]
                ckpt_info["checkpointing"] = use_ckpt
            else:
                rows, batch_info = auto_rows(probe, dev, samples, max_rows=total_rows)
            # One chunk size for every rank: same shapes, same floating-point results.
            rows = min(distributed.all_gather_object(ctx, rows))
            batch_info = dict(batch_info, rows=rows, **ckpt_info)
        manifest["batch"] = batch_info
        if ctx.is_main:  # written before any item, so an interrupted run leaves its settings (and chunk size)
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / MANIFEST, manifest)
            manifest_written = True
            distributed.merge(out, fingerprint)  # metrics.csv of earlier runs' items; grows as items finish
        distributed.barrier(ctx)  # every rank appends to that file only after it exists

        # ---- stream the shard -----------------------------------------------------------
        skipped: list[dict[str, Any]] = []

        shapes: dict[tuple[int, ...], tuple[int, ...]] = {}

        def out_shape(xs: tuple[int, ...]) -> tuple[int, ...]:
            if xs not in shapes:
                shapes[xs] = tuple(apply_operator(operator, torch.zeros((1,) + xs)).shape[1:])
            return shapes[xs]

        def items() -> Iterator[_Item]:
            for i in mine:
                name = names[i]
                try:
                    x = dataset.load(i) if dataset is not None else None
                    if given is not None:
                        y = given.load(name, i)
                    else:
                        y = simulate_measurement(operator, x, sigma_n, seed, name, poisson)
                    want = out_shape(tuple(x.shape)) if x is not None else y_shape
                    if want is not None and tuple(y.shape) != want:
                        raise InputError(f"{name}: measurement of shape {tuple(y.shape)}, expected {want} "
                                         f"for {operator!r}")
                except InputError as exc:  # logged once here; the CLI only counts them
                    logger.warning("skipping %s", exc)
                    skipped.append({"name": name, "path": paths[i], "reason": str(exc)})
                    if bar is not None:
                        bar.update(1)
                    continue
                yield _Item(i, name, paths[i], x, y, item_seeds(seed, name, samples))

        def run(jobs: list) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
            count = jobs[0].count
            y = torch.stack([j.key.y for j in jobs]).to(dev)
            seeds = torch.stack([j.key.seeds[j.start:j.stop] for j in jobs])
            t0 = time.perf_counter()
            res = dps.sample(y, num_samples=count, seeds=seeds)
            smp = res.samples.detach().float().cpu()
            rn = res.residual_norm.detach().double().cpu()
            dt = time.perf_counter() - t0
            return [(smp[b], rn[b], dt) for b in range(len(jobs))]

        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), unit="img", desc="reconstruct", dynamic_ncols=True,
                   disable=not (progress and ctx.is_main))
        finished = 0
        t_loop = time.perf_counter()
        rows_now = rows
        for jobs, results, rows_now in stream_chunks(items(), samples, rows, run, pad=pad, fault=fault):
            real = sum(j.count for j in jobs)
            for job, (smp, rn, dt) in zip(jobs, results):
                item = job.key
                item.parts.append((job.start, smp, rn))
                item.seconds += dt * job.count / real
                if job.stop == samples:
                    marker = _write_item(out, item, operator, fingerprint, ctx.rank, poisson)
                    _append_metrics(out, marker["metrics"])
                    item.parts.clear()
                    finished += 1
                    bar.update(1)
                    rate = finished * samples / max(time.perf_counter() - t_loop, 1e-9)
                    bar.set_postfix(samples_per_s=f"{rate:.3g}", refresh=False)
                    if on_item_done is not None:
                        on_item_done(item.name)
        bar.close()

        # ---- merge (rank 0) ---------------------------------------------------------------
        local = {"rank": ctx.rank, "device": str(dev), "device_name": env["device_name"],
                 "hostname": env["hostname"], "rows": rows_now, "finished": finished, "skipped": skipped,
                 "seconds": round(time.perf_counter() - t_start, 3)}
        ranks = distributed.all_gather_object(ctx, local)
        done_names: set[str] = set()
        skipped_all = [s for r in ranks for s in r["skipped"]]
        missing: list[str] = []
        if ctx.is_main:
            records = distributed.merge(out, fingerprint)
            done_names = {r["name"] for r in records}
            skipped_all = [s for s in skipped_all if s["name"] not in done_names]
            skipped_names = {s["name"] for s in skipped_all}
            missing = [n for n in names if n not in done_names and n not in skipped_names]
            status = "complete" if not missing else "incomplete"
            manifest.update(
                status=status, finished=_now(), seconds=round(time.perf_counter() - t_start, 3),
                ranks=[{k: v for k, v in r.items() if k != "skipped"} for r in ranks],
                inputs={"total": len(names), "done": len(done_names), "finished_now": sum(r["finished"] for r in ranks),
                        "already_done": len(done_before), "skipped": skipped_all, "missing": missing},
                metrics=METRICS)
            write_json(out / MANIFEST, manifest)
        else:
            status = "shard-done"  # rank 0 has the run's status
        manifest_written = False  # final
        return ReconstructSummary(
            rank=ctx.rank, out_dir=out, total=len(names), done=len(done_names) if ctx.is_main else finished + len(done_before),
            finished_now=sum(r["finished"] for r in ranks), already_done=len(done_before), skipped=skipped_all,
            missing=missing, rows=rows_now, seconds=time.perf_counter() - t_start, status=status, manifest=manifest)
    except BaseException as exc:
        if manifest_written:  # rank 0 only: say why the run stopped (a SIGKILL cannot; see run_status)
            from ..divergence import NonFiniteError

            stopped = ("interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit))
                       else "diverged" if isinstance(exc, NonFiniteError) else "failed")
            manifest.update(status=stopped, stopped=_now(), error=f"{type(exc).__name__}: {exc}"[:500])
            try:
                write_json(out / MANIFEST, manifest)
            except OSError:
                logger.warning("could not record the status %r in %s", stopped, out / MANIFEST)
        raise
    finally:
        if bar is not None:
            bar.close()
        distributed.teardown(ctx)
