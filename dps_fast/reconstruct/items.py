"""One item of a ``reconstruct`` run: its seeds and simulated measurement, and its outputs
(the PNGs, ``tensors.pt``, the metric rows and the done marker written last).

Example:
    >>> item_seeds(0, "face.png", 3)[:2].equal(item_seeds(0, "face.png", 2))
    True
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..noise import STREAM_MEASUREMENT, philox_normal, seeds_from
from ..operators.base import Operator
from ..operators.poisson import NOISE_MODELS, PoissonNoise
from . import distributed
from .data import (DONE, METRICS, TENSORS, InputError, item_dir, remove_stale_tmp, save_png, save_tensors,
                   write_json)
from .manifest import now
from .metrics import psnr, ssim

__all__ = ["Item", "ItemSource", "item_key", "item_seeds", "apply_operator", "noise_model", "simulate_measurement", "write_item",
           "append_metrics", "metric_rows", "STD_PNG_GAIN", "KEY_MASK"]

#: ``std.png`` shows ``clamp(STD_PNG_GAIN * std, 0, 1)`` (std in the model's [-1, 1] units): white
#: is a standard deviation of 1/8 of the intensity range or more.
STD_PNG_GAIN = 4.0
KEY_MASK = (1 << 62) - 1


def item_key(seed: int, name: str, purpose: str = "samples") -> int:
    """A 62-bit key for item ``name``: ``blake2b(seed, name, purpose)``; independent of the
    item's position, the shard and the batch."""
    h = hashlib.blake2b(f"{seed}\x00{name}\x00{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & KEY_MASK


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
        y = y + sigma_n * philox_normal(keys, y.numel(), 0, STREAM_MEASUREMENT, torch.float64).view_as(y)
    return y.float()


@dataclass
class Item:
    index: int
    name: str
    path: Optional[str]
    x: Optional[torch.Tensor]  # [C, H, W] clean input, float32
    y: torch.Tensor  # [*y] measurement, float32
    seeds: torch.Tensor  # [S] int64
    parts: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    seconds: float = 0.0


class ItemSource:
    """Loads item ``i`` of a run: its clean input (if any), its measurement (given, or simulated by
    :func:`simulate_measurement`) checked against the shape ``A`` gives, and its seeds.

    ``dataset``/``given``: the opened inputs and measurements (:mod:`dps_fast.reconstruct.data`),
    either may be None; ``y_shape``: the measurement shape of the model's images (None: unknown).
    """

    def __init__(self, dataset: Any, given: Any, operator: Operator, sigma_n: float, seed: int, samples: int,
                 noise: Optional[PoissonNoise], y_shape: Optional[tuple[int, ...]]) -> None:
        self.dataset, self.given, self.operator = dataset, given, operator
        self.sigma_n, self.seed, self.samples, self.noise, self.y_shape = sigma_n, seed, samples, noise, y_shape
        self.names: list[str] = dataset.names if dataset is not None else given.names
        self.paths: list[Optional[str]] = dataset.paths if dataset is not None else [None] * len(self.names)
        self._shapes: dict[tuple[int, ...], tuple[int, ...]] = {}

    def out_shape(self, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The measurement shape ``A`` gives for one input ``[C, H, W]`` (cached per shape)."""
        if x_shape not in self._shapes:
            self._shapes[x_shape] = tuple(apply_operator(self.operator, torch.zeros((1,) + x_shape)).shape[1:])
        return self._shapes[x_shape]

    def load(self, i: int) -> Item:
        """Item ``i``; an :class:`~dps_fast.reconstruct.data.InputError` when it cannot be used."""
        name = self.names[i]
        x = self.dataset.load(i) if self.dataset is not None else None
        if self.given is not None:
            y = self.given.load(name, i)
        else:
            y = simulate_measurement(self.operator, x, self.sigma_n, self.seed, name, self.noise)
        want = self.out_shape(tuple(x.shape)) if x is not None else self.y_shape
        if want is not None and tuple(y.shape) != want:
            raise InputError(f"{name}: measurement of shape {tuple(y.shape)}, expected {want} for {self.operator!r}")
        return Item(i, name, self.paths[i], x, y, item_seeds(self.seed, name, self.samples))


def metric_rows(item: Item, samples: torch.Tensor, rnorm: torch.Tensor, mean: torch.Tensor,
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


def append_metrics(out: Path, rows: list[dict[str, Any]]) -> None:
    """Append one finished item's rows to OUT/metrics.csv in one O_APPEND write (ranks of a
    torchrun job append concurrently; the merge at the end rewrites the file sorted)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in rows:
        writer.writerow([distributed.cell(row.get(c)) for c in distributed.METRIC_COLUMNS])
    fd = os.open(out / METRICS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, buf.getvalue().encode())
    finally:
        os.close(fd)


# ---- the loop ---------------------------------------------------------------------------------
def write_item(out_dir: Path, item: Item, operator: Operator, fingerprint: str, rank: int,
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
    rows = metric_rows(item, samples, rnorm, mean64, rnorm_mean, rank)
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
              "finished": now(), "files": files, "metrics": rows}
    write_json(folder / DONE, marker)
    return marker
