"""``dps-fast dps2022``: their ``sample_condition.py`` on dps_fast, batched and resumable.

    dps-fast dps2022 --model_config M --diffusion_config D --task_config T [--gpu N] [--save_dir S]

reads their three YAML files as their script does and writes, under ``S/<operator name>/``,
their folders ``input/`` (the measurement), ``label/`` (the clean image), ``recon/`` (the
sample) with ``NNNNN.png`` per image (their ``clear_color`` + ``plt.imsave`` pixels) and
``progress/NNNNN/x_IIII.png`` every tenth step (their script overwrote ``progress/`` with each
image), plus ``manifest.json``, ``metrics.csv`` (PSNR/SSIM of the sample against the label,
residual norm, seconds) and ``items/NNNNN/`` (tensors and the done marker).

Their script handles one image at a time; here images are batched (per-sample norms keep each
image's result the same), ``--batch-size auto`` sizes the batch from a memory probe on CUDA, an
out-of-memory error halves it, and re-running the same command skips finished images. Each image
has its own Philox seed (from ``--seed`` and its path relative to ``data.root``), mask and
measurement noise, so a result does not depend on the batch, on resuming or on where the data
folder lies. ``--rng torch`` instead draws with torch and
numpy in their order, one image at a time, after ``torch.manual_seed(seed + i)`` and
``np.random.seed(seed + i)``.

Exit codes: 0 done, 1 a chain diverged (finished images are kept), 2 bad settings (before any work).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from ..._help import HelpFormatter, batch_size
from ...cli_options import BACKENDS

if TYPE_CHECKING:
    from .recognize import Conditioning

logger = logging.getLogger(__name__)

__all__ = ["add_parser", "run", "MANIFEST_FORMAT"]

MANIFEST_FORMAT = 1
_DIFFUSION_KEYS = ("sampler", "steps", "noise_schedule", "model_mean_type", "model_var_type", "dynamic_threshold",
                   "clip_denoised", "rescale_timesteps", "timestep_respacing", "eta")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dps2022`` on an ``add_subparsers()`` object (its ``func`` is :func:`run`)."""
    p = subparsers.add_parser(
        "dps2022", help="run the original DPS code's configs (sample_condition.py) on dps_fast",
        description="Their sample_condition.py: the same three YAML files and output folders, batched, resumable,\n"
                    "with a manifest and metrics. Needs PyYAML (pip install 'dps-fast[dps2022]').",
        formatter_class=HelpFormatter)
    p.add_argument("--model_config", required=True, help="their model config YAML (create_model keys + model_path)")
    p.add_argument("--diffusion_config", required=True, help="their diffusion config YAML (create_sampler keys)")
    p.add_argument("--task_config", required=True, help="their task config YAML (conditioning, data, measurement)")
    p.add_argument("--gpu", type=int, default=0, help="CUDA device index (CPU when CUDA is unavailable)")
    p.add_argument("--save_dir", default="./results", help="output root; images go to SAVE_DIR/<operator name>/")
    p.add_argument("--batch-size", type=batch_size, default="auto",
                   help="images per call, or auto (CUDA: memory probe; CPU: 8)")
    p.add_argument("--seed", type=int, default=0, help="root of the per-image seeds, masks and measurement noise")
    p.add_argument("--rng", choices=("philox", "torch"), default="philox",
                   help="philox: per-image streams (batchable, resumable); torch: their torch/numpy draws, one image "
                        "at a time")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="as in dps-fast reconstruct")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (once, reused by every batch)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


@dataclass
class _Item:
    index: int
    name: str          # their file name stem: str(index).zfill(5)
    path: str
    x: torch.Tensor    # [3, S, S] in [-1, 1]
    y: torch.Tensor    # [*y] measurement (float32, on the run device)
    x_start: torch.Tensor
    seed: int
    mask: Optional[torch.Tensor]


def _checkpoint_id(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "bytes": st.st_size, "mtime": int(st.st_mtime)}


def _device(gpu: int) -> torch.device:
    if torch.cuda.is_available():
        if not 0 <= gpu < torch.cuda.device_count():
            raise ValueError(f"--gpu: expected a CUDA device index in [0, {torch.cuda.device_count()}), got {gpu}")
        return torch.device("cuda", gpu)
    return torch.device("cpu")


def run(args: argparse.Namespace) -> int:
    """Execute ``dps-fast dps2022``; returns 0 or raises (:func:`dps_fast.cli.main` maps errors to
    the exit codes: 1 a chain diverged, 2 bad settings)."""
    from ...reconstruct.batching import auto_rows, stream_chunks
    from ...reconstruct.data import read_json, write_json
    from ...reconstruct.distributed import collect_done, merge
    from ...reconstruct.items import item_key, item_seeds
    from ...reconstruct.manifest import check_resumable, environment
    from ...reconstruct.manifest import fingerprint as settings_fingerprint
    from .diffusion import create_sampler
    from .images import save_like_plt
    from .tasks import ConfigError, list_images, load_image, load_yaml, model_from_config, parse_task

    # ---- everything that can fail on bad settings, before any work --------------------------
    model_cfg = load_yaml(args.model_config, "--model_config")
    diff_cfg = load_yaml(args.diffusion_config, "--diffusion_config")
    task_cfg = load_yaml(args.task_config, "--task_config")
    unknown = sorted(set(diff_cfg) - set(_DIFFUSION_KEYS))
    if unknown:
        raise ConfigError(f"--diffusion_config: unknown keys {unknown} (create_sampler takes {list(_DIFFUSION_KEYS)})")
    try:
        # progress: the steps of the batch in flight, under the bar over images
        sampler = create_sampler(**diff_cfg, rng=args.rng, backend=args.backend, compile=bool(args.compile),
                                 progress=not args.quiet)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--diffusion_config: {exc}") from None
    task = parse_task(task_cfg)
    task.kernel_seed = args.seed
    files = list_images(task.data_root)
    if not files:
        raise FileNotFoundError(f"--task_config: data.root: no PNG files under {task.data_root!r}")
    # what an image's seeds, mask and noise are keyed by: its place in the data set, not on the disk
    keys = [os.path.relpath(f, task.data_root) for f in files]
    if args.seed < 0:
        raise ValueError(f"--seed: expected an int >= 0, got {args.seed}")
    dev = _device(args.gpu)
    model = model_from_config(model_cfg)
    size = int(model.image_size)
    from PIL import Image

    with Image.open(files[0]) as im:
        if im.size != (size, size):
            raise ConfigError(f"--task_config: data.root: {files[0]!r} is {im.size[0]}x{im.size[1]}, the model "
                              f"(image_size {size}) needs {size}x{size} images")
    if task.mask is not None and task.mask.image_size != size:
        raise ConfigError(f"--task_config: measurement.mask_opt.image_size: expected the model's {size}, got "
                          f"{task.mask.image_size}")
    ones = torch.ones(1, 1, size, size)
    probe_op, _ = task.build(size, ones)  # builds the operator once: unsupported ones fail here
    y_shape = tuple(probe_op.forward(torch.zeros(1, 3, size, size, dtype=torch.float64)).shape[1:])

    out = Path(args.save_dir) / task.operator_name
    settings = {"model": dict(model_cfg, checkpoint=_checkpoint_id(model_cfg["model_path"])),
                "diffusion": diff_cfg, "task": task_cfg, "rng": args.rng, "seed": args.seed}
    fingerprint = settings_fingerprint(settings)
    check_resumable(read_json(out / "manifest.json"), settings, fingerprint, out, "--save_dir", "another --save_dir")

    # ---- set-up -------------------------------------------------------------------------------
    model = model.to(dev).eval()
    for sub in ("input", "recon", "progress", "label"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    names = [str(i).zfill(5) for i in range(len(files))]
    done = {r["name"]: r for r in collect_done(out, fingerprint)}
    for name, rec in done.items():
        i = int(rec.get("index", -1))
        if not (0 <= i < len(files)) or rec.get("path") != files[i]:
            raise ValueError(f"--task_config: data.root changed since the first run ({name} was {rec.get('path')!r}); "
                             f"use another --save_dir")
    pending = [i for i in range(len(files)) if names[i] not in done]
    t_start = time.perf_counter()

    if args.rng == "torch":
        rows, batch_info = 1, {"mode": "rng-torch", "rows": 1}
    elif args.batch_size != "auto":
        rows, batch_info = int(args.batch_size), {"mode": "fixed", "rows": int(args.batch_size)}
    else:
        rows, batch_info = auto_rows(_probe(sampler, model, task, size, y_shape, dev), dev, 1,
                                     max_rows=max(1, len(pending)))
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT, "tool": "dps-fast dps2022", "status": "running", "fingerprint": fingerprint,
        "settings": settings, "options": {k: v for k, v in vars(args).items() if k != "func"},
        "environment": environment(dev), "batch": batch_info, "inputs": {"total": len(files)},
    }
    write_json(out / "manifest.json", manifest)

    skipped: list[dict[str, Any]] = []

    def items() -> Any:
        for i in pending:
            name = names[i]
            seed = int(item_seeds(args.seed, keys[i], 1)[0])
            if args.rng == "torch":  # their per-image draw order: mask (numpy), noise, x_start (torch)
                torch.manual_seed(args.seed + i)
                np.random.seed(args.seed + i)
            try:
                x = load_image(files[i])
            except OSError as exc:
                logger.warning("skipping %s: %s", files[i], exc)
                skipped.append({"name": name, "path": files[i], "reason": str(exc)})
                continue
            if tuple(x.shape) != (3, size, size):
                skipped.append({"name": name, "path": files[i], "reason": f"size {tuple(x.shape[1:])} != {size}"})
                logger.warning("skipping %s: %dx%d, the model needs %dx%d", files[i], x.shape[2], x.shape[1],
                               size, size)
                continue
            mask = None
            if task.mask is not None:
                mask = task.mask(np.random if args.rng == "torch" else
                                 np.random.default_rng(item_key(args.seed, keys[i], "mask")))
            op, _ = task.build(size, mask)
            y = _simulate(task, op, x, args.rng, args.seed, dev, keys[i])
            if args.rng == "torch":
                x_start = torch.randn((1,) + tuple(x.shape), device=dev)[0]
            else:
                from ...noise import STREAM_INIT, philox_normal

                x_start = philox_normal(torch.tensor([seed]), x.numel(), sampler.num_timesteps, STREAM_INIT,
                                        torch.float32).view_as(x).to(dev)
            yield _Item(i, name, files[i], x, y, x_start, seed, mask)

    def run_batch(jobs: list) -> list:
        its = [j.key for j in jobs]
        masks = torch.cat([it.mask for it in its]) if task.mask is not None else None
        op, project = task.build(size, None if masks is None else masks.to(dev))
        cond = _conditioning(task, op, project)

        def on_record(i: int, state: torch.Tensor) -> None:
            seen = set()
            for b, it in enumerate(its):
                if id(it) in seen:
                    continue  # a padded repeat of the last image
                seen.add(id(it))
                folder = out / "progress" / it.name
                folder.mkdir(parents=True, exist_ok=True)
                save_like_plt(folder / f"x_{str(i).zfill(4)}.png", state[b:b + 1])

        t0 = time.perf_counter()
        x0 = sampler.run(model, cond, op, torch.stack([it.x_start for it in its]),
                         torch.stack([it.y for it in its]), torch.tensor([it.seed for it in its]),
                         on_record=on_record)
        dt = time.perf_counter() - t0
        return [(x0[b].detach().float().cpu(), dt / len(its)) for b in range(len(its))]

    from tqdm.auto import tqdm

    bar = tqdm(total=len(pending), unit="img", desc="dps2022", disable=args.quiet)
    finished = 0
    try:
        for jobs, results, rows in stream_chunks(items(), 1, rows, run_batch, pad=True):
            for job, (recon, secs) in zip(jobs, results):
                _write_item(out, job.key, recon, secs, task, size, fingerprint)
                finished += 1
                bar.update(1)
    finally:
        bar.close()
    records = merge(out, fingerprint)
    manifest.update(status="complete" if len(records) == len(files) else "incomplete",
                    seconds=round(time.perf_counter() - t_start, 3), plan=sampler.last_plan,
                    inputs={"total": len(files), "done": len(records), "finished_now": finished,
                            "already_done": len(done), "skipped": skipped}, batch=dict(batch_info, rows_final=rows))
    write_json(out / "manifest.json", manifest)  # each skipped image was logged when it was skipped
    print(f"{len(records)}/{len(files)} images done ({finished} now, {len(done)} before, {len(skipped)} skipped) in "
          f"{time.perf_counter() - t_start:.1f} s -> {out}")
    return 0


def _simulate(task: Any, op: Any, x: torch.Tensor, rng: str, seed: int, dev: torch.device,
              key: str) -> torch.Tensor:
    """``y = noiser(A x)`` for one image ``[3, S, S]``: their noise models; --rng philox keys the
    noise by (seed, path under data.root) so it does not depend on the batch (Gaussian: dps-fast
    reconstruct's :func:`~dps_fast.reconstruct.runner.simulate_measurement`), --rng torch draws
    as they do."""
    from ...reconstruct.items import item_key, simulate_measurement

    if rng == "torch":
        y = op.forward(x[None].to(dev))[0]
        if task.noise == "gaussian":
            return y + torch.randn_like(y, device=y.device) * task.sigma
        if task.noise == "poisson":
            return _poisson(y, task.rate, np.random).to(dev)
        return y
    if task.noise == "poisson":  # their PoissonNoise (numpy), keyed like reconstruct's measurement noise
        y = op.forward(x[None].double())[0]
        return _poisson(y, task.rate, np.random.default_rng(item_key(seed, key, "measurement"))).float().to(dev)
    sigma = task.sigma if task.noise == "gaussian" else 0.0
    return simulate_measurement(op, x, sigma, seed, key).to(dev)


def _poisson(y: torch.Tensor, rate: float, rng: Any) -> torch.Tensor:
    """Their PoissonNoise: counts ``~ Poisson(255 rate (y + 1) / 2)`` scaled back to [-1, 1] (float64)."""
    data = ((y.detach().double().cpu() + 1.0) / 2.0).clamp(0, 1)
    counts = torch.from_numpy(rng.poisson(data.numpy() * 255.0 * rate) / 255.0 / rate)
    return (counts * 2.0 - 1.0).clamp(-1, 1)


def _conditioning(task: Any, op: Any, project: Any) -> "Conditioning":
    """The conditioning of a task config (their method, scale, noise) on a dps_fast operator."""
    from .recognize import Conditioning

    return Conditioning(task.method, scale=task.scale, num_sampling=task.num_sampling, noise=task.noise,
                        sigma=task.sigma, operator=op, forward=op.forward, project=project)


def _probe(sampler: Any, model: Any, task: Any, size: int, y_shape: tuple[int, ...], dev: torch.device) -> Any:
    """``step(rows)``: the first step of the chain on ``rows`` dummy images (auto batch's probe)."""
    def step(rows: int) -> None:
        masks = torch.ones(rows, 1, size, size, device=dev)
        op, project = task.build(size, masks)
        x = torch.randn(rows, 3, size, size, device=dev)
        y = torch.zeros((rows,) + y_shape, device=dev)
        sampler.run(model, _conditioning(task, op, project), op, x, y.abs() + 0.5,
                    torch.arange(rows, dtype=torch.int64), steps=[sampler.num_timesteps - 1])

    return step


def _write_item(out: Path, item: _Item, recon: torch.Tensor, seconds: float, task: Any, size: int,
                fingerprint: str) -> None:
    """Their three PNGs, the tensors and the done marker (last), all atomic."""
    from ...reconstruct.data import save_tensors, write_json
    from ...reconstruct.metrics import psnr, ssim
    from .images import save_like_plt

    fname = f"{item.name}.png"
    save_like_plt(out / "input" / fname, item.y[None].cpu())
    save_like_plt(out / "label" / fname, item.x[None])
    save_like_plt(out / "recon" / fname, recon[None])
    op, _ = task.build(size, item.mask)
    rnorm = float((op.forward(recon[None].double())[0] - item.y.double().cpu()).norm())
    s01 = ((recon.double() + 1) / 2).clamp(0, 1)[None]
    ref = ((item.x.double() + 1) / 2).clamp(0, 1)[None]
    folder = out / "items" / item.name
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"x": item.x, "measurement": item.y.cpu(), "recon": recon, "seed": item.seed}
    if item.mask is not None:
        tensors["mask"] = item.mask
    save_tensors(folder / "tensors.pt", tensors)
    row = {"image": item.name, "index": item.index, "sample": 0, "seed": item.seed, "psnr": float(psnr(s01, ref)),
           "ssim": float(ssim(s01, ref)), "residual_norm": rnorm, "seconds": round(seconds, 4), "rank": 0}
    write_json(folder / "done.json", {"name": item.name, "index": item.index, "path": item.path,
                                      "fingerprint": fingerprint, "metrics": [row],
                                      "files": [f"input/{fname}", f"label/{fname}", f"recon/{fname}"]})
