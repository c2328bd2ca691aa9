"""The reconstruction loop behind ``dps-fast reconstruct`` and :func:`reconstruct`.

For every input item ``x`` (or given measurement ``y``) it draws ``S`` posterior samples with
one of the registered methods (:mod:`dps_fast.methods.registry`: DPS by default, MCG, PiGDM,
DDRM) and writes, under ``OUT/items/NAME/``: ``measurement.png``,
``sample_000.png`` ..., ``mean.png``, ``std.png``, ``tensors.pt`` (the float tensors) and, last,
``done.json`` (the item's metrics). Each finished item's rows are appended to ``OUT/metrics.csv``
at once; at the end ``OUT/metrics.csv`` is rewritten, sorted, from the done markers (as
``--merge-only`` does) and ``OUT/manifest.json`` gets the run's status. The ``seconds`` column is
the item's share of the wall time of the sampler calls it was part of (a batched call's time
split evenly over the samples it ran), not a per-image latency.

The pieces live by responsibility: :mod:`~dps_fast.reconstruct.manifest` (settings fingerprint,
environment, status), :mod:`~dps_fast.reconstruct.items` (item keys, seeds, simulated
measurements, an item's outputs), :mod:`~dps_fast.reconstruct.batching` (chunk size, streaming),
:mod:`~dps_fast.reconstruct.distributed` (torchrun, merging); this module is the run loop.

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

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
from torch import nn

from ..cli_options import model_geometry
from ..engine import Engine
from ..methods.registry import MethodSpec, get_method
from ..operators.base import Operator
from ..operators.poisson import PoissonNoise
from ..schedule import NoiseSchedule
from . import distributed
from . import manifest as manifest_mod
from .batching import auto_rows, pick_checkpointing, stream_chunks, time_step
from .data import (IMAGE_EXTENSIONS, MANIFEST, METRICS, DataSource, InputError, open_dataset, open_measurements,
                   read_json, write_json)
from .items import (STD_PNG_GAIN, Item, ItemSource, append_metrics, apply_operator, item_key, item_seeds,
                    noise_model, simulate_measurement, write_item)
from .manifest import (MANIFEST_FORMAT, check_resumable, describe_operator, environment, now, run_status,
                       schedule_id, this_process)

logger = logging.getLogger(__name__)

# item_key ... run_status live in .items and .manifest; listed here too for callers of this module
__all__ = ["reconstruct", "ReconstructSummary", "NothingReconstructed", "sampler_settings", "choose_rows",
           "run_settings", "load_items", "sampler_call", "finish_run", "probe_step", "model_geometry", "item_key", "item_seeds", "simulate_measurement", "apply_operator",
           "noise_model", "environment", "run_status", "check_resumable", "STD_PNG_GAIN", "MANIFEST_FORMAT"]


@dataclass
class ReconstructSummary:
    """What :func:`reconstruct` did. On rank 0 ``done``/``skipped``/``missing`` cover all ranks and
    ``status`` is the run's: "complete", "incomplete" (``missing`` items), or "nothing-done" (no
    input was reconstructed, now or before: all were skipped, or there were none); other ranks
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


class NothingReconstructed(RuntimeError):
    """No input was reconstructed (every one was skipped, or none was found); ``summary`` says
    why (its ``skipped`` list) and the manifest's status is "nothing-done"."""

    def __init__(self, summary: "ReconstructSummary") -> None:
        reasons = "; ".join(s["reason"] for s in summary.skipped[:3])
        more = f" (and {len(summary.skipped) - 3} more)" if len(summary.skipped) > 3 else ""
        what = (f"all {len(summary.skipped)} inputs were skipped: {reasons}{more}" if summary.skipped
                else "no inputs were found")
        super().__init__(f"nothing was reconstructed: {what}")
        self.summary = summary


def sampler_settings(method: str, zeta: Optional[float], guidance: Optional[str],
                     method_options: Optional[dict[str, Any]], clip: bool, variance: Optional[str],
                     noise: Optional[PoissonNoise]) -> tuple[MethodSpec, dict[str, Any]]:
    """The registered method and the keywords of its sampler (its hyperparameter, guidance,
    clip, variance, noise and ``method_options``), checked before any work starts."""
    spec = get_method(method)
    kw: dict[str, Any] = dict(method_options or {})
    if not isinstance(method_options, (dict, type(None))):
        raise TypeError(f"method_options: expected a dict or None, got {type(method_options).__name__}")
    unused = spec.cls.unused_options
    if spec.param == "zeta":
        kw["zeta"] = spec.default if zeta is None else zeta
    elif zeta is not None:
        raise ValueError(f"zeta: --method {spec.key} has no guidance scale (its setting is {spec.param}), got zeta={zeta!r}")
    if spec.guided:
        kw["guidance"] = guidance or "normalized"
    elif guidance is not None:
        raise ValueError(f"guidance: only dps and mcg take a guidance mode, got guidance={guidance!r} with {spec.key}")
    if "clip_x0" not in unused:
        kw["clip_x0"] = (-1.0, 1.0) if clip else None
    if variance is not None:
        if "variance" in unused:
            raise ValueError(f"variance: {spec.key} does not use the reverse-step variance, got {variance!r}")
        kw["variance"] = variance
    if noise is not None:
        if "noise" in unused:
            raise ValueError(f"noise: {spec.key} supports Gaussian measurement noise only, got {noise!r}")
        kw["noise"] = noise
    return spec, kw


def choose_rows(sampler: Engine, model: Any, previous: Optional[dict[str, Any]], batch_size: Union[int, str],
                samples: int, items: int, x_shape: Optional[tuple[int, ...]], y_shape: Optional[tuple[int, ...]],
                ctx: distributed.DistContext) -> tuple[int, dict[str, Any]]:
    """The chunk size (sampler rows per call) and its record for the manifest: ``batch_size``
    images, else (``"auto"``) the chunk of the run being resumed, else the memory probe's choice
    (with or without activation checkpointing, whichever is faster), agreed by all ranks."""
    dev = ctx.device
    total_rows = max(1, items * samples)
    if batch_size != "auto":
        return batch_size * samples, {"mode": "fixed", "rows": batch_size * samples}
    if dev.type == "cuda" and (previous or {}).get("mode") == "probe":
        if "checkpointing" in previous and hasattr(model, "set_checkpointing"):
            model.set_checkpointing(bool(previous["checkpointing"]))
        return int(previous["rows"]), dict(previous, reused=True)  # resume with the first run's chunk
    if dev.type == "cuda" and (x_shape is None or y_shape is None):
        raise ValueError("batch_size: 'auto' needs the model's image size; pass image_size= or a fixed batch")
    probe = probe_step(sampler, x_shape, y_shape, dev) if x_shape is not None else (lambda r: None)
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
    return rows, dict(batch_info, rows=rows, **ckpt_info)


def probe_step(dps: Engine, x_shape: tuple[int, ...], y_shape: tuple[int, ...],
               device: torch.device) -> Callable[[int], None]:
    """``f(rows)``: one step (forward, VJP if the method has one, update) of the sampler ``dps`` on ``rows`` dummy rows,
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


def run_settings(model_id: str, operator: Operator, schedule: NoiseSchedule, sigma_n: float, spec: MethodSpec,
                 method_kw: dict[str, Any], *, noise: Optional[PoissonNoise], **fields: Any) -> dict[str, Any]:
    """The result-affecting settings of a run, whose fingerprint identifies it (``fields``: the
    plain ones: samples, seed, clip, ...). Keys appear only when they differ from the defaults of
    earlier versions (Poisson noise, a method other than DPS), so those runs keep their fingerprints."""
    settings = {
        "model": model_id, "operator": describe_operator(operator), "schedule": schedule_id(schedule),
        "sigma_n": float(sigma_n), "zeta": method_kw.get("zeta"), "guidance": method_kw.get("guidance"),
    }
    for k in ("samples", "seed", "clip", "variance", "resize", "image_size", "channels", "autocast", "measurements"):
        settings[k] = fields[k]
    if noise is not None:
        settings["noise"] = repr(noise)
    if spec.key != "dps":
        settings["method"] = dict({"name": spec.key}, **{k: v for k, v in method_kw.items()
                                                         if k not in ("zeta", "guidance", "clip_x0", "variance")})
    return settings


def load_items(source: ItemSource, indices: list[int], skipped: list[dict[str, Any]], bar: Any) -> Iterator[Item]:
    """The items at ``indices``; one that cannot be used is logged, appended to ``skipped`` and
    counted on the progress ``bar``."""
    for i in indices:
        try:
            yield source.load(i)
        except InputError as exc:  # logged once here; the CLI only counts them
            logger.warning("skipping %s", exc)
            skipped.append({"name": source.names[i], "path": source.paths[i], "reason": str(exc)})
            bar.update(1)


def sampler_call(sampler: Engine, device: torch.device, progress: bool
                 ) -> Callable[[list], list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """``run(jobs)`` for :func:`~dps_fast.reconstruct.batching.stream_chunks`: one ``sample`` call
    over the jobs' measurements and seeds; per job ``(samples [S, *x], residual norms [S], seconds)``."""

    def run(jobs: list) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        count = jobs[0].count
        y = torch.stack([j.key.y for j in jobs]).to(device)
        seeds = torch.stack([j.key.seeds[j.start:j.stop] for j in jobs])
        t0 = time.perf_counter()
        res = sampler.sample(y, num_samples=count, seeds=seeds, progress=progress)
        smp = res.samples.detach().float().cpu()
        rn = res.residual_norm.detach().double().cpu()
        dt = time.perf_counter() - t0
        return [(smp[b], rn[b], dt) for b in range(len(jobs))]

    return run


def finish_run(ctx: distributed.DistContext, out: Path, fingerprint: str, manifest: dict[str, Any],
               names: list[str], ranks: list[dict[str, Any]], done_before: set[str],
               t_start: float) -> "ReconstructSummary":
    """Rank 0 merges the ranks' items into metrics.csv and writes the final manifest; every rank
    returns its :class:`ReconstructSummary` (``ranks``: the all-gathered per-rank records)."""
    done_names: set[str] = set()
    skipped_all = [s for r in ranks for s in r["skipped"]]
    missing: list[str] = []
    mine = next(r for r in ranks if r["rank"] == ctx.rank)
    if ctx.is_main:
        records = distributed.merge(out, fingerprint)
        done_names = {r["name"] for r in records}
        skipped_all = [s for s in skipped_all if s["name"] not in done_names]
        skipped_names = {s["name"] for s in skipped_all}
        missing = [n for n in names if n not in done_names and n not in skipped_names]
        status = "complete" if not missing else "incomplete"
        if not done_names:
            status = "nothing-done"
        manifest.update(
            status=status, finished=now(), seconds=round(time.perf_counter() - t_start, 3),
            ranks=[{k: v for k, v in r.items() if k != "skipped"} for r in ranks],
            inputs={"total": len(names), "done": len(done_names), "finished_now": sum(r["finished"] for r in ranks),
                    "already_done": len(done_before), "skipped": skipped_all, "missing": missing},
            metrics=METRICS)
        write_json(out / MANIFEST, manifest)
    else:
        status = "shard-done"  # rank 0 has the run's status
    return ReconstructSummary(
        rank=ctx.rank, out_dir=out, total=len(names),
        done=len(done_names) if ctx.is_main else mine["finished"] + len(done_before),
        finished_now=sum(r["finished"] for r in ranks), already_done=len(done_before), skipped=skipped_all,
        missing=missing, rows=mine["rows"], seconds=time.perf_counter() - t_start, status=status, manifest=manifest)


def reconstruct(
    inputs: Optional[DataSource], out_dir: Union[str, os.PathLike], model: Any, operator: Operator, *,
    schedule: Optional[NoiseSchedule] = None, steps: int = 1000, sigma_n: float = 0.05,
    method: str = "dps", zeta: Optional[float] = None, guidance: Optional[str] = None,
    method_options: Optional[dict[str, Any]] = None, samples: int = 1, seed: int = 0, batch_size: Union[int, str] = "auto",
    device: Union[str, torch.device, None] = None, backend: str = "auto", compile: Optional[bool] = None,
    autocast: Optional[torch.dtype] = None, clip: bool = True, variance: Optional[str] = None,
    resize: bool = False, image_size: Optional[int] = None, measurements: Optional[DataSource] = None,
    progress: bool = True, options: Optional[dict[str, Any]] = None, model_id: Optional[str] = None,
    pad: bool = True, fault: Optional[Callable[[int], None]] = None,
    on_item_done: Optional[Callable[[str], None]] = None,
    noise: Union[str, PoissonNoise] = "gaussian", rate: Optional[float] = None, allow_nothing: bool = False,
) -> ReconstructSummary:
    """Reconstruct every item of a dataset with a sampling method and write the outputs to ``out_dir``.

    Args:
        inputs: clean images (a folder, a ``.npy``/``.pt`` file ``[N, C, H, W]`` in [-1, 1], a
            tensor, or ``(name, [C, H, W])`` pairs); None when only ``measurements`` are given.
        out_dir: output folder (created); re-running into it resumes.
        model: ``eps(x_t, t)`` network (an ADMUNet or a ``from_diffusers`` model); moved to the
            run's device.
        operator: the forward model ``A``: any :class:`~dps_fast.operators.Operator` (e.g. a user
            module wrapped in ``operators.Differentiable``; it is evaluated on its own device).
        schedule: the sampling schedule (default ``NoiseSchedule.linear(1000).respace(steps)``).
        sigma_n: measurement noise std (simulated measurements and the sampler's likelihood).
        method: a registered method (:mod:`dps_fast.methods.registry`): "dps" (default), "mcg",
            "pigdm" or "ddrm".
        zeta: the guidance scale of dps, mcg and pigdm (default: the registry's, 1.0); for ddrm
            its hyperparameter eta (default 0.85) goes in ``method_options``.
        guidance: dps and mcg: "normalized" (default, the DPS code) or "squared".
        method_options: the method's other keywords, e.g. ``{"eta": 0.5}`` (ddrm) or
            ``{"weighting": "public"}`` (pigdm).
        clip, variance, backend, compile, autocast: passed to the method's sampler
            (``clip=True`` is ``clip_x0=(-1, 1)``, as in the DPS code; methods that do not use
            clipping or the variance (ddrm) ignore ``clip`` and refuse ``variance``).
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
            used to simulate measurements and by the sampler's likelihood (dps only).
        allow_nothing: return the summary of a run that reconstructed nothing instead of raising.

    Returns:
        :class:`ReconstructSummary`; ``OUT/metrics.csv`` and ``OUT/manifest.json`` are written by
        rank 0. When no input was reconstructed (all skipped, or none found) the status is
        "nothing-done" and :class:`NothingReconstructed` is raised after the manifest is written
        (pass ``allow_nothing=True`` to get the summary instead).
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
    spec, method_kw = sampler_settings(method, zeta, guidance, method_options, clip, variance, poisson)
    spec.cls.check_operator(operator)
    if inputs is None and measurements is None:
        raise ValueError("inputs: expected clean inputs, measurements, or both; got neither")
    if not (isinstance(sigma_n, (int, float)) and np.isfinite(sigma_n) and sigma_n >= 0):
        raise ValueError(f"sigma_n: expected a finite standard deviation >= 0, got {sigma_n!r}")
    t_start = time.perf_counter()
    started = now()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {str(out)!r} is a file; expected a folder (created if missing)")

    # Everything that can fail on bad settings happens before the process group and any output.
    channels, size = model_geometry(model, image_size)
    dataset = open_dataset(inputs, channels, size, resize) if inputs is not None else None
    given = open_measurements(measurements, channels) if measurements is not None else None
    if channels is not None and size is not None:
        x_shape = (1, channels, size, size)
        y_shape = tuple(apply_operator(operator, torch.zeros(x_shape)).shape[1:])
    else:
        x_shape = y_shape = None
    source = ItemSource(dataset, given, operator, sigma_n, seed, samples, poisson, y_shape)
    names = source.names
    if not names:
        src = inputs if dataset is not None else measurements
        where = repr(str(src)) if isinstance(src, (str, os.PathLike)) else "the given data"
        logger.warning("no inputs found in %s (images: %s at the folder's top level; or a tensor file); "
                       "nothing to do", where, "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS))
    if schedule is None:
        schedule = NoiseSchedule.linear(1000).respace(steps)
    settings = run_settings(
        model_id or manifest_mod.model_id(model), operator, schedule, sigma_n, spec, method_kw, samples=samples,
        seed=seed, clip=bool(clip), variance=variance, resize=bool(resize), image_size=size, channels=channels,
        autocast=str(autocast) if autocast else None, measurements="given" if given is not None else "simulated",
        noise=poisson)
    fingerprint = manifest_mod.fingerprint(settings)
    previous = read_json(out / MANIFEST)
    check_resumable(previous, settings, fingerprint, out)

    ctx = distributed.init(device)
    bar = None
    manifest_written = False
    try:
        dev = ctx.device
        if isinstance(model, nn.Module):
            model = model.to(dev).eval()
        sampler = spec.cls(model, schedule, operator, sigma_n=sigma_n, backend=backend, compile=compile,
                           autocast=autocast, **method_kw)
        done_before = {r["name"] for r in distributed.collect_done(out, fingerprint)}
        pending = [i for i, n in enumerate(names) if n not in done_before]
        # Every rank has listed the pending work before anyone writes a done marker.
        distributed.barrier(ctx)
        env = environment(dev)
        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT, "status": "running", "fingerprint": fingerprint, "settings": settings,
            "options": options or {}, "environment": env, "world_size": ctx.world_size,
            "started": started, "inputs": {"total": len(names)}, "process": this_process(),
        }
        if previous is not None:
            manifest["resumed_from"] = run_status(previous)
            if manifest["resumed_from"] == "interrupted":
                logger.info("resuming an interrupted run in %s (%d of %d inputs done)", out, len(done_before),
                            len(names))
        if previous is not None and isinstance(previous.get("batch"), dict):
            manifest["batch"] = previous["batch"]
        mine = pending[ctx.rank::ctx.world_size]

        rows, batch_info = choose_rows(sampler, model, manifest.get("batch"), batch_size, samples, len(names),
                                       x_shape, y_shape, ctx)
        manifest["batch"] = batch_info
        if ctx.is_main:  # written before any item, so an interrupted run leaves its settings (and chunk size)
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / MANIFEST, manifest)
            manifest_written = True
            distributed.merge(out, fingerprint)  # metrics.csv of earlier runs' items; grows as items finish
        distributed.barrier(ctx)  # every rank appends to that file only after it exists

        # ---- stream the shard -----------------------------------------------------------
        from tqdm.auto import tqdm

        skipped: list[dict[str, Any]] = []
        show_steps = bool(progress and ctx.is_main)  # a second bar: the steps of the batch in flight
        bar = tqdm(total=len(mine), unit="img", desc="reconstruct", dynamic_ncols=True, disable=not show_steps)
        items = load_items(source, mine, skipped, bar)
        run = sampler_call(sampler, dev, show_steps)
        finished = 0
        t_loop = time.perf_counter()
        rows_now = rows
        for jobs, results, rows_now in stream_chunks(items, samples, rows, run, pad=pad, fault=fault):
            real = sum(j.count for j in jobs)
            for job, (smp, rn, dt) in zip(jobs, results):
                item = job.key
                item.parts.append((job.start, smp, rn))
                item.seconds += dt * job.count / real
                if job.stop == samples:
                    marker = write_item(out, item, operator, fingerprint, ctx.rank, poisson)
                    append_metrics(out, marker["metrics"])
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
        summary = finish_run(ctx, out, fingerprint, manifest, names, distributed.all_gather_object(ctx, local),
                             done_before, t_start)
        manifest_written = False  # final
    except BaseException as exc:
        if manifest_written:  # rank 0 only: say why the run stopped (a SIGKILL cannot; see run_status)
            from ..divergence import NonFiniteError

            stopped = ("interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit))
                       else "diverged" if isinstance(exc, NonFiniteError) else "failed")
            manifest.update(status=stopped, stopped=now(), error=f"{type(exc).__name__}: {exc}"[:500])
            try:
                write_json(out / MANIFEST, manifest)
            except OSError:
                logger.warning("could not record the status %r in %s", stopped, out / MANIFEST)
        raise
    finally:
        if bar is not None:
            bar.close()
        distributed.teardown(ctx)
    if summary.status == "nothing-done" and not allow_nothing:
        raise NothingReconstructed(summary)
    return summary
