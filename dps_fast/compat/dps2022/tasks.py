"""Their three YAML files -> what ``dps-fast dps2022`` runs: the model, the sampler and the task.

``sample_condition.py`` of the DPS code reads ``--model_config`` (guided-diffusion
``create_model`` arguments plus ``model_path``), ``--diffusion_config`` (``create_sampler``
keys) and ``--task_config`` (``conditioning: {method, params}``, ``data: {name, root}``,
``measurement: {operator: {name, ...}, noise: {name, sigma | rate}, mask_opt}``). Their YAML
files use ``!!python/tuple``; :func:`load_yaml` reads it with a safe loader that knows that one
tag (PyYAML is the ``dps2022`` extra; the import swap itself does not need it).

Operators are dps_fast's with their semantics (``gaussian_blur``: their truncated Gaussian
kernel with reflect boundary; ``motion_blur``: dps_fast's seeded camera-shake kernel, reflect
boundary; ``super_resolution``: antialiased bicubic downsampling; ``inpainting``: their mask
generator, one mask per image; ``phase_retrieval``; ``noise``: identity). ``nonlinear_blur``
needs an external network and its weights and is refused before any work.

Example:
    >>> parse_task({"conditioning": {"method": "ps", "params": {"scale": 0.3}},
    ...             "data": {"name": "ffhq", "root": "x"},
    ...             "measurement": {"operator": {"name": "noise"}, "noise": {"name": "gaussian", "sigma": 0.05}}}).method
    'ps'
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ...operators import Identity
from ...operators.base import Operator
from .recognize import BatchMask

__all__ = ["load_yaml", "parse_task", "Task", "model_from_config", "list_images", "load_image",
           "gaussian_kernel", "MaskGenerator", "OPERATOR_NAMES", "ConfigError"]

OPERATOR_NAMES = ("noise", "inpainting", "gaussian_blur", "motion_blur", "super_resolution", "phase_retrieval",
                  "nonlinear_blur")
METHODS = ("vanilla", "projection", "mcg", "ps", "ps+")
NOISES = ("clean", "gaussian", "poisson")
MODEL_KEYS = ("image_size", "num_channels", "num_res_blocks", "channel_mult", "learn_sigma", "class_cond",
              "use_checkpoint", "attention_resolutions", "num_heads", "num_head_channels", "num_heads_upsample",
              "use_scale_shift_norm", "dropout", "resblock_updown", "use_fp16", "use_new_attention_order",
              "model_path")


class ConfigError(ValueError):
    """A config file or value that cannot be honoured; the message names the file and key."""


def load_yaml(path: str | os.PathLike, flag: str) -> dict[str, Any]:
    """Read one of their YAML files (``!!python/tuple`` allowed, nothing else executable).

    Raises:
        ImportError: PyYAML is missing (the message says how to install it).
        FileNotFoundError / ConfigError: missing or malformed file, naming ``flag``.
    """
    try:
        import yaml
    except ImportError:
        raise ImportError("PyYAML is needed to read the DPS code's YAML configs: pip install 'dps-fast[dps2022]' "
                          "(or pip install pyyaml)") from None

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("tag:yaml.org,2002:python/tuple",
                            lambda loader, node: tuple(loader.construct_sequence(node)))
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag}: no file {str(p)!r}")
    try:
        data = yaml.load(p.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{flag}: {str(p)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag}: expected a mapping of keys in {str(p)!r}, got {type(data).__name__}")
    return data


# ---- the model -----------------------------------------------------------------------------------
def model_from_config(cfg: dict[str, Any], flag: str = "--model_config") -> Any:
    """Their ``create_model(**model_config)`` + checkpoint, as a strict-loaded ADMUNet (eval).

    Their code falls back to random weights when ``model_path`` cannot be loaded; here a missing
    or mismatching checkpoint is an error (sampling with random weights is never intended)."""
    from ...models.adm import ADMUNet

    unknown = sorted(set(cfg) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"{flag}: unknown keys {unknown} (their create_model takes {list(MODEL_KEYS)})")
    args = {k: v for k, v in cfg.items() if k != "model_path"}
    if isinstance(args.get("attention_resolutions"), int):
        args["attention_resolutions"] = str(args["attention_resolutions"])
    if args.get("class_cond"):
        raise ConfigError(f"{flag}: class_cond: true models need class labels, which their sampling code never passes")
    path = cfg.get("model_path")
    if not path:
        raise ConfigError(f"{flag}: model_path: expected the checkpoint file, got {path!r}")
    try:
        return ADMUNet.from_checkpoint(path, config=args)
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag}: model_path: no checkpoint at {str(path)!r} (their code would silently "
                                f"sample with random weights)") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{flag}: {exc}") from None


# ---- data ---------------------------------------------------------------------------------------
def list_images(root: str) -> list[str]:
    """Their FFHQDataset's files: ``sorted(glob(root + '/**/*.png', recursive=True))``."""
    return sorted(glob.glob(root + "/**/*.png", recursive=True))


def load_image(path: str) -> torch.Tensor:
    """``[3, H, W]`` float32 in [-1, 1]: RGB, ``ToTensor`` then ``Normalize(0.5, 0.5)``.

    Contiguous, as ``ToTensor`` returns it: torch's CPU generator draws differently for strided
    tensors, so ``--rng torch`` needs their memory layout to draw their numbers."""
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.uint8)
    t = torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous().float().div(255)
    return (t - 0.5) / 0.5


# ---- kernels and masks --------------------------------------------------------------------------
def gaussian_kernel(kernel_size: int, std: float) -> torch.Tensor:
    """Their Gaussian blur kernel ``[k, k]`` float64: ``scipy.ndimage.gaussian_filter`` of a
    centred delta (taps ``exp(-j^2 / 2 std^2)`` for ``|j| <= int(4 std + 0.5)``, normalised;
    mode 'reflect', which folds taps that pass the grid's edge back in)."""
    if not (isinstance(kernel_size, int) and kernel_size >= 1):
        raise ConfigError(f"measurement.operator.kernel_size: expected a positive int, got {kernel_size!r}")
    if not (isinstance(std, (int, float)) and math.isfinite(std) and std > 0):
        raise ConfigError(f"measurement.operator.intensity: expected a positive number, got {std!r}")
    r = int(4.0 * float(std) + 0.5)
    j = np.arange(-r, r + 1)
    w = np.exp(-0.5 * (j / float(std)) ** 2)
    w /= w.sum()
    c = kernel_size // 2
    one = np.zeros(kernel_size)
    period = 2 * kernel_size
    for off, wt in zip(j, w):  # out[i] = sum_j w_j in[reflect(i + j)], in = delta at c
        for i in range(kernel_size):
            m = (i + off) % period
            src = m if m < kernel_size else period - 1 - m
            if src == c:
                one[i] += wt
    return torch.from_numpy(np.outer(one, one))


class MaskGenerator:
    """Their ``mask_generator(mask_type, mask_len_range, mask_prob_range, image_size, margin)``:
    'random' drops ``int(S^2 p)`` pixels, ``p ~ U(lo, hi)``; 'box' a box of side ``~ randint(lo,
    hi)`` at a random place inside ``margin``; 'extreme' keeps only such a box. ``rng`` is a
    ``numpy.random.Generator`` (one per image, batch-independent) or the ``numpy.random`` module
    (their global-RNG draws, in their order). Returns ``[1, 1, S, S]`` float32 (1 = observed)."""

    def __init__(self, mask_type: str, mask_len_range: Any = None, mask_prob_range: Any = None,
                 image_size: int = 256, margin: Any = (16, 16)) -> None:
        if mask_type not in ("box", "random", "both", "extreme"):
            raise ConfigError(f"measurement.mask_opt.mask_type: expected box|random|extreme, got {mask_type!r}")
        if mask_type == "both":
            raise ConfigError("measurement.mask_opt.mask_type: 'both' is accepted but never implemented by their "
                              "mask generator (it returns None); use box, random or extreme")
        need = "mask_prob_range" if mask_type == "random" else "mask_len_range"
        rng_ = mask_prob_range if mask_type == "random" else mask_len_range
        if not (isinstance(rng_, (list, tuple)) and len(rng_) == 2):
            raise ConfigError(f"measurement.mask_opt.{need}: expected a (low, high) pair for mask_type {mask_type}, "
                              f"got {rng_!r}")
        self.mask_type, self.image_size = mask_type, int(image_size)
        self.len_range = tuple(mask_len_range) if mask_len_range is not None else None
        self.prob_range = tuple(mask_prob_range) if mask_prob_range is not None else None
        self.margin = tuple(margin)

    def __call__(self, rng: Any) -> torch.Tensor:
        s = self.image_size
        mask = torch.ones(1, 1, s, s)
        if self.mask_type == "random":
            prob = rng.uniform(*self.prob_range)
            drop = rng.choice(s * s, int(s * s * prob), replace=False)
            mask.view(-1)[torch.as_tensor(np.asarray(drop), dtype=torch.int64)] = 0.0
            return mask
        lo, hi = int(self.len_range[0]), int(self.len_range[1])
        draw = rng.integers if hasattr(rng, "integers") else rng.randint  # Generator | numpy.random
        h = int(draw(lo, hi))
        w = int(draw(lo, hi))
        mh, mw = self.margin
        top = int(draw(mh, s - mh - h))
        left = int(draw(mw, s - mw - w))
        mask[..., top:top + h, left:left + w] = 0.0
        return 1.0 - mask if self.mask_type == "extreme" else mask


# ---- the task -------------------------------------------------------------------------------------
@dataclass
class Task:
    """A parsed task config: ``build(masks)`` gives ``(operator A, their projection)`` for a batch."""

    method: str
    scale: float
    num_sampling: int
    noise: str
    sigma: Optional[float]
    rate: Optional[float]
    operator_name: str
    operator_args: dict[str, Any]
    data_root: str
    mask: Optional[MaskGenerator] = None
    raw: dict[str, Any] = field(default_factory=dict)
    kernel_seed: int = 0  # motion_blur: their kernel is random per run; ours is seeded
    _built: dict[int, Any] = field(default_factory=dict, repr=False)

    def build(self, image_size: int, masks: Optional[torch.Tensor] = None
              ) -> tuple[Operator, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """``(A, project)`` for images of ``image_size``; ``masks`` ``[B, 1, S, S]`` for inpainting.

        ``project(x, noisy_y)`` is their operator's ``project`` formula (used by 'mcg' and
        'projection'): the base class ``(I - A^T A) y - A x`` with ``A^T = I`` for the blurs,
        ``(1 - m) y - m x`` for inpainting, ``x - up(A x) + up(y)`` (nearest) for super-resolution,
        ``x`` for denoising."""
        if self.operator_name != "inpainting":  # one operator for every batch (its FFT plans and kernels cached)
            if image_size not in self._built:
                self._built[image_size] = self._build(image_size, None)
            return self._built[image_size]
        return self._build(image_size, masks)

    def _build(self, image_size: int, masks: Optional[torch.Tensor]
               ) -> tuple[Operator, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        name, a = self.operator_name, self.operator_args
        if name == "noise":
            return Identity(), lambda x, y: x
        if name == "inpainting":
            if masks is None:
                raise ValueError("masks: inpainting needs one mask per image")
            op = BatchMask(masks)
            return op, lambda x, y: (y - op.forward(y)) - op.forward(x)
        if name in ("gaussian_blur", "motion_blur"):
            op = _blur(name, a, self.kernel_seed)
            return op, lambda x, y: (y - op.forward(y)) - op.forward(x)
        if name == "super_resolution":
            factor = _factor(a)
            shape = a.get("in_shape")
            if shape is not None and (not isinstance(shape, (list, tuple)) or int(shape[-1]) != image_size
                                      or int(shape[-2]) != image_size):
                raise ConfigError(f"measurement.operator.in_shape: their resizer is built for {shape!r}; the "
                                  f"images are {image_size}x{image_size}")
            op = _h11("SuperResolution", "super_resolution", lambda cls: cls(factor, filter="bicubic"))

            def project(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                up = lambda v: F.interpolate(v, scale_factor=factor)  # noqa: E731 - their nearest upsampling
                return x - up(op.forward(x)) + up(y)

            return op, project
        if name == "phase_retrieval":  # their padding int(oversample / 8 * 256) whatever the image size
            pad = int(float(a["oversample"]) / 8.0 * 256)
            op = _h11("PhaseRetrieval", "phase_retrieval", lambda cls: cls(float(a["oversample"]), pad=pad))

            def no_project(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                raise ValueError("phase_retrieval has no projection")

            return op, no_project
        raise ConfigError(f"measurement.operator.name: {name!r} cannot run here")  # pragma: no cover


def _factor(a: dict[str, Any]) -> int:
    f = a.get("scale_factor")
    if not (isinstance(f, (int, float)) and float(f) == int(f) and int(f) >= 1):
        raise ConfigError(f"measurement.operator.scale_factor: expected a positive integer, got {f!r}")
    return int(f)


def _h11(cls_name: str, op_name: str, make: Callable[[Any], Operator]) -> Operator:
    """``make(dps_fast.operators.<cls_name>)``, or a ConfigError when this build lacks it."""
    from ... import operators

    cls = getattr(operators, cls_name, None)
    if cls is None:
        raise ConfigError(f"measurement.operator.name: {op_name!r} needs dps_fast.operators.{cls_name}, which this "
                          f"dps_fast build lacks")
    try:
        return make(cls)
    except TypeError as exc:
        raise ConfigError(f"measurement.operator.name: {op_name!r} needs dps_fast.operators.{cls_name} with the "
                          f"options of their operator ({exc})") from None


def _blur(name: str, a: dict[str, Any], seed: int = 0) -> Operator:
    from ... import operators

    k = a.get("kernel_size")
    std = a.get("intensity")
    if name == "gaussian_blur":
        kernel = gaussian_kernel(k, std)
    else:
        if not (isinstance(std, (int, float)) and 0 <= float(std) <= 1):
            raise ConfigError(f"measurement.operator.intensity: expected a motion intensity in [0, 1], got {std!r}")
        if not (isinstance(k, int) and k >= 1):
            raise ConfigError(f"measurement.operator.kernel_size: expected a positive int, got {k!r}")
        kernel = operators.MotionBlur(k, float(std), seed=seed).kernel(2)
    return _h11("Blur", name, lambda cls: cls(kernel, boundary="reflect"))


def parse_task(cfg: dict[str, Any], flag: str = "--task_config") -> Task:
    """Validate a task config (their keys) and return a :class:`Task`; errors name the key."""
    def get(d: Any, key: str, where: str) -> Any:
        if not isinstance(d, dict) or key not in d:
            raise ConfigError(f"{flag}: missing {where}{key}")
        return d[key]

    cond = get(cfg, "conditioning", "")
    method = get(cond, "method", "conditioning.")
    if method not in METHODS:
        raise ConfigError(f"{flag}: conditioning.method: expected one of {METHODS}, got {method!r}")
    params = cond.get("params") or {}
    scale = params.get("scale", 1.0)
    num = params.get("num_sampling", 5)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ConfigError(f"{flag}: conditioning.params.scale: expected a number, got {scale!r}")
    if not (isinstance(num, int) and num >= 1):
        raise ConfigError(f"{flag}: conditioning.params.num_sampling: expected an int >= 1, got {num!r}")
    data = get(cfg, "data", "")
    dname, root = get(data, "name", "data."), get(data, "root", "data.")
    if dname != "ffhq":
        raise ConfigError(f"{flag}: data.name: their code defines only 'ffhq' (a folder of PNGs), got {dname!r}")
    meas = get(cfg, "measurement", "")
    op = dict(get(meas, "operator", "measurement."))
    name = get(op, "name", "measurement.operator.")
    if name not in OPERATOR_NAMES:
        raise ConfigError(f"{flag}: measurement.operator.name: expected one of {OPERATOR_NAMES}, got {name!r}")
    if name == "nonlinear_blur":
        raise ConfigError(
            f"{flag}: measurement.operator.name: 'nonlinear_blur' runs the external bkse KernelWizard network with "
            f"its pretrained weights (opt_yml_path: {op.get('opt_yml_path')!r}), which dps-fast does not ship; use the "
            f"Python drop-in (dps_fast.compat.dps2022.create_sampler) with their NonlinearBlurOperator instead")
    if name == "phase_retrieval" and method in ("mcg", "projection"):
        raise ConfigError(f"{flag}: conditioning.method: {method!r} projects onto the measurement, which their "
                          f"phase_retrieval operator cannot do (the amplitude is not image-shaped)")
    noise = dict(get(meas, "noise", "measurement."))
    nname = get(noise, "name", "measurement.noise.")
    if nname not in NOISES:
        raise ConfigError(f"{flag}: measurement.noise.name: expected one of {NOISES}, got {nname!r}")
    sigma = rate = None
    if nname == "gaussian":
        sigma = get(noise, "sigma", "measurement.noise.")
        if not (isinstance(sigma, (int, float)) and sigma >= 0):
            raise ConfigError(f"{flag}: measurement.noise.sigma: expected a number >= 0, got {sigma!r}")
    elif nname == "poisson":
        rate = get(noise, "rate", "measurement.noise.")
        if not (isinstance(rate, (int, float)) and rate > 0):
            raise ConfigError(f"{flag}: measurement.noise.rate: expected a number > 0, got {rate!r}")
    mask = None
    if name == "inpainting":
        mo = get(meas, "mask_opt", "measurement.")
        try:
            mask = MaskGenerator(**mo)
        except TypeError as exc:
            raise ConfigError(f"{flag}: measurement.mask_opt: {exc}") from None
    if name == "phase_retrieval" and "oversample" not in op:
        raise ConfigError(f"{flag}: missing measurement.operator.oversample")
    args = {k: v for k, v in op.items() if k != "name"}
    return Task(method=method, scale=float(scale), num_sampling=num, noise=nname,
                sigma=None if sigma is None else float(sigma), rate=None if rate is None else float(rate),
                operator_name=name, operator_args=args, data_root=str(root), mask=mask, raw=cfg)
