"""CUDA-graph capture of one whole guided step, replayed for every step of the chain.

A DPS step launches hundreds of kernels (the network forward, its VJP, the operator, the fused
update); at small batch the launch and Python overhead can rival the GPU work. The step is
captured once into a CUDA graph with static buffers, and each of the K-1 guided steps is a replay:
before it, three tiny device copies load the step's coefficient row, its timesteps and its Philox
step counter into those buffers (the update kernel reads the counter on the device, so the noise
is the same stream as without graphs). The final step (x0hat(x_1), no VJP) runs eagerly.

Requirements: CUDA tensors, a fused backend ("torch" or "triton"), static shapes, and a network
without host synchronisation in its forward/backward.

Capture and replay run with the state's device made current (``torch.cuda.device(x.device)``):
``torch.cuda.graph`` captures, and Triton launches, on the *current* device's stream, so a state
on ``cuda:1`` in a process whose current device is 0 would otherwise be captured on device 0.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from .backends.base import Backend, FusedBackend, StepOutput, StepProblem

logger = logging.getLogger(__name__)

__all__ = ["GraphedStep"]


class GraphedStep:
    """One captured guided step over the state buffer ``x`` (updated in place by each replay).

    Example:
        >>> p, x = dps.prepare(y, num_samples=4, seed=0)              # doctest: +SKIP
        >>> g = GraphedStep(dps.backend(y.device), p, x)              # doctest: +SKIP
        >>> for i in range(K - 1, 0, -1): out = g.replay(i)           # doctest: +SKIP
    """

    def __init__(self, backend: Backend, p: StepProblem, x: torch.Tensor, warmup: int = 2) -> None:
        if x.device.type != "cuda":
            raise ValueError(f"cuda_graph: needs CUDA tensors, got the state on {x.device}")
        if not isinstance(backend, FusedBackend) or backend.name == "cuda":
            raise ValueError(f"cuda_graph: needs backend 'torch' or 'triton', got {backend.name!r}")
        self.backend, self.source, self.x = backend, p, x
        self.coefs = p.table[0].clone()
        self.t = p.t[0].clone()
        self.step_counter = p.t.new_zeros(1)  # int64 on the state's device
        self.p = dataclasses.replace(p, table=self.coefs.view(1, -1), t=self.t.view(1, -1))
        with torch.cuda.device(x.device):
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):  # compile kernels, pick algorithms, build FFT plans
                for _ in range(warmup):
                    backend.step(self.p, x.clone(), 0, step=self.step_counter)
            torch.cuda.current_stream(x.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out: StepOutput = backend.step(self.p, x, 0, in_place=True, step=self.step_counter)
        logger.info("captured one DPS step as a CUDA graph on %s (state %s)", x.device, tuple(x.shape))

    def replay(self, i: int) -> StepOutput:
        """Run guided step ``i`` (``K-1 >= i >= 1``) on ``self.x``; outputs live in static buffers."""
        with torch.cuda.device(self.x.device):
            self.coefs.copy_(self.source.table[i])
            self.t.copy_(self.source.t[i])
            self.step_counter.fill_(i)
            self.graph.replay()
        return self.out
