"""The ``reconstruct`` sub-command of ``dps-fast``: :func:`add_parser` registers it, :func:`run`
executes it. Errors are raised and mapped to exit codes by :func:`dps_fast.cli.main` (1 a chain
diverged, 2 bad settings or inputs, found before any work starts).

Example:
    dps-fast reconstruct faces/ --out out/ --operator gaussian-blur --sigma 3 \\
        --model ffhq256 --checkpoint ffhq_10m.pt --steps 1000 --samples 4
    torchrun --nproc-per-node 8 -m dps_fast.cli reconstruct faces/ --out out/ ...
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any


from .._help import HelpFormatter, batch_size, count, device_option, positive_int
from ..cli_options import (AUTOCAST, BACKENDS, CHECKPOINTS, COMPILE, add_method_options, add_model_options,
                           add_task_options, build_operator, load_model, method_kwargs, model_geometry, noise_kwargs)
from ..schedule import VARIANCES

logger = logging.getLogger(__name__)

__all__ = ["add_parser", "run", "EXIT_NOTHING"]

#: Exit status of a run that reconstructed nothing (every input skipped, or none found).
EXIT_NOTHING = 4

EPILOG = f"""outputs (in --out):
  items/NAME/    measurement.png, sample_000.png ..., mean.png, std.png, tensors.pt, done.json
  metrics.csv    one row per sample and one per posterior mean: image, index, sample, seed, psnr,
                 ssim, residual_norm, seconds, rank. Rows are appended as items finish; the end of
                 the run (or --merge-only) rewrites it sorted from the done.json files. "seconds"
                 is the item's share of the wall time of the sampler calls it was part of (a
                 batched call's time split evenly over the samples it ran), not a per-image latency.
  manifest.json  settings, versions, device and status: running, complete, incomplete,
                 nothing-done (every input skipped or none found: exit status 4), interrupted
                 (killed or Ctrl-C; re-run the same command to resume), diverged or failed.

{CHECKPOINTS}

examples:
  dps-fast reconstruct faces/ --out runs/blur --operator gaussian-blur --sigma 3 --sigma-n 0.05 \\
      --model ffhq256 --checkpoint ffhq_10m.pt --steps 1000 --zeta 1.0 --samples 4
  dps-fast reconstruct faces/ --out smoke --model tiny32 --random-weights --steps 4 --device cpu
  dps-fast reconstruct faces/ --out runs/ddrm --method ddrm --eta 0.85 --steps 20 --model ffhq256 ...
  torchrun --nproc-per-node 8 -m dps_fast.cli reconstruct faces/ --out runs/blur ...
  dps-fast reconstruct --out runs/blur --merge-only      # rebuild metrics.csv, show the status"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``reconstruct`` (and all its options) on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "reconstruct", help="posterior samples for a dataset, DPS or --method (resumable; torchrun for multi-GPU)",
        description="Posterior samples, mean and std for every input, with PSNR/SSIM metrics and a run "
                    "manifest.\nRe-running the same command resumes; under torchrun the work is sharded.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    io = p.add_argument_group("data")
    io.add_argument("input", nargs="?", default=None,
                    help="folder of images (PNG/JPEG) or a .npy/.pt tensor [N, C, H, W] with values in [-1, 1]; "
                         "optional with --measurements")
    io.add_argument("--out", "-o", required=True, help="output folder (re-running into it resumes)")
    io.add_argument("--measurements", default=None,
                    help="use these measurements instead of simulating them: a folder (NAME.pt/.npy/.png, or the "
                         "output folder of an earlier run) or a tensor file [N, *y]")
    io.add_argument("--resize", action="store_true",
                    help="scale the shorter side of inputs of another size to the model's and centre-crop "
                         "(default: such inputs are skipped with a message)")
    add_task_options(p)
    add_model_options(p)
    sampler = p.add_argument_group("sampler")
    sampler.add_argument("--steps", type=positive_int, default=1000, help="sampling steps (respaced from 1000)")
    add_method_options(sampler)
    sampler.add_argument("--variance", choices=VARIANCES, default=None,
                         help="reverse-step variance (default: learned_range for learn_sigma models)")
    sampler.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                         help="clip x0hat to [-1, 1] (like the DPS code)")
    sampler.add_argument("--samples", type=positive_int, default=1, help="posterior samples per input")
    sampler.add_argument("--seed", type=int, default=0,
                         help="root seed (each input's seeds derive from it and its name)")
    run_ = p.add_argument_group("execution")
    run_.add_argument("--batch-size", type=batch_size, default="auto",
                      help="images per sampler call, or auto (CUDA: fit the free memory; CPU: max(1, 8 // samples))")
    run_.add_argument("--device", type=device_option, default=None,
                      help="cpu, cuda, cuda:1 (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    run_.add_argument("--backend", choices=BACKENDS, default="auto",
                      help="auto: triton on CUDA, else torch; reference: autograd through the whole step "
                           "(slow, for checks); torch: the fast path in PyTorch; triton: fused kernels "
                           "(CUDA); cuda: the CUDA extension")
    run_.add_argument("--compile", choices=sorted(COMPILE), default="auto",
                      help="torch.compile the network (auto: on CUDA)")
    run_.add_argument("--autocast", choices=sorted(AUTOCAST), default="none", help="network precision")
    run_.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    run_.add_argument("--merge-only", action="store_true",
                      help="only rebuild metrics.csv from the finished items in --out and print the run's status")
    p.set_defaults(func=run)
    return p


def _merge_only(args: argparse.Namespace) -> int:
    from .data import MANIFEST, read_json, write_json
    from .distributed import merge
    from .manifest import run_status

    out = Path(args.out)
    manifest = read_json(out / MANIFEST)
    if manifest is None:
        raise FileNotFoundError(f"--out: no {MANIFEST} in {str(out)!r} (nothing to merge)")
    records = merge(out, manifest.get("fingerprint"))
    inputs = dict(manifest.get("inputs", {}), done=len(records))
    total = inputs.get("total")
    skipped = {s["name"] for s in inputs.get("skipped", [])}
    if isinstance(total, int):
        inputs["missing_count"] = max(0, total - len(records) - len(skipped))
    status = run_status(manifest)
    if status not in ("running", "interrupted", "failed", "diverged") or inputs.get("missing_count") == 0:
        status = "complete" if inputs.get("missing_count") == 0 else "incomplete"
        if not records:
            status = "nothing-done"
    manifest.update(inputs=inputs, status=status)
    write_json(out / MANIFEST, manifest)
    print(f"merged {count(len(records), 'finished item')} into {out / 'metrics.csv'}")
    hint = " (re-run the same command to resume)" if status in ("interrupted", "incomplete", "failed") else ""
    print(f"status: {status}, {len(records)}/{total if total is not None else '?'} "
          f"{'input' if total == 1 else 'inputs'} done{hint}")
    return 0


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {str(out)!r} is a file; expected a folder (created if missing)")


def run(args: argparse.Namespace) -> int:
    """Execute ``dps-fast reconstruct``; returns 0, :data:`EXIT_NOTHING`, or raises (see
    :func:`dps_fast.cli.main`)."""
    from ..methods.registry import get_method
    from .runner import NothingReconstructed, reconstruct

    _check_out(Path(args.out))
    if args.merge_only:
        return _merge_only(args)
    if args.input is None and args.measurements is None:
        raise ValueError("input: pass a folder or tensor file of images, or --measurements")
    method, value, method_kw = method_kwargs(args)
    model, schedule, model_desc = load_model(args)
    channels, size = model_geometry(model, None)
    operator = build_operator(args, int(channels or 3), size)
    if schedule is not None:
        schedule = schedule.respace(args.steps)
    options = {k: v for k, v in vars(args).items() if k != "func"}
    options.update(argv=sys.argv, cwd=os.getcwd(), model_source=model_desc)
    param = get_method(method).param
    zeta = value if param == "zeta" else None
    extra = {k: v for k, v in method_kw.items() if k != "guidance"}
    if param != "zeta":
        extra[param] = value
    try:
        summary = reconstruct(
            args.input, args.out, model, operator, schedule=schedule, steps=args.steps, sigma_n=args.sigma_n,
            method=method, zeta=zeta, guidance=method_kw.get("guidance"), method_options=extra or None,
            samples=args.samples, seed=args.seed, batch_size=args.batch_size, device=args.device,
            backend=args.backend, compile=COMPILE[args.compile], autocast=AUTOCAST[args.autocast], clip=args.clip,
            variance=args.variance, resize=args.resize, measurements=args.measurements, progress=not args.quiet,
            options=options, **noise_kwargs(args))
    except NothingReconstructed as exc:
        print(f"dps-fast reconstruct: {exc} (status 'nothing-done' in {Path(args.out) / 'manifest.json'})",
              file=sys.stderr)
        return EXIT_NOTHING
    if summary.rank == 0:
        if summary.skipped:  # each one was logged when it was skipped
            print(f"{count(len(summary.skipped), 'input')} skipped (listed in {summary.out_dir / 'manifest.json'})",
                  file=sys.stderr)
        inputs = "input" if summary.total == 1 else "inputs"
        print(f"{summary.done}/{summary.total} {inputs} done ({summary.finished_now} now, {summary.already_done} "
              f"before, {len(summary.skipped)} skipped, {len(summary.missing)} missing) in {summary.seconds:.1f} s "
              f"-> {summary.out_dir}")
    return 0
