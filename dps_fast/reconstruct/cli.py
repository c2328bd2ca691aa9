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
from typing import Any, Optional

import torch

from .._help import HelpFormatter, batch_size, count, device_option, non_negative_float, positive_float, positive_int

logger = logging.getLogger(__name__)

__all__ = ["add_parser", "add_task_options", "add_model_options", "run", "build_operator", "load_model",
           "OPERATORS", "RANDOM_WEIGHTS_SCALE"]

OPERATORS = ("gaussian-blur", "motion-blur", "blur", "inpaint-box", "inpaint-random", "super-res", "denoise",
             "phase-retrieval", "python")
BLURS = ("gaussian-blur", "motion-blur", "blur")
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE = {"auto": None, "on": True, "off": False}
BACKENDS = ("auto", "reference", "torch", "triton", "cuda")
#: --random-weights: the official initialisation plus this times N(0, 1) on every tensor.
RANDOM_WEIGHTS_SCALE = 0.05

CHECKPOINTS = """checkpoints (--model NAME --checkpoint FILE, a guided-diffusion state_dict .pt):
  ffhq256      ffhq_10m.pt, the FFHQ 256x256 model released with the DPS code (the
               DPS2022/diffusion-posterior-sampling repository on GitHub: "Download pretrained checkpoint")
  imagenet256  guided-diffusion's unconditional ImageNet model 256x256_diffusion_uncond.pt (the
               openai/guided-diffusion repository on GitHub; the DPS code calls it imagenet256.pt)
  tiny32       a test-sized architecture with no released weights
  --random-weights runs any of them without a checkpoint (seeded random weights: smoke tests and
  benchmarks; the images mean nothing)."""

EPILOG = f"""outputs (in --out):
  items/NAME/    measurement.png, sample_000.png ..., mean.png, std.png, tensors.pt, done.json
  metrics.csv    one row per sample and one per posterior mean: image, index, sample, seed, psnr,
                 ssim, residual_norm, seconds, rank. Rows are appended as items finish; the end of
                 the run (or --merge-only) rewrites it sorted from the done.json files. "seconds"
                 is the item's share of the wall time of the sampler calls it was part of (a
                 batched call's time split evenly over the samples it ran), not a per-image latency.
  manifest.json  settings, versions, device and status: running, complete, incomplete,
                 interrupted (killed or Ctrl-C; re-run the same command to resume) or failed.

{CHECKPOINTS}

examples:
  dps-fast reconstruct faces/ --out runs/blur --operator gaussian-blur --sigma 3 --sigma-n 0.05 \\
      --model ffhq256 --checkpoint ffhq_10m.pt --steps 1000 --zeta 1.0 --samples 4
  dps-fast reconstruct faces/ --out smoke --model tiny32 --random-weights --steps 4 --device cpu
  torchrun --nproc-per-node 8 -m dps_fast.cli reconstruct faces/ --out runs/blur ...
  dps-fast reconstruct --out runs/blur --merge-only      # rebuild metrics.csv, show the status"""


def add_task_options(p: argparse.ArgumentParser) -> Any:
    """The forward model and noise options (``y = A x + sigma_n * noise``), shared with ``explore``;
    returns their argument group."""
    task = p.add_argument_group("task (y = A x + sigma_n * noise)")
    task.add_argument("--operator", choices=OPERATORS, default="gaussian-blur",
                      help="the forward model A (python: your own, see --operator-fn)")
    task.add_argument("--sigma", type=positive_float, default=3.0, help="gaussian-blur: kernel width in pixels")
    task.add_argument("--kernel-size", type=positive_int, default=None,
                      help="blur kernel size (default: gaussian 2*ceil(4 sigma)+1, motion 61)")
    task.add_argument("--intensity", type=float, default=0.5, help="motion-blur: shake intensity in [0, 1]")
    task.add_argument("--kernel-seed", type=int, default=0, help="motion-blur: kernel seed")
    task.add_argument("--box", type=int, nargs=2, metavar=("H", "W"), default=None,
                      help="inpaint-box: size of the centred missing box (default: half the image)")
    task.add_argument("--missing", type=float, default=0.7, help="inpaint-random: fraction of missing pixels")
    task.add_argument("--mask-seed", type=int, default=0, help="inpaint-random: mask seed (one mask for all)")
    task.add_argument("--factor", type=positive_int, default=4, help="super-res: downsampling factor")
    task.add_argument("--boundary", choices=("circular", "reflect", "replicate", "zero"), default=None,
                      help="blurs: what lies beyond the image edge (default circular; reflect is the DPS code's)")
    task.add_argument("--filter", choices=("box", "bicubic"), default=None,
                      help="super-res: block mean (default) or MATLAB/DPS antialiased bicubic")
    task.add_argument("--kernel", default=None, help="blur: the kernel, a .pt or .npy file [kh, kw]")
    task.add_argument("--oversample", type=positive_float, default=None,
                      help="phase-retrieval: zero padding int(oversample / 8 * size) per side (default 2.0)")
    task.add_argument("--operator-fn", default=None, metavar="MODULE:NAME",
                      help="python: an importable dps_fast Operator, or a differentiable callable / nn.Module "
                           "A(x) (wrapped in operators.Differentiable)")
    task.add_argument("--noise", choices=("gaussian", "poisson"), default="gaussian",
                      help="measurement noise: gaussian (--sigma-n) or poisson (--rate, as the DPS code)")
    task.add_argument("--rate", type=float, default=None,
                      help="poisson: counts per intensity level, 255 * rate at white (default 1.0)")
    task.add_argument("--sigma-n", type=non_negative_float, default=0.05,
                      help="measurement noise std in [-1, 1] image units, >= 0")
    return task


def add_model_options(p: argparse.ArgumentParser) -> Any:
    """--model/--checkpoint/--random-weights/--diffusers, shared with ``explore``; returns their
    argument group."""
    from ..models.adm import ADM_CONFIGS

    model = p.add_argument_group("model (see 'checkpoints' below)")
    model.add_argument("--model", choices=sorted(ADM_CONFIGS), default=None,
                       help="ADM architecture of --checkpoint")
    model.add_argument("--checkpoint", default=None, help="guided-diffusion checkpoint (a state_dict .pt)")
    model.add_argument("--random-weights", action="store_true",
                       help="no checkpoint: --model's architecture with random weights (seed 0; for smoke "
                            "runs and benchmarks)")
    model.add_argument("--diffusers", default=None,
                       help="a diffusers pipeline folder (unet/ and scheduler/) or a UNet2DModel folder")
    return model


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``reconstruct`` (and all its options) on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "reconstruct", help="DPS reconstructions of a dataset (resumable; torchrun for multi-GPU)",
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
    sampler.add_argument("--zeta", type=non_negative_float, default=1.0, help="guidance scale")
    sampler.add_argument("--guidance", choices=("normalized", "squared"), default="normalized",
                         help="normalized: zeta * grad ||r|| (the DPS code); squared: zeta/(2 sigma_n^2) grad ||r||^2")
    sampler.add_argument("--variance", choices=("fixed_small", "fixed_large", "learned_range"), default=None,
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


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(model, schedule or None, description) from --model with --checkpoint or --random-weights,
    or from --diffusers.

    Raises FileNotFoundError / ValueError naming the flag and the problem.
    """
    random_weights = bool(getattr(args, "random_weights", False))
    if (args.diffusers is None) == (args.model is None):
        raise ValueError("--model: pass either --model NAME with --checkpoint FILE (or --random-weights), "
                         "or --diffusers FOLDER")
    if args.diffusers is not None:
        if random_weights:
            raise ValueError("--random-weights: needs --model NAME, not --diffusers")
        from ..models.diffusers_adapter import _import_diffusers, from_diffusers

        folder = Path(args.diffusers)
        if not folder.is_dir():
            raise FileNotFoundError(f"--diffusers: no folder {str(folder)!r}")
        diffusers = _import_diffusers()
        unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
        try:
            unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir))
            scheduler = (diffusers.DDPMScheduler.from_pretrained(str(folder / "scheduler"))
                         if (folder / "scheduler").is_dir() else None)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"--diffusers: cannot load a UNet2DModel from {str(unet_dir)!r}: {exc}") from None
        model, schedule = from_diffusers(unet, scheduler)
        return model.eval(), schedule, {"diffusers": str(folder.resolve())}
    from ..models.adm import ADMUNet

    if random_weights:
        if args.checkpoint is not None:
            raise ValueError("--random-weights: pass either --checkpoint FILE or --random-weights, not both")
        # weight seed 0 whatever --seed is: --seed varies the samples, not the model
        model = ADMUNet.with_random_weights(args.model, seed=0, scale=RANDOM_WEIGHTS_SCALE)
        return model, None, {"model": args.model, "random_weights": {"seed": 0, "scale": RANDOM_WEIGHTS_SCALE}}
    if args.checkpoint is None:
        raise ValueError(f"--checkpoint: required with --model {args.model} (see 'checkpoints' in "
                         f"--help), or pass --random-weights for a run without one")
    model = ADMUNet.from_checkpoint(args.checkpoint, config=args.model, path_arg="--checkpoint",
                                    config_arg="--model")
    return model, None, {"model": args.model, "checkpoint": str(Path(args.checkpoint).resolve())}


def _load_kernel(path: str) -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--kernel: no file {path!r}")
    try:
        if p.suffix == ".npy":
            import numpy as np

            k = torch.from_numpy(np.load(p))
        else:
            k = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: name the flag and the file
        raise ValueError(f"--kernel: cannot read a kernel from {path!r}: {exc}") from None
    if not isinstance(k, torch.Tensor) or k.dim() != 2:
        raise ValueError(f"--kernel: expected a 2-D tensor [kh, kw] in {path!r}, got "
                         f"{type(k).__name__} {tuple(getattr(k, 'shape', ()))}")
    return k.double()


def _python_operator(spec: Optional[str]) -> Any:
    import importlib

    from .. import operators as ops

    if spec is None or ":" not in spec:
        raise ValueError(f"--operator-fn: expected MODULE:NAME with --operator python, got {spec!r}")
    mod_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:  # a module beside the user's data, as `python -m` would find it
        sys.path.append(os.getcwd())
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--operator-fn: cannot import {spec!r}: {exc}") from None
    if isinstance(obj, ops.Operator):
        return obj
    if callable(obj):
        return ops.Differentiable(obj)
    raise ValueError(f"--operator-fn: expected an Operator or a callable A(x), got {type(obj).__name__}")


def build_operator(args: argparse.Namespace, channels: int, size: Optional[int]) -> Any:
    """The operator of ``--operator`` for ``[C, size, size]`` images."""
    from .. import operators as ops

    name = args.operator
    # flags that belong to other operators are mistakes, not silently ignored settings
    for flag, value, owners in (("--boundary", getattr(args, "boundary", None), BLURS),
                                ("--filter", getattr(args, "filter", None), ("super-res",)),
                                ("--kernel", getattr(args, "kernel", None), ("blur",)),
                                ("--oversample", getattr(args, "oversample", None), ("phase-retrieval",)),
                                ("--operator-fn", getattr(args, "operator_fn", None), ("python",))):
        if value is not None and name not in owners:
            raise ValueError(f"{flag}: only applies to --operator {' / '.join(owners)}, got --operator {name}")
    boundary = getattr(args, "boundary", None) or "circular"
    if name == "gaussian-blur":
        return ops.GaussianBlur(args.sigma, args.kernel_size, boundary=boundary)
    if name == "motion-blur":
        return ops.MotionBlur(args.kernel_size or 61, args.intensity, args.kernel_seed, boundary=boundary)
    if name == "blur":
        if args.kernel is None:
            raise ValueError("--kernel: required with --operator blur (a .pt or .npy file [kh, kw])")
        return ops.Blur(_load_kernel(args.kernel), boundary=boundary)
    if name == "super-res":
        if size is not None and size % args.factor:
            raise ValueError(f"--factor: the image size {size} is not divisible by {args.factor}")
        return ops.SuperResolution(args.factor, filter=getattr(args, "filter", None) or "box")
    if name == "phase-retrieval":
        oversample = getattr(args, "oversample", None)
        return ops.PhaseRetrieval(2.0 if oversample is None else oversample)
    if name == "python":
        return _python_operator(getattr(args, "operator_fn", None))
    if name == "denoise":
        return ops.Identity()
    if size is None:
        raise ValueError(f"--operator {name}: needs the model's image size (the model does not give one)")
    if name == "inpaint-box":
        box = tuple(args.box) if args.box is not None else (size // 2, size // 2)
        return ops.Inpainting.box((size, size), box)
    if name == "inpaint-random":
        return ops.Inpainting.random((size, size), args.missing, seed=args.mask_seed)
    raise ValueError(f"--operator: expected one of {OPERATORS}, got {name!r}")  # pragma: no cover


def _merge_only(args: argparse.Namespace) -> int:
    from .data import MANIFEST, read_json, write_json
    from .distributed import merge
    from .runner import run_status

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
    manifest.update(inputs=inputs, status=status)
    write_json(out / MANIFEST, manifest)
    print(f"merged {count(len(records), 'finished item')} into {out / 'metrics.csv'}")
    hint = " (re-run the same command to resume)" if status in ("interrupted", "incomplete", "failed") else ""
    print(f"status: {status}, {len(records)}/{total if total is not None else '?'} "
          f"{'input' if total == 1 else 'inputs'} done{hint}")
    return 0


def _noise_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``noise=``/``rate=`` of :func:`reconstruct`; only passed when not the Gaussian default."""
    noise, rate = getattr(args, "noise", "gaussian"), getattr(args, "rate", None)
    if rate is not None and noise != "poisson":
        raise ValueError(f"--rate: only applies to --noise poisson, got --noise {noise}")
    if rate is not None and not (rate > 0 and rate < float("inf")):
        raise ValueError(f"--rate: expected a positive number, got {rate}")
    return {} if noise == "gaussian" else {"noise": noise, "rate": rate}


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {str(out)!r} is a file; expected a folder (created if missing)")


def run(args: argparse.Namespace) -> int:
    """Execute ``dps-fast reconstruct``; returns 0 or raises (see :func:`dps_fast.cli.main`)."""
    from .runner import model_geometry, reconstruct

    _check_out(Path(args.out))
    if args.merge_only:
        return _merge_only(args)
    if args.input is None and args.measurements is None:
        raise ValueError("input: pass a folder or tensor file of images, or --measurements")
    model, schedule, model_desc = load_model(args)
    channels = int(getattr(model, "in_channels", 3))
    _, size = model_geometry(model, None)
    operator = build_operator(args, channels, size)
    if schedule is not None:
        schedule = schedule.respace(args.steps)
    options = {k: v for k, v in vars(args).items() if k != "func"}
    options.update(argv=sys.argv, cwd=os.getcwd(), model_source=model_desc)
    summary = reconstruct(
        args.input, args.out, model, operator, schedule=schedule, steps=args.steps, sigma_n=args.sigma_n,
        zeta=args.zeta, guidance=args.guidance, samples=args.samples, seed=args.seed,
        batch_size=args.batch_size, device=args.device, backend=args.backend, compile=COMPILE[args.compile],
        autocast=AUTOCAST[args.autocast], clip=args.clip, variance=args.variance, resize=args.resize,
        measurements=args.measurements, progress=not args.quiet, options=options,
        **_noise_kwargs(args))
    if summary.rank == 0:
        if summary.skipped:  # each one was logged when it was skipped
            print(f"{count(len(summary.skipped), 'input')} skipped (listed in {summary.out_dir / 'manifest.json'})",
                  file=sys.stderr)
        inputs = "input" if summary.total == 1 else "inputs"
        print(f"{summary.done}/{summary.total} {inputs} done ({summary.finished_now} now, {summary.already_done} "
              f"before, {len(summary.skipped)} skipped, {len(summary.missing)} missing) in {summary.seconds:.1f} s "
              f"-> {summary.out_dir}")
    return 0
