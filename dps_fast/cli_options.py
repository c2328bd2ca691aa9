"""The command-line pieces the sub-commands share: the forward model (``--operator`` and its
options), the measurement noise, the model (``--model``/``--checkpoint``/``--random-weights``/
``--diffusers``), the backend and the sampling method (``--method`` and its hyperparameter).

``dps-fast reconstruct``, ``dps-fast explore`` and ``dps-fast dps2022`` import them from here.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> _ = add_task_options(p)
    >>> build_operator(p.parse_args(["--operator", "denoise"]), 3, 32)
    Identity()
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from ._help import non_negative_float, positive_float, positive_int
from .backends import BACKENDS

__all__ = ["OPERATORS", "BLURS", "AUTOCAST", "COMPILE", "BACKENDS", "RANDOM_WEIGHTS_SCALE", "CHECKPOINTS",
           "add_task_options", "add_model_options", "add_method_options", "load_model", "load_kernel",
           "python_operator", "build_operator", "noise_kwargs", "method_kwargs", "model_geometry"]

OPERATORS = ("gaussian-blur", "motion-blur", "blur", "inpaint-box", "inpaint-random", "super-res", "denoise",
             "phase-retrieval", "python")
BLURS = ("gaussian-blur", "motion-blur", "blur")
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE = {"auto": None, "on": True, "off": False}
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
    from .models.adm import ADM_CONFIGS

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


METHOD_FLAGS = {"zeta": "--zeta", "eta": "--eta"}


def add_method_options(p: Any, zeta_help: str = "guidance scale") -> Any:
    """``--method`` and the methods' hyperparameters (``--zeta``, ``--eta``, ``--guidance``,
    ``--weighting``) on the parser or group ``p``; read them back with :func:`method_kwargs`."""
    from .methods.registry import METHODS

    default = {spec.param: spec.default for spec in reversed(list(METHODS.values()))}
    p.add_argument("--method", choices=tuple(METHODS), default="dps",
                   help="sampling method: " + "; ".join(f"{k}: {s.summary}" for k, s in METHODS.items()))
    p.add_argument("--zeta", type=non_negative_float, default=None,
                   help=f"{zeta_help} of dps, mcg, pigdm (default {default['zeta']:g})")
    p.add_argument("--eta", type=non_negative_float, default=None,
                   help=f"ddrm: noise of the unmeasured coordinates, in [0, 1] (default {default['eta']:g})")
    p.add_argument("--guidance", choices=("normalized", "squared"), default=None,
                   help="dps, mcg: normalized: zeta * grad ||r|| (the DPS code; default); squared: "
                        "zeta/(2 sigma_n^2) grad ||r||^2")
    p.add_argument("--weighting", choices=("score", "public"), default=None,
                   help="pigdm: score (the likelihood score in the DDPM update; default) or public (the public "
                        "PiGDM code's sqrt(abar_{t-1} abar_t) weight)")
    return p


def method_kwargs(args: argparse.Namespace) -> tuple[str, float, dict[str, Any]]:
    """``(method, value of its hyperparameter, other method keywords)`` from the options of
    :func:`add_method_options`; a flag of another method is a ValueError naming it."""
    from .methods.registry import get_method

    spec = get_method(args.method)
    given = {"zeta": args.zeta, "eta": getattr(args, "eta", None)}
    for param, value in given.items():
        if value is not None and param != spec.param:
            raise ValueError(f"{METHOD_FLAGS[param]}: not a setting of --method {spec.key} (its setting is "
                             f"{METHOD_FLAGS[spec.param]})")
    guidance = getattr(args, "guidance", None)
    if guidance is not None and not spec.guided:
        raise ValueError(f"--guidance: only applies to --method dps / mcg, got --method {spec.key}")
    weighting = getattr(args, "weighting", None)
    if weighting is not None and spec.key != "pigdm":
        raise ValueError(f"--weighting: only applies to --method pigdm, got --method {spec.key}")
    value = given[spec.param]
    if spec.param == "eta" and value is not None and value > 1:
        raise ValueError(f"--eta: expected a number in [0, 1], got {value}")
    extra: dict[str, Any] = {}
    if spec.guided:
        extra["guidance"] = guidance or "normalized"
    if weighting is not None:
        extra["weighting"] = weighting
    return spec.key, spec.default if value is None else value, extra


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
        from .models.diffusers_adapter import from_diffusers, import_diffusers

        folder = Path(args.diffusers)
        if not folder.is_dir():
            raise FileNotFoundError(f"--diffusers: no folder {str(folder)!r}")
        diffusers = import_diffusers()
        unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
        try:
            unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir))
            scheduler = (diffusers.DDPMScheduler.from_pretrained(str(folder / "scheduler"))
                         if (folder / "scheduler").is_dir() else None)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"--diffusers: cannot load a UNet2DModel from {str(unet_dir)!r}: {exc}") from None
        model, schedule = from_diffusers(unet, scheduler)
        return model.eval(), schedule, {"diffusers": str(folder.resolve())}
    from .models.adm import ADMUNet

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


def load_kernel(path: str) -> torch.Tensor:
    """``--kernel``: a 2-D blur kernel from a .pt or .npy file, float64."""
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


def python_operator(spec: Optional[str], input_shape: Optional[tuple[int, ...]] = None) -> Any:
    """``--operator-fn MODULE:NAME``: an Operator, or a callable wrapped in ``operators.Differentiable``
    whose input is ``input_shape`` ``(C, H, W)`` (the images', so ``A`` may change the shape)."""
    import importlib

    from . import operators as ops

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
        return ops.Differentiable(obj, input_shape=input_shape)
    raise ValueError(f"--operator-fn: expected an Operator or a callable A(x), got {type(obj).__name__}")


def build_operator(args: argparse.Namespace, channels: int, size: Optional[int]) -> Any:
    """The operator of ``--operator`` for ``[C, size, size]`` images."""
    from . import operators as ops

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
        return ops.Blur(load_kernel(args.kernel), boundary=boundary)
    if name == "super-res":
        if size is not None and size % args.factor:
            raise ValueError(f"--factor: the image size {size} is not divisible by {args.factor}")
        return ops.SuperResolution(args.factor, filter=getattr(args, "filter", None) or "box")
    if name == "phase-retrieval":
        oversample = getattr(args, "oversample", None)
        return ops.PhaseRetrieval(2.0 if oversample is None else oversample)
    if name == "python":
        return python_operator(getattr(args, "operator_fn", None),
                               (channels, size, size) if size is not None else None)
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


def noise_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``noise=``/``rate=`` of :func:`reconstruct`; only passed when not the Gaussian default."""
    noise, rate = getattr(args, "noise", "gaussian"), getattr(args, "rate", None)
    if rate is not None and noise != "poisson":
        raise ValueError(f"--rate: only applies to --noise poisson, got --noise {noise}")
    if rate is not None and not (rate > 0 and rate < float("inf")):
        raise ValueError(f"--rate: expected a positive number, got {rate}")
    return {} if noise == "gaussian" else {"noise": noise, "rate": rate}
