"""The score network as DPS uses it: ``eps = net(x_t, t)`` with a graph, then ONE input-only VJP.

DPS needs ``J_eps(x_t)^T w`` for one cotangent ``w`` per step and never a weight gradient. The
wrapper freezes the weights for the duration of sampling (the user's ``requires_grad`` flags are
restored afterwards), so autograd saves only what the input VJP needs, and optionally runs the
network under ``torch.compile`` (forward and backward graphs, compiled by AOTAutograd for the
input-only gradient), ``channels_last`` and autocast (bfloat16/float16) while the DPS state stays
in float32.

Compiled once per run. A compiled network is traced the first time it is called and again
whenever one of dynamo's guards fails; for an ADM UNet each trace costs minutes on a GPU. The
wrapper keeps every call of one run inside the first trace:

* the batch dimension is marked dynamic from the first call (``maybe_mark_dynamic`` on ``x`` and
  ``t``), so chunks of another size (auto batch, out-of-memory halving, a last partial chunk)
  reuse the graph instead of triggering dynamo's static-then-dynamic recompile;
* a batch of ONE row after a dynamic trace is padded to two rows (dynamo specialises sizes 0 and
  1, so a dynamic graph never serves batch 1); the second row's output gets a zero cotangent, so
  the first row's output and VJP are unchanged (per-sample networks: GroupNorm, eval-mode norms);
* ``forward(..., graph=False)`` (the final step's x0hat, which needs no VJP) still runs the traced
  forward with a graph and detaches the output, instead of a ``no_grad`` call that is a second
  (inference) trace;
* :func:`run_uncompiled` makes every compiled network run its eager module for the duration of a
  ``with`` block: memory probes and the activation-checkpointing decision of the auto batch run
  there, so switching checkpointing (a guarded attribute of ADMUNet) never retraces.

What still retraces, by design: a run whose first compiled call has ONE row (traced static) and
later calls with more rows (one more, dynamic trace); changing the weights' dtype, memory format or
``requires_grad`` (sampling always runs inside :meth:`ScoreNetwork.frozen`), or the autocast dtype.

Example:
    >>> conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    >>> net = ScoreNetwork(lambda x, t: conv(x), compile=False)
    >>> with net.frozen():
    ...     x_in, out = net.forward(torch.randn(2, 3, 8, 8), torch.tensor([5, 5]))
    >>> net.vjp(out, x_in, torch.ones_like(out)).shape
    torch.Size([2, 3, 8, 8])
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["ScoreNetwork", "frozen_weights", "run_uncompiled", "default_channels_last"]

_UNCOMPILED: contextvars.ContextVar[bool] = contextvars.ContextVar("dps_fast_uncompiled", default=False)


def _mark_dynamic(t: torch.Tensor, dim: int) -> None:
    # maybe_mark_dynamic (torch >= 2.3) does not raise when a model specialises the batch anyway
    # (mark_dynamic would raise a ConstraintViolationError). Imported here: torch._dynamo takes
    # ~2.5 s to import, which `import dps_fast` must not pay.
    import torch._dynamo

    getattr(torch._dynamo, "maybe_mark_dynamic", torch._dynamo.mark_dynamic)(t, dim)


@contextlib.contextmanager
def frozen_weights(model: Any) -> Iterator[None]:
    """Set ``requires_grad=False`` on every parameter of ``model`` (if a Module), restore after."""
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


@contextlib.contextmanager
def run_uncompiled() -> Iterator[None]:
    """Inside this block every :class:`ScoreNetwork` runs its eager module, compiled or not.

    For side calls that must not trace (or retrace) the compiled network: memory probes at
    several sizes, a checkpointing on/off comparison.

    Example:
        >>> with run_uncompiled():
        ...     pass  # probe_step(...)(rows)
    """
    token = _UNCOMPILED.set(True)
    try:
        yield
    finally:
        _UNCOMPILED.reset(token)


def default_channels_last(channels_last: Optional[bool], autocast: Optional[torch.dtype],
                          device: torch.device, model: Any) -> bool:
    """``channels_last=None`` (auto): on for an ``nn.Module`` on CUDA run under bfloat16/float16
    autocast, off otherwise; an explicit bool is kept.

    Why: cuDNN's tensor-core convolutions run NHWC natively, so half-precision NCHW convolutions
    pay layout transposes around each kernel. The GPU suite (bench/gpu_suite.sh, phase b) times
    both layouts side by side; this default is not yet backed by a GPU measurement here.

    Example:
        >>> default_channels_last(None, torch.bfloat16, torch.device("cpu"), torch.nn.Conv2d(1, 1, 1))
        False
        >>> default_channels_last(None, torch.bfloat16, torch.device("cuda"), torch.nn.Conv2d(1, 1, 1))
        True
    """
    if channels_last is not None:
        return bool(channels_last)
    return (device.type == "cuda" and autocast in (torch.bfloat16, torch.float16)
            and isinstance(model, nn.Module))


def _state_layout(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The network output in the state's dtype and contiguous (NCHW) memory, inside the graph.

    A channels_last network returns channels_last; its channel halves ``out[:, :C]``,
    ``out[:, C:]`` (eps and the variance channels) would then not be contiguous per sample, and
    every fused op that reads them in place (triton/cuda prep and dps_update) would copy them
    instead, once per op. One copy here, folded into the dtype cast when there is one, serves all.
    """
    if out.dtype != dtype:
        return out.to(dtype, memory_format=torch.contiguous_format)
    return out.contiguous()


class ScoreNetwork:
    """Adapter giving ``forward(x, t) -> (x_in, out)`` with a graph and ``vjp(eps, x_in, w)``.

    Args:
        model: any callable ``model(x_t, t) -> [N, C or 2C, *S]``; ``t`` int64 ``[N]``.
        compile: wrap an ``nn.Module`` in ``torch.compile`` (default: off; the sampler turns it on
            for CUDA models), traced once per run (see the module docstring).
        autocast: ``None``, ``torch.bfloat16`` or ``torch.float16``: run the network in that
            precision; its output is cast back to the state dtype.
        channels_last: convert a 4-D input (and the module) to channels_last memory format (the
            output is returned contiguous, so its channel halves are read in place).
        compile_options: keyword arguments of ``torch.compile`` (e.g. ``{"mode": "max-autotune"}``).
    """

    def __init__(
        self, model: Callable[..., torch.Tensor], compile: bool = False,
        autocast: Optional[torch.dtype] = None, channels_last: bool = False,
        compile_options: Optional[dict] = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model: expected a callable eps(x_t, t), got {type(model).__name__}")
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast: expected None, torch.bfloat16 or torch.float16, got {autocast!r}")
        self.model = model
        self.autocast = autocast
        self.channels_last = channels_last and isinstance(model, nn.Module)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self._fn: Callable[..., torch.Tensor] = model
        if compile and isinstance(model, nn.Module):
            self._fn = torch.compile(model, **(compile_options or {}))
        self.compiled = self._fn is not model
        self._dynamic_batch = False  # set by the first compiled call with >= 2 rows

    def frozen(self) -> contextlib.AbstractContextManager:
        return frozen_weights(self.model)

    def _call(self, fn: Callable[..., torch.Tensor], x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.autocast is not None:
            with torch.autocast(x_in.device.type, dtype=self.autocast):
                return fn(x_in, t)
        return fn(x_in, t)

    def _call_compiled(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The compiled network on one batch, inside the run's single trace (module docstring)."""
        n = x_in.shape[0]
        if t.storage_offset() != 0:
            # A row of the sampler's [K, N] timestep table sits at offset i * N; dynamo guards a
            # storage offset like a size (0/1 specialised), so each step would retrace.
            t = t.clone()
        if n == 1 and self._dynamic_batch:
            x2, t2 = torch.cat([x_in, x_in]), torch.cat([t, t])
            _mark_dynamic(x2, 0)
            _mark_dynamic(t2, 0)
            return self._call(self._fn, x2, t2)[:1]
        if n >= 2:
            _mark_dynamic(x_in, 0)
            if t.dim() >= 1 and t.shape[0] == n:
                _mark_dynamic(t, 0)
            self._dynamic_batch = True
        return self._call(self._fn, x_in, t)

    def forward(self, x: torch.Tensor, t: torch.Tensor, graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the network on a leaf copy of ``x``; returns ``(x_in, out)`` (out in x's dtype and
        contiguous, whatever the network's memory format: :func:`_state_layout`).

        ``x``: ``[N, C, *S]``; ``t``: int64 ``[N]``; ``out``: ``[N, C or 2C, *S]``. With
        ``graph=False`` the output carries no graph (a compiled network still runs its traced
        forward and detaches, so that it is not traced a second time for inference).
        """
        x_in = x.detach()
        if self.channels_last and x_in.dim() == 4:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        compiled = self.compiled and not _UNCOMPILED.get()
        if compiled and x_in.storage_offset() != 0:
            x_in = x_in.clone()  # a view at an offset: dynamo guards offsets like sizes (_call_compiled)
        with_graph = graph or compiled
        with torch.enable_grad() if with_graph else torch.no_grad():
            if with_graph:
                x_in.requires_grad_(True)
            out = self._call_compiled(x_in, t) if compiled else self._call(self.model, x_in, t)
            out = _state_layout(out, x.dtype)
        if not graph and out.requires_grad:
            out = out.detach()
            x_in = x_in.detach()
        return x_in, out

    @staticmethod
    def vjp(eps: torch.Tensor, x_in: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``J_eps(x)^T w``: one input-only backward pass (no weight gradients).

        ``eps``, ``w``: ``[N, C, *S]`` (``eps`` with a graph back to ``x_in``); returns ``[N, C, *S]``.
        """
        if not eps.requires_grad:
            raise RuntimeError(
                "model: its output does not depend on x_t through autograd (was it run under "
                "torch.no_grad or detached?); DPS needs the input VJP")
        (u,) = torch.autograd.grad(eps, x_in, grad_outputs=w)
        return u
