"""The operator interface: :class:`Operator` (any forward model) and :class:`LinearOperator`.

Every operator acts on batched tensors ``[B, C, L]`` (1-D signals) or ``[B, C, H, W]`` (images)
and states whether it is linear (``linear``). What the sampler needs of any operator ``A`` is
:meth:`Operator.residual`: the guidance cotangent ``w = J_A(x)^T Lambda (A x - y)`` (one
vector-Jacobian product of ``A``; for a linear operator that VJP is ``A^H``) and the per-sample
``||A x - y||^2_Lambda``, where ``Lambda`` is the measurement's weight (None: the identity,
Gaussian noise; :class:`~dps_fast.operators.PoissonNoise` gives ``Lambda_jj = 1/(2 y_j)``).

Backends may fuse an operator's work into their kernels; they recognise it by ``kind``:

* ``"mask"``: ``A = diag(m)`` in pixel space: the operator's ``pixel_mask(x)`` gives ``m`` (None
  for the identity), and :func:`dps_fast.operators.masks.pixel_terms` folds a measurement's
  weight into ``m`` and ``y``;
* ``"blur"``: an FFT convolution (``Blur.residual(x, meas, ops=op_set)`` runs on the backend's
  FFT ops);
* ``"generic"``: anything else, through :meth:`Operator.residual`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

__all__ = ["Operator", "LinearOperator", "Measurement", "check_signal", "residual_norm2", "weighted_norm2"]


def check_signal(x: torch.Tensor, name: str = "x") -> int:
    """Validate a ``[B, C, L]`` or ``[B, C, H, W]`` tensor; return its number of signal axes."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(f"{name}: expected [B, C, L] or [B, C, H, W], got shape {tuple(x.shape)}")
    return x.dim() - 2


def residual_norm2(r: torch.Tensor) -> torch.Tensor:
    """``||r_n||^2`` per sample ``[N]`` of a real or complex residual ``[N, ...]``."""
    return (r.abs().square() if r.is_complex() else r.square()).flatten(1).sum(1)


def weighted_norm2(r: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """``||r_n||^2_Lambda = sum_j Lambda_j |r_nj|^2`` per sample ``[N]``; ``weight`` None is ``Lambda = I``."""
    if weight is None:
        return residual_norm2(r)
    mag2 = r.abs().square() if r.is_complex() else r.square()
    return (mag2 * weight).flatten(1).sum(1)


@dataclass
class Measurement:
    """A measurement ``y`` ``[N, *out]`` prepared for repeated residual evaluations.

    ``extra`` holds what the operator precomputes once per measurement (e.g. ``rfftn(y)``);
    ``weight`` is the diagonal ``Lambda`` ``[N, *out]`` (real, >= 0) of the weighted norm
    ``||A x - y||^2_Lambda`` (None: ``Lambda = I``, the Gaussian likelihood).
    """

    y: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)
    weight: Optional[torch.Tensor] = None


def _check_weight(weight: Optional[torch.Tensor], y: torch.Tensor) -> Optional[torch.Tensor]:
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor or None, got {type(weight).__name__}")
    if weight.is_complex() or weight.shape != y.shape or weight.device != y.device:
        raise ValueError(f"weight: expected a real tensor of y's shape {tuple(y.shape)} on {y.device}, "
                         f"got {weight.dtype} {tuple(weight.shape)} on {weight.device}")
    return weight.to(y.real.dtype if y.is_complex() else y.dtype)


def _takes_a_tensor(residual: Callable) -> Callable:
    """``residual(x, meas)`` that also accepts ``meas`` as the tensor ``y`` (prepared on the call)."""

    @functools.wraps(residual)
    def wrapped(self: "Operator", x: torch.Tensor, meas: Any, *args: Any, **kwargs: Any) -> Any:
        return residual(self, x, meas if isinstance(meas, Measurement) else self.measurement(meas), *args, **kwargs)

    return wrapped


class Operator:
    """Base class of every forward model ``y = A(x) + n`` (linear or not).

    A subclass implements :meth:`forward` (differentiable by torch) and, when ``A`` changes the
    shape, :meth:`output_shape`/:meth:`input_shape`. :meth:`residual` then works through one
    autograd VJP of ``forward``; operators override it when they know ``J^T`` in closed form.

    Example:
        >>> class Square(Operator):
        ...     def forward(self, x):
        ...         return x * x
        >>> A = Square()
        >>> x = torch.tensor([[[1.0, 2.0]]])
        >>> w, rn2 = A.residual(x, A.prepare(torch.tensor([[[0.0, 3.0]]])))
        >>> w.tolist(), rn2.tolist()   # J^T r = 2 x (x^2 - y);  ||r||^2 = 1 + 1
        ([[[2.0, 4.0]]], [2.0])
    """

    kind: str = "generic"
    linear: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # every override of residual takes y as a tensor too (see Operator.residual)
        super().__init_subclass__(**kwargs)
        if "residual" in cls.__dict__:
            cls.residual = _takes_a_tensor(cls.__dict__["residual"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``A(x)``: ``[B, C, *S]`` -> ``[B, *out]``."""
        raise NotImplementedError

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``A(x)`` for ``x`` of shape ``input_shape`` (batch axis included)."""
        return tuple(input_shape)

    def input_shape(self, output_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``x`` whose ``A(x)`` has ``output_shape`` (the sampler's state shape)."""
        return tuple(output_shape)

    def output_is_complex(self) -> bool:
        return False

    def placement(self) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
        """Where ``A`` must be evaluated: ``(device, dtype)``, None for "any" (e.g. an operator that
        wraps a module living on one GPU in float32). Measurement simulation uses it."""
        return None, None

    def describe(self) -> dict[str, Any]:
        """Extra identity of the operator for run fingerprints (beyond its scalar/tensor attributes)."""
        return {}

    # ---- what the sampler uses ------------------------------------------------------------
    def prepare(self, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> Measurement:
        """Precompute what every residual evaluation for this ``y`` needs (once per run).

        ``weight``: ``[N, *out]`` diagonal ``Lambda`` of the weighted norm, or None.
        """
        return Measurement(y, weight=_check_weight(weight, y))

    def measurement(self, meas: "Measurement | torch.Tensor") -> Measurement:
        """``meas`` as a :class:`Measurement`: one from :meth:`prepare` as it is, a tensor ``y`` prepared."""
        if isinstance(meas, Measurement):
            return meas
        if isinstance(meas, torch.Tensor):
            return self.prepare(meas)
        raise TypeError(f"meas: expected the measurement y (a tensor) or A.prepare(y), got {type(meas).__name__}")

    def vjp(self, x: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
        """``J_A(x)^T cotangent`` (real part for a real domain), shaped like ``x``: one autograd VJP."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            out = self.forward(xg)
            if not out.requires_grad:
                raise RuntimeError(f"{self!r}: A(x) does not depend on x through autograd; cannot take its VJP")
            (w,) = torch.autograd.grad(out, xg, grad_outputs=cotangent.to(out.dtype))
        return w

    def residual(self, x: torch.Tensor, meas: "Measurement | torch.Tensor") -> tuple[torch.Tensor, torch.Tensor]:
        """``(J_A(x)^T Lambda r, ||r||^2_Lambda per sample [N])`` with ``r = A(x) - y``.

        ``meas``: ``A.prepare(y)`` (what every residual of one ``y`` shares, computed once: what the
        samplers pass), or the measurement ``y`` itself, prepared on each call (``Lambda = I``).
        One forward with a graph and one VJP of ``A`` (``x`` is detached first: this never
        differentiates through the caller's graph).
        """
        meas = self.measurement(meas)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            out = self.forward(xg)
            if not out.requires_grad:
                raise RuntimeError(f"{self!r}: A(x) does not depend on x through autograd; cannot take its VJP")
            r = out.detach() - meas.y
            rw = r if meas.weight is None else r * meas.weight
            (w,) = torch.autograd.grad(out, xg, grad_outputs=rw)
        return w, weighted_norm2(r, meas.weight)


class LinearOperator(Operator):
    """A linear forward model: adds the exact adjoint ``A^H`` and ``A^H (A x - y)``.

    For a linear ``A`` the guidance VJP is the adjoint: ``residual`` is
    ``(A^H Lambda (A x - y), ||A x - y||^2_Lambda)``; operators override it to fuse.
    """

    linear = True

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``A^H y`` (the real part for real signals), shaped like ``x``."""
        raise NotImplementedError

    def vjp(self, x: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
        return self.adjoint(cotangent)

    def normal_residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``A^H (A x - y)``, shaped like ``x``."""
        return self.adjoint(self.forward(x) - y)

    def residual(self, x: torch.Tensor, meas: Measurement) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A^H Lambda (A x - y), ||A x - y||^2_Lambda per sample [N])``; operators override to fuse."""
        r = self.forward(x) - meas.y
        if meas.weight is None:
            return self.adjoint(r), residual_norm2(r)
        return self.adjoint(r * meas.weight), weighted_norm2(r, meas.weight)

    def as_matrix(self, sample_shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense matrix ``[m, d]`` of ``A`` on one sample of shape ``sample_shape`` ([C, *S])."""
        d = math.prod(sample_shape)
        eye = torch.eye(d, dtype=dtype).reshape((d,) + tuple(sample_shape))
        return self.forward(eye).reshape(d, -1).transpose(0, 1).contiguous()
