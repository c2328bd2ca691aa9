"""What the DPS code's objects are: conditioning methods, noisers and operators, by their interfaces.

``sample_condition.py`` passes ``p_sample_loop`` the bound method ``cond_method.conditioning``
(wrapped in ``functools.partial(..., mask=mask)`` for inpainting). :func:`inspect_conditioning`
unwraps it to the conditioning object, whose class name says the method
(``PosteriorSampling`` 'ps', ``PosteriorSamplingPlus`` 'ps+', ``ManifoldConstraintGradient``
'mcg', ``Projection`` 'projection', ``Identity`` 'vanilla'), and reads its ``scale``,
``num_sampling``, ``operator`` and ``noiser`` (whose ``__name__`` is 'gaussian', 'poisson' or
'clean', set by their ``get_noise``). Anything else is *unrecognised*: it still runs, through
the generic path that calls the function itself.

:func:`map_operator` maps their operator objects to dps_fast operators where the semantics are
identical (denoising, inpainting, the reflect-boundary Gaussian/motion blurs, antialiased bicubic
super-resolution, phase retrieval) and checks that on a random probe before trusting it; any
other operator becomes ``operators.Differentiable(their forward)``: the fused step with one
autograd VJP of their ``forward``.

Example:
    >>> inspect_conditioning(lambda **kw: kw).method is None
    True
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ...operators import Blur, Differentiable, Identity, Inpainting, PhaseRetrieval, SuperResolution
from ...operators.base import LinearOperator, Operator, check_signal

logger = logging.getLogger(__name__)

__all__ = ["Conditioning", "METHOD_CLASSES", "NOISE_CLASSES", "inspect_conditioning", "noise_kind", "unwrap_partial",
           "map_operator", "PROBE_TOL", "BatchMask"]

#: Their conditioning class names -> the method names of their registry.
METHOD_CLASSES = {"PosteriorSampling": "ps", "PosteriorSamplingPlus": "ps+", "ManifoldConstraintGradient": "mcg",
                  "Projection": "projection", "Identity": "vanilla"}
#: Their noise class names -> the ``__name__`` their ``get_noise`` gives an instance.
NOISE_CLASSES = {"GaussianNoise": "gaussian", "PoissonNoise": "poisson", "Clean": "clean"}
#: Relative max error allowed between their operator and ours on a random probe: float32
#: rounding of a 61x61 convolution sum is ~1e-6 of the output's scale; a semantic difference
#: (boundary, flipped kernel, another filter) is >= 1e-2.
PROBE_TOL = 1e-4


@dataclass
class Conditioning:
    """A measurement conditioning: their method (or None) with everything its formula needs.

    ``forward(x)`` is ``A x`` as their code evaluates it (``operator.forward(x, **kwargs)``),
    ``project(x, noisy_y)`` their projection (``obj.project(data=x, noisy_measurement=noisy_y,
    **kwargs)``), ``fn`` the user's function itself (the generic path).
    """

    method: Optional[str]
    fn: Optional[Callable[..., Any]] = None
    obj: Any = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    scale: float = 1.0
    num_sampling: int = 5
    noise: Optional[str] = None
    sigma: Optional[float] = None
    operator: Any = None
    forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    project: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    reason: str = ""

    def describe(self) -> str:
        if self.method is None:
            return f"unrecognised conditioning {self.reason}".strip()
        return f"'{self.method}' with {self.noise or 'unknown'} noise (scale {self.scale:g})"


def noise_kind(noiser: Any) -> Optional[str]:
    """'gaussian' | 'poisson' | 'clean' for their noisers (by ``__name__``, else class name)."""
    name = getattr(noiser, "__name__", None)
    if name in ("gaussian", "poisson", "clean"):
        return name
    return NOISE_CLASSES.get(type(noiser).__name__)


def unwrap_partial(fn: Any) -> tuple[Any, tuple, dict[str, Any]]:
    """``(function, positional args, keywords)`` of a (possibly nested) ``functools.partial``."""
    args: tuple = ()
    kwargs: dict[str, Any] = {}
    while isinstance(fn, functools.partial):
        args = tuple(fn.args) + args
        kwargs = {**fn.keywords, **kwargs}
        fn = fn.func
    return fn, args, kwargs


def inspect_conditioning(fn: Any) -> Conditioning:
    """Recognise ``measurement_cond_fn`` (see the module docstring); never raises for odd input."""
    if not callable(fn):
        raise TypeError(f"measurement_cond_fn: expected a callable, got {type(fn).__name__}")
    base, args, kwargs = unwrap_partial(fn)
    if args:
        return Conditioning(None, fn=fn, reason="(functools.partial with positional arguments)")
    if not (inspect.ismethod(base) and base.__name__ == "conditioning"):
        return Conditioning(None, fn=fn, reason=f"({getattr(base, '__qualname__', type(base).__name__)})")
    obj = base.__self__
    method = METHOD_CLASSES.get(type(obj).__name__)
    if method is None:
        return Conditioning(None, fn=fn, obj=obj, reason=f"(class {type(obj).__name__})")
    operator = getattr(obj, "operator", None)
    noise = noise_kind(getattr(obj, "noiser", None))
    if operator is None or not callable(getattr(operator, "forward", None)):
        return Conditioning(None, fn=fn, obj=obj, reason=f"({type(obj).__name__} without an operator.forward)")
    if method in ("ps", "ps+", "mcg") and noise is None:
        return Conditioning(None, fn=fn, obj=obj,
                            reason=f"(noiser {type(getattr(obj, 'noiser', None)).__name__} is not gaussian/poisson/clean)")
    scale = getattr(obj, "scale", 1.0)
    num = getattr(obj, "num_sampling", 5)
    noiser = getattr(obj, "noiser", None)
    sigma = getattr(noiser, "sigma", None)
    project: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    if callable(getattr(obj, "project", None)):
        def their_project(data: torch.Tensor, noisy: torch.Tensor, _obj: Any = obj, _kw: dict = kwargs) -> torch.Tensor:
            return _obj.project(data=data, noisy_measurement=noisy, **_kw)

        project = their_project

    def forward(x: torch.Tensor, _op: Any = operator, _kw: dict = kwargs) -> torch.Tensor:
        return _op.forward(x, **_kw)

    return Conditioning(method, fn=fn, obj=obj, kwargs=kwargs, scale=float(scale), num_sampling=int(num),
                        noise=noise, sigma=float(sigma) if isinstance(sigma, (int, float)) else None,
                        operator=operator, forward=forward, project=project)


class BatchMask(LinearOperator):
    """``A x = m * x`` with one mask per batch row ``[B, 1 or C, *S]`` (their per-image
    inpainting masks batched); a generic operator (exact adjoint ``m * y``)."""

    def __init__(self, mask: torch.Tensor) -> None:
        if not isinstance(mask, torch.Tensor) or mask.dim() not in (3, 4):
            raise ValueError(f"mask: expected [B, C, L] or [B, C, H, W], got {getattr(mask, 'shape', type(mask))}")
        self.mask = mask.detach()

    def _m(self, x: torch.Tensor) -> torch.Tensor:
        check_signal(x)
        if self.mask.shape[0] != x.shape[0] or self.mask.shape[2:] != x.shape[2:]:
            raise ValueError(f"x: expected [{self.mask.shape[0]}, C, {tuple(self.mask.shape[2:])}] for this mask, "
                             f"got {tuple(x.shape)}")
        return self.mask.to(device=x.device, dtype=x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._m(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y * self._m(y)

    def __repr__(self) -> str:
        return f"BatchMask({tuple(self.mask.shape)})"


def _reflect_conv_kernel(op: Any) -> Optional[torch.Tensor]:
    """The ``[k, k]`` kernel of their ``Blurkernel`` (``op.conv.seq``: ``ReflectionPad2d(k // 2)``
    then a bias-free depthwise ``Conv2d`` with one kernel for every channel), else None."""
    seq = getattr(getattr(op, "conv", None), "seq", None)
    if not isinstance(seq, torch.nn.Sequential) or len(seq) != 2:
        return None
    pad, conv = seq[0], seq[1]
    if not (isinstance(pad, torch.nn.ReflectionPad2d) and isinstance(conv, torch.nn.Conv2d)):
        return None
    w = conv.weight.detach()
    k = w.shape[-1]
    if (conv.bias is not None or w.shape[1] != 1 or conv.groups != w.shape[0] or w.shape[-2] != k or k % 2 == 0
            or tuple(pad.padding) != (k // 2,) * 4 or not bool((w == w[:1]).all())):
        return None
    return w[0, 0].double().cpu()


def _candidate(op: Any, kwargs: dict[str, Any], x: torch.Tensor) -> tuple[Optional[Operator], str]:
    """The dps_fast operator with their operator's semantics (unverified), or (None, why not)."""
    name = type(op).__name__
    if name == "DenoiseOperator":
        return Identity(), "Identity"
    if name == "InpaintingOperator":
        mask = kwargs.get("mask")
        if not isinstance(mask, torch.Tensor):
            return None, "inpainting without a mask= keyword"
        m = mask.detach()
        if m.dim() == x.dim() and m.shape[0] == 1:
            m = m[0]
        elif m.dim() == x.dim() and m.shape[0] == x.shape[0]:
            return BatchMask(m if m.shape[1] in (1, x.shape[1]) else m[:, :1]), "BatchMask (one mask per image)"
        if m.dim() == x.dim() - 1 and m.shape[0] == 1:
            m = m[0]  # [1, H, W] -> [H, W]: broadcast over channels
        if m.dim() > 3:
            return None, f"inpainting mask of shape {tuple(mask.shape)}"
        return Inpainting(m), "Inpainting"
    kernel = _reflect_conv_kernel(op)
    if kernel is not None:  # their Conv2d correlates: our convolution takes the flipped kernel
        return Blur(kernel.flip(-2, -1), boundary="reflect"), f"Blur({kernel.shape[0]}x{kernel.shape[1]}, reflect)"
    if name == "SuperResolutionOperator":
        factor = getattr(getattr(op, "up_sample", None), "keywords", {}).get("scale_factor")
        if not (isinstance(factor, (int, float)) and float(factor) == int(factor) and factor >= 1):
            return None, f"super-resolution with scale factor {factor!r}"
        return SuperResolution(int(factor), filter="bicubic"), f"SuperResolution({int(factor)}, bicubic)"
    if name == "PhaseRetrievalOperator" and isinstance(getattr(op, "pad", None), int):
        return PhaseRetrieval(pad=op.pad), f"PhaseRetrieval(pad={op.pad})"
    return None, f"{name} has no dps_fast equivalent"


def _generic(op: Any, kwargs: dict[str, Any], x: torch.Tensor) -> tuple[Optional[Operator], str]:
    """``Differentiable(their forward)``, shaped from one forward on ``x``; None if that fails."""
    def fn(v: torch.Tensor, _op: Any = op, _kw: dict = kwargs) -> torch.Tensor:
        return _op.forward(v, **_kw)

    try:
        with torch.no_grad():
            out = fn(x)
    except Exception as exc:  # noqa: BLE001 - their operator: whatever it raises, fall back
        return None, f"{type(op).__name__}.forward failed on x ({type(exc).__name__}: {exc})"
    if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != x.shape[0] or out.is_complex():
        return None, f"{type(op).__name__}.forward does not return a real tensor [B, ...]"
    return (Differentiable(fn, output_shape=tuple(out.shape[1:]), input_shape=tuple(x.shape[1:])),
            "Differentiable (one autograd VJP of their forward)")


def map_operator(op: Any, kwargs: dict[str, Any], x_like: torch.Tensor,
                 generic: bool = True) -> tuple[Optional[Operator], str]:
    """Their operator (with the keywords bound to the conditioning) -> a dps_fast operator with the
    same ``A``, checked on a random probe shaped like ``x_like`` (in its dtype). Without an exact
    equivalent (or when the probe disagrees by more than :data:`PROBE_TOL`) it is
    ``Differentiable(their forward)`` if ``generic``, else (None, reason)."""
    try:
        cand, desc = _candidate(op, kwargs, x_like)
    except (ValueError, TypeError) as exc:
        cand, desc = None, f"{type(op).__name__}: {exc}"
    if cand is None:
        return _fallback(op, kwargs, x_like, desc, generic)
    g = torch.Generator(device="cpu").manual_seed(1234)
    probe = torch.rand(tuple(x_like.shape), generator=g, dtype=x_like.dtype).to(x_like.device) * 2 - 1
    try:
        with torch.no_grad():
            theirs = op.forward(probe, **kwargs)
            ours = cand.forward(probe)
    except Exception as exc:  # noqa: BLE001 - any failure means: not the same operator
        return _fallback(op, kwargs, x_like, f"{type(op).__name__}: probe failed ({type(exc).__name__}: {exc})",
                         generic)
    if not isinstance(theirs, torch.Tensor) or theirs.shape != ours.shape:
        return _fallback(op, kwargs, x_like, f"{type(op).__name__}: output shape "
                         f"{tuple(getattr(theirs, 'shape', ()))} differs from {desc}'s {tuple(ours.shape)}", generic)
    scale = theirs.abs().max().clamp_min(1e-30)
    err = float((theirs.to(ours.dtype) - ours).abs().max() / scale)
    if not err <= PROBE_TOL:
        return _fallback(op, kwargs, x_like, f"{type(op).__name__}: differs from {desc} on a random probe "
                         f"(max rel. error {err:.2g})", generic)
    return cand, desc


def _fallback(op: Any, kwargs: dict[str, Any], x: torch.Tensor, why: str,
              generic: bool) -> tuple[Optional[Operator], str]:
    if not generic:
        return None, why
    cand, desc = _generic(op, kwargs, x)
    return cand, (f"{desc}; {why}" if cand is not None else f"{why}; {desc}")
