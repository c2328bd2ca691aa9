"""What the ADM step benchmarks share (bench/test_step.py, bench/test_max_batch.py).

* :func:`adm_model` -- an ADMUNet preset with random weights (the compute of the checkpoint);
* :func:`flops_per_image_step` -- forward + input-only VJP FLOPs of one image, counted by
  ``torch.utils.flop_counter`` on the meta device (no compute, ~2 s for ffhq256 on a CPU);
* :func:`problem` -- a blur measurement ``y`` of a random batch;
* :func:`ours` -- one guided step of a configured :class:`~dps_fast.DPS` (eager or CUDA graph);
* :func:`floor` -- the network alone (forward + input VJP) in the same configuration;
* :func:`original` -- one step of the original DPS code path (bench/dps_original.py);
* :func:`max_batch` -- the largest batch whose step runs (doubling, then bisection).

Example:
    >>> model = adm_model("tiny32", torch.device("cpu"))            # doctest: +SKIP
    >>> step, net, p, x = ours(model, *problem(model, 4), VARIANTS["eager"])  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import functools
import gc
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from dps_fast import DPS, NoiseSchedule, operators
from dps_fast.models import ADMUNet
from dps_fast.reconstruct.batching import is_oom
from dps_original import force_reference_attention, original_dps_step

__all__ = ["Variant", "VARIANTS", "STEP", "adm_model", "flops_per_image_step", "problem", "ours", "floor",
           "original", "max_batch", "release"]

STEP = 500  # a mid-chain step: every coefficient non-trivial


@dataclass(frozen=True)
class Variant:
    """How our step runs: backend, torch.compile, autocast, CUDA graph, memory format."""

    backend: str = "triton"
    compile: bool = False
    autocast: Optional[torch.dtype] = None
    graph: bool = False
    channels_last: bool = False

    def options(self) -> dict[str, Any]:
        return {"backend": self.backend, "compile": self.compile, "autocast": self.autocast,
                "cuda_graph": self.graph, "channels_last": self.channels_last}


BF16 = torch.bfloat16
VARIANTS: dict[str, Variant] = {
    "eager": Variant("torch"),                                   # CPU: the torch backend, float32
    "bf16+graph": Variant(autocast=BF16, graph=True),
    "bf16+cl+graph": Variant(autocast=BF16, graph=True, channels_last=True),
    "bf16": Variant(autocast=BF16),
    "bf16+cl": Variant(autocast=BF16, channels_last=True),
    "compile+bf16+cl": Variant(compile=True, autocast=BF16, channels_last=True),
    "triton": Variant(),                                          # float32, for DPS_BENCH_FULL runs
}


def adm_model(config: str, device: torch.device) -> ADMUNet:
    """The ``config`` preset with seeded random weights (zero-initialised output layers perturbed,
    as in a trained checkpoint), in eval mode on ``device``."""
    torch.manual_seed(0)
    with torch.device(device):
        m = ADMUNet.from_config(config).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
    return m


@functools.lru_cache(maxsize=8)
def flops_per_image_step(config: str) -> float:
    """FLOPs of one forward + input-only VJP of one image (matmuls, convolutions, attention), as
    ``torch.utils.flop_counter.FlopCounterMode`` counts them on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        m = ADMUNet.from_config(config).eval()
    m.requires_grad_(False)
    x = torch.empty(1, m.in_channels, m.image_size, m.image_size, device="meta", requires_grad=True)
    t = torch.zeros(1, dtype=torch.int64, device="meta")
    with FlopCounterMode(display=False) as fc:
        out = m(x, t)[:, : m.in_channels]
        out.backward(torch.ones_like(out))  # weights frozen: the input gradient only
    return float(fc.get_total_flops())


def problem(model: ADMUNet, batch: int) -> tuple[operators.GaussianBlur, torch.Tensor]:
    """``(A, y)``: a Gaussian blur (sigma 3 px at 256x256) of a random batch plus noise 0.05."""
    device = next(model.parameters()).device
    size = model.image_size
    A = operators.GaussianBlur(3.0 if size >= 256 else 1.5)
    g = torch.Generator(device=device).manual_seed(1)
    x0 = torch.rand(batch, model.in_channels, size, size, device=device, generator=g) * 2 - 1
    y = A(x0) + 0.05 * torch.randn(x0.shape, device=device, generator=g)
    return A, y


def _set_format(model: torch.nn.Module, channels_last: bool) -> None:
    # Variants share one model: each sets its own memory format (ScoreNetwork only ever converts
    # to channels_last), so an NCHW variant never runs on channels_last weights.
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def ours(model: ADMUNet, A: operators.GaussianBlur, y: torch.Tensor, variant: Variant
         ) -> tuple[Callable[[], Any], Any, Any, torch.Tensor]:
    """``(step, net, problem, x)``: ``step()`` runs guided step :data:`STEP` in place on ``x``
    (call it inside ``net.frozen()``; a graph variant is captured here, frozen)."""
    _set_format(model, variant.channels_last)
    dps = DPS(model, NoiseSchedule.linear(1000), A, zeta=1.0, sigma_n=0.05, guidance="normalized",
              clip_x0=(-1, 1), **variant.options())
    p, x = dps.prepare(y, 1, seed=0)
    be = dps.backend(y.device)
    if variant.graph:
        from dps_fast.graphs import GraphedStep

        with p.net.frozen():
            g = GraphedStep(be, p, x)
        return (lambda: g.replay(STEP)), p.net, p, x
    return (lambda: be.step(p, x, STEP, in_place=True)), p.net, p, x


def floor(net: Any, p: Any, x: torch.Tensor, graph: bool = False) -> Callable[[], Any]:
    """The network floor of a step: forward with a graph + ONE input-only VJP, nothing else (same
    network wrapper, so the same precision, memory format and compile mode); with ``graph`` it is
    captured as a CUDA graph like the graphed step (call capture inside ``net.frozen()``)."""
    w = torch.randn_like(x)
    t = p.t[STEP].clone()
    c = x.shape[1]

    def fwd_vjp() -> torch.Tensor:
        x_in, out = net.forward(x, t)
        return net.vjp(out[:, :c], x_in, w)

    if not graph:
        return fwd_vjp
    side = torch.cuda.Stream(device=x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fwd_vjp()
    torch.cuda.current_stream(x.device).wait_stream(side)
    cg = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cg):
        fwd_vjp()
    return cg.replay


#: model -> its reference copy for :func:`original` (one per model, not one per call: the
#: max-batch search asks for ~10 steps of the same model); dropped with the model
_REFERENCE_COPIES: "weakref.WeakKeyDictionary[ADMUNet, ADMUNet]" = weakref.WeakKeyDictionary()


def _reference_copy(model: ADMUNet) -> ADMUNet:
    """``model`` as the original code runs it: a copy (built once per model) in NCHW, attention
    recomputed as guided-diffusion forces, weights requiring grad."""
    ref = _REFERENCE_COPIES.get(model)
    if ref is None:
        ref = copy.deepcopy(model)
        _set_format(ref, False)
        force_reference_attention(ref)
        ref.requires_grad_(True)
        _REFERENCE_COPIES[model] = ref
    return ref


def original(model: ADMUNet, A: operators.GaussianBlur, y: torch.Tensor) -> Callable[[], Any]:
    """One step of the original DPS code path on a copy of ``model`` (weights requiring grad,
    attention recomputed as guided-diffusion forces, float32, one norm over the batch); the copy
    is made at the first call for ``model`` and reused (the weights are never changed here)."""
    ref = _reference_copy(model)
    table = NoiseSchedule.linear(1000).table(torch.float32, y.device)
    x = torch.randn_like(y)
    noise = torch.randn_like(y)
    t = torch.full((y.shape[0],), STEP, dtype=torch.int64, device=y.device)
    return lambda: original_dps_step(ref, x, t, y, A, table[STEP], 1.0, noise)


def release() -> None:
    """Free what the last case left (graph pools, cached blocks) before the next one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _fits(run_at: Callable[[int], Callable[[], Any]], batch: int) -> bool:
    ok = False
    try:
        fn = run_at(batch)
        fn()
        torch.cuda.synchronize()
        ok = True
    except Exception as exc:  # noqa: BLE001 - anything but an out-of-memory error is a real failure
        if not is_oom(exc):
            raise
    finally:
        fn = None  # noqa: F841 - drop the closure (and its tensors) before emptying the cache
        release()
    return ok


def max_batch(run_at: Callable[[int], Callable[[], Any]], start: int = 1, limit: int = 4096,
              bisect_steps: int = 4) -> int:
    """Largest batch ``b`` for which ``run_at(b)()`` runs (doubling from ``start``, then
    ``bisect_steps`` bisection steps; 0 if even ``start`` does not fit). Out-of-memory errors of
    torch, cuDNN, cuBLAS and cuFFT (:func:`~dps_fast.reconstruct.batching.is_oom`) mean "does
    not fit"; any other error propagates."""
    lo, hi = 0, start
    while hi <= limit and _fits(run_at, hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    for _ in range(bisect_steps):
        mid = (lo + hi) // 2
        if mid in (lo, hi):
            break
        if _fits(run_at, mid):
            lo = mid
        else:
            hi = mid
    return lo
