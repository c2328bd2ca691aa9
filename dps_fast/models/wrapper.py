"""The score network as DPS uses it: ``eps = net(x_t, t)`` with a graph, then ONE input-only VJP.

DPS needs ``J_eps(x_t)^T w`` for one cotangent ``w`` per step and never a weight gradient. The
wrapper freezes the weights for the duration of sampling (the user's ``requires_grad`` flags are
restored afterwards), so autograd saves only what the input VJP needs, and optionally runs the
network under ``torch.compile`` (forward and backward graphs, compiled by AOTAutograd for the
input-only gradient), ``channels_last`` and autocast (bfloat16/float16) while the DPS state stays
in float32.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["ScoreNetwork", "frozen_weights"]


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


class ScoreNetwork:
    """Adapter giving ``forward(x, t) -> (x_in, out)`` with a graph and ``vjp(eps, x_in, w)``.

    Args:
        model: any callable ``model(x_t, t) -> [N, C or 2C, *S]``; ``t`` int64 ``[N]``.
        compile: wrap an ``nn.Module`` in ``torch.compile`` (default: off; the sampler turns it on
            for CUDA models).
        autocast: ``None``, ``torch.bfloat16`` or ``torch.float16``: run the network in that
            precision; its output is cast back to the state dtype.
        channels_last: convert a 4-D input (and the module) to channels_last memory format.
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

    def frozen(self) -> contextlib.AbstractContextManager:
        return frozen_weights(self.model)

    def forward(self, x: torch.Tensor, t: torch.Tensor, graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the network on a leaf copy of ``x``; returns ``(x_in, out)`` (out in x's dtype)."""
        x_in = x.detach()
        if self.channels_last and x_in.dim() == 4:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        with torch.enable_grad() if graph else torch.no_grad():
            if graph:
                x_in.requires_grad_(True)
            if self.autocast is not None:
                with torch.autocast(x.device.type, dtype=self.autocast):
                    out = self._fn(x_in, t)
            else:
                out = self._fn(x_in, t)
            if out.dtype != x.dtype:
                out = out.to(x.dtype)
        return x_in, out

    @staticmethod
    def vjp(eps: torch.Tensor, x_in: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``J_eps(x)^T w``: one input-only backward pass (no weight gradients)."""
        if not eps.requires_grad:
            raise RuntimeError(
                "model: its output does not depend on x_t through autograd (was it run under "
                "torch.no_grad or detached?); DPS needs the input VJP")
        (u,) = torch.autograd.grad(eps, x_in, grad_outputs=w)
        return u
