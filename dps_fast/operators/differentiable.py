"""``Differentiable(fn)``: any callable or ``nn.Module`` ``A(x)`` that torch can differentiate.

The guidance needs ``w = J_A(x0hat)^T Lambda (A(x0hat) - y)``: one forward of ``fn`` with a
graph and one vector-Jacobian product (the sampler adds the score network's input-only VJP, as
for every operator). So a step with a user operator costs the built-in step plus ``fn``'s own
forward and backward, nothing else. ``linear=True`` declares ``A`` linear: the object is then
also a :class:`~dps_fast.operators.LinearOperator` whose ``adjoint(y)`` is the VJP of ``fn``
(at zero; for a linear map it is the same everywhere) and whose guidance VJP *is* ``A^H r``.

While a VJP runs, the parameters of an ``nn.Module`` ``fn`` are frozen (``requires_grad`` off,
restored after) so autograd keeps only what the input gradient needs, as the score network does.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

from .base import LinearOperator, Measurement, Operator

__all__ = ["Differentiable"]

ShapeSpec = Union[None, tuple[int, ...], Callable[[tuple[int, ...]], tuple[int, ...]]]


@contextlib.contextmanager
def _frozen(fn: Any) -> Iterator[None]:
    params = [p for p in fn.parameters() if p.requires_grad] if isinstance(fn, nn.Module) else []
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(memoryview(t.view(torch.uint8).reshape(-1).numpy()))


def _shape_tuple(value: Any, name: str) -> Optional[tuple[int, ...]]:
    if value is None or callable(value):
        return None
    try:
        shape = tuple(int(s) for s in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected None, a per-sample shape tuple or a callable, got {value!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"{name}: expected a per-sample shape of positive sizes (no batch axis), got {value!r}")
    return shape


class Differentiable(Operator):
    """A forward model given as a differentiable callable ``fn(x) -> y`` (batched: ``[B, ...]``).

    Args:
        fn: a function or ``nn.Module``; ``fn(x)`` for ``x`` ``[B, C, *S]`` returns ``[B, *out]``.
        output_shape: the per-sample shape ``[*out]`` of ``fn(x)`` (no batch axis), a callable
            mapping the full input shape to the full output shape, or None: found by running
            ``fn`` once without a graph on a zero input (on the module's device/dtype).
        linear: declare ``A`` linear (then this is also a ``LinearOperator`` with ``adjoint``).
        input_shape: the per-sample shape ``[C, *S]`` of ``x``; needed when ``fn`` changes the
            shape (the sampler finds ``x``'s shape from ``y``'s). None: ``x`` has ``y``'s shape.
        complex_output: ``fn`` returns complex measurements.
        device, dtype: where ``fn`` must run (default: an ``nn.Module``'s parameters'; else
            anywhere); measurement simulation uses them.

    Example:
        >>> A = Differentiable(lambda x: torch.tanh(x) ** 2)
        >>> x, y = torch.zeros(1, 1, 3), torch.ones(1, 1, 3)
        >>> w, rn2 = A.residual(x, A.prepare(y))
        >>> rn2.tolist(), A.linear
        ([3.0], False)
        >>> L = Differentiable(torch.nn.Linear(4, 2, bias=False), output_shape=(1, 2), linear=True,
        ...                    input_shape=(1, 4))
        >>> isinstance(L, LinearOperator), L.adjoint(torch.ones(1, 1, 2)).shape
        (True, torch.Size([1, 1, 4]))
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "Differentiable":
        linear = kwargs.get("linear", args[2] if len(args) > 2 else False)
        if linear and cls is Differentiable:
            cls = LinearDifferentiable
        return super().__new__(cls)

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], output_shape: ShapeSpec = None,
                 linear: bool = False, *, input_shape: Optional[tuple[int, ...]] = None,
                 complex_output: bool = False, device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        if not callable(fn):
            raise TypeError(f"fn: expected a callable or nn.Module A(x), got {type(fn).__name__}")
        if not isinstance(linear, bool):
            raise TypeError(f"linear: expected a bool, got {type(linear).__name__}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
        self.fn = fn
        self.linear = linear
        self._out_spec = output_shape
        self._out_sample = _shape_tuple(output_shape, "output_shape")
        self._in_sample = _shape_tuple(input_shape, "input_shape")
        if input_shape is not None and callable(input_shape):
            raise TypeError(f"input_shape: expected a per-sample shape tuple, got {input_shape!r}")
        self.complex_output = bool(complex_output)
        self._device = torch.device(device) if device is not None else None
        self._dtype = dtype
        self._probed: dict[tuple[int, ...], tuple[int, ...]] = {}

    # ---- where and what -------------------------------------------------------------------
    def placement(self) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
        dev, dt = self._device, self._dtype
        if isinstance(self.fn, nn.Module):
            p = next(iter(self.fn.parameters()), None)
            if p is None:
                p = next(iter(self.fn.buffers()), None)
            if p is not None:
                dev = dev or p.device
                dt = dt or (p.dtype if p.is_floating_point() else None)
        return dev, dt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x)
        if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != x.shape[0]:
            raise TypeError(f"fn: expected A(x) to return a tensor [B, ...] with B = {x.shape[0]}, got "
                            f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
        return out

    def output_is_complex(self) -> bool:
        return self.complex_output

    def _probe(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        key = (1,) + tuple(input_shape[1:])
        out = self._probed.get(key)
        if out is None:
            dev, dt = self.placement()
            x = torch.zeros(key, device=dev or "cpu", dtype=dt or torch.float32)
            try:
                with torch.no_grad():
                    out = tuple(self.forward(x).shape)
            except Exception as exc:  # the user's fn: whatever it raises, say what was tried
                raise ValueError(f"output_shape: running fn on a zero input of shape {key} to find its output "
                                 f"shape failed ({type(exc).__name__}: {exc}); pass output_shape=") from exc
            self._probed[key] = out
        return (input_shape[0],) + out[1:]

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        input_shape = tuple(input_shape)
        if callable(self._out_spec):
            return tuple(self._out_spec(input_shape))
        if self._out_sample is not None:
            return (input_shape[0],) + self._out_sample
        return self._probe(input_shape)

    def input_shape(self, output_shape: tuple[int, ...]) -> tuple[int, ...]:
        output_shape = tuple(output_shape)
        if self._in_sample is not None:
            return (output_shape[0],) + self._in_sample
        if self._out_sample is not None and self._out_sample != output_shape[1:]:
            raise ValueError(f"input_shape: {self!r} gives measurements of per-sample shape {self._out_sample}, "
                             f"got y of shape {output_shape}; when A changes the shape pass input_shape=(C, *S)")
        if self._out_sample is None and not callable(self._out_spec):
            probed = self._probe(output_shape)
            if probed != output_shape:
                raise ValueError(f"input_shape: {self!r} changes the shape (an x of y's shape {output_shape} gives "
                                 f"{probed}), so x's shape cannot be taken from y's; pass input_shape=(C, *S)")
        return output_shape

    def describe(self) -> dict[str, Any]:
        """Identity for run fingerprints: the callable's name and a hash of its weights (a module's
        state_dict) or of its code, constants and closure."""
        h = hashlib.blake2b(digest_size=12)
        fn = self.fn
        if isinstance(fn, nn.Module):
            for k, t in fn.state_dict().items():
                h.update(k.encode())
                _hash_tensor(h, t)
        else:
            code = getattr(fn, "__code__", None)
            if code is not None:
                h.update(code.co_code)
                h.update(repr(code.co_consts).encode())
            for cell in getattr(fn, "__closure__", None) or ():
                v = cell.cell_contents
                if isinstance(v, torch.Tensor):
                    _hash_tensor(h, v)
                else:
                    h.update(repr(v).encode())
        name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        return {"fn": f"{getattr(fn, '__module__', '')}.{name}", "fn_hash": h.hexdigest(),
                "output_shape": None if self._out_sample is None else list(self._out_sample),
                "input_shape": None if self._in_sample is None else list(self._in_sample)}

    # ---- guidance -------------------------------------------------------------------------
    def vjp(self, x: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
        with _frozen(self.fn):
            return Operator.vjp(self, x, cotangent)

    def residual(self, x: torch.Tensor, meas: Measurement) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward of ``fn`` with a graph and one VJP: ``(J^T Lambda r, ||r||^2_Lambda)``."""
        with _frozen(self.fn):
            return Operator.residual(self, x, meas)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or type(self.fn).__name__
        return f"Differentiable({name}, linear={self.linear})"


class LinearDifferentiable(Differentiable, LinearOperator):
    """``Differentiable(fn, linear=True)``: ``adjoint(y)`` is the VJP of ``fn`` (at zero)."""

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        x_shape = self.input_shape(tuple(y.shape))
        dtype = y.real.dtype if y.is_complex() else y.dtype
        x = torch.zeros(x_shape, device=y.device, dtype=dtype)
        return self.vjp(x, y)

    def normal_residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.prepare(y))[0]
