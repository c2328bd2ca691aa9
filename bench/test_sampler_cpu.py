"""One DPS step, reference (autograd through the whole step) vs the torch backend (one forward
with a graph, residual outside autograd, one input-only VJP, in-place update), on every device.

Cases (``CASES``):

* ``convnet-blur``: a small conv network at ``[8, 3, 64, 64]`` with a Gaussian blur;
* ``gauss-d20-s500``: the exact eps of a d = 20 Gaussian prior, 500 samples of one measurement
  through a dense ``[10, 20]`` matrix. The network costs almost nothing here, so the step is
  dominated by what surrounds it: the noise, Tweedie and the update (issue 9 found the torch
  backend only tying the reference on it while Philox took ~60% of its step).

Each case records in ``extra_info`` the interleaved timings of both backends (``REPS`` rounds,
round-robin, so a load change on the shared machine hits both alike): medians, minima, and the
ratios ``speedup_torch_vs_reference`` (of the medians; > 1: the torch backend is faster) and
``speedup_torch_vs_reference_min`` (of the minima), plus the peak memory of each. On the CPU with
one torch thread (bench/conftest.py's default) the clock is the thread's CPU time
(``time.thread_time``): on the 2-core machines here, shared with other jobs at load 4-8, wall-clock
medians of the same step swung 2x between consecutive runs, while CPU time only counts the
cycles the step itself ran. ``clock`` in ``extra_info`` names the clock used. Timings are reported figures, never pass/fail checks (a timing assertion failed 1 run in 5
on a busy machine); the ratios are also printed, so ``pytest -s`` shows them without the JSON.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import pytest
import torch

from _memory import peak_bytes
from _timing import interleaved_times
from _util import gpu_info
from dps_fast import DPS, NoiseSchedule, operators, priors
from tests.nets import TinyEps

STEP = 500
REPS = 21


def clock_for(device: torch.device) -> tuple[str, Callable[[], float]]:
    """The thread's CPU time on a CPU run with one torch thread, else the wall clock."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return "thread_time", time.thread_time
    return "perf_counter", time.perf_counter


def _convnet_blur(backend: str, device: torch.device):
    torch.manual_seed(0)
    net = TinyEps(3, 32).to(device)
    A = operators.GaussianBlur(2.0)
    y = A(torch.rand(8, 3, 64, 64, device=device) * 2 - 1)
    dps = DPS(net, NoiseSchedule.linear(1000), A, zeta=0.5, sigma_n=0.05, guidance="normalized",
              clip_x0=(-1, 1), backend=backend, compile=False)
    return dps, y, 1


def _gauss_d20(backend: str, device: torch.device):
    g = torch.Generator().manual_seed(0)
    d, m = 20, 10
    q = torch.randn(d, d, generator=g, dtype=torch.float64)
    prior = priors.GaussianPrior(torch.randn(d, generator=g, dtype=torch.float64), q @ q.T / d + 0.1 * torch.eye(d))
    sched = NoiseSchedule.linear(1000)
    A = operators.Matrix((torch.randn(m, d, generator=g) / d**0.5).to(device))
    y = A(prior.sample(1, generator=g).float().to(device))
    dps = DPS(prior.eps_model(sched), sched, A, zeta=0.01, sigma_n=0.1, backend=backend)
    return dps, y, 500


CASES = {"convnet-blur": _convnet_blur, "gauss-d20-s500": _gauss_d20}


@pytest.fixture(scope="module", params=list(CASES))
def steppers(request):
    """Both backends' steps of one case, timed interleaved and their memory measured ONCE per
    case (both ``backend`` rows of the case record the same figures)."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fns, nets, shape = {}, [], None
    for backend in ("reference", "torch"):
        dps, y, samples = CASES[request.param](backend, dev)
        p, x = dps.prepare(y, samples, seed=0)
        be = dps.backend(dev)
        fns[backend] = (lambda be=be, p=p, x=x: be.step(p, x, STEP))
        nets.append(p.net)
        shape = list(x.shape)
    with nets[0].frozen(), nets[1].frozen():
        clock_name, clock = clock_for(dev)
        times = interleaved_times(fns, REPS, warmup=1, device=dev, clock=clock)
        medians = {k: statistics.median(v) for k, v in times.items()}
        minima = {k: min(v) for k, v in times.items()}
        mem = {k: peak_bytes(fn, dev) for k, fn in fns.items()}
        info = {"case": request.param, "shape": shape, "dtype": "float32", "clock": clock_name,
                "median_s_interleaved": medians, "min_s_interleaved": minima, "reps": REPS, "memory": mem,
                "speedup_torch_vs_reference": medians["reference"] / medians["torch"],
                "speedup_torch_vs_reference_min": minima["reference"] / minima["torch"]}
        yield fns, info


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_dps_step_cpu(benchmark, steppers, backend):
    fns, measured = steppers
    info = gpu_info() | measured | {"backend": backend}
    benchmark.extra_info.update(info)
    benchmark.pedantic(fns[backend], rounds=10, iterations=1, warmup_rounds=1)
    med, mn = info["median_s_interleaved"], info["min_s_interleaved"]
    print(f"\n[{info['case']}] reference {med['reference'] * 1e3:.2f} ms, torch {med['torch'] * 1e3:.2f} ms "
          f"(medians; minima {mn['reference'] * 1e3:.2f}, {mn['torch'] * 1e3:.2f}): torch backend "
          f"{info['speedup_torch_vs_reference']:.2f}x the reference's speed "
          f"({info['speedup_torch_vs_reference_min']:.2f}x by minima; {REPS} interleaved reps, "
          f"{torch.get_num_threads()} thread(s), clock {info['clock']})")
