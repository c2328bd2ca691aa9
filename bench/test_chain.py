"""The chain loop every method shares (dps_fast.chain.run_chain): ``DPS.sample`` against the bare
loop of ``backend.step`` over the same problem, interleaved. The ratio is what the loop adds per
chain (seeds, x_T, progress bar, trajectory bookkeeping, the per-step non-finite check on CPU);
run it on a commit before the loop moved out of ``DPS.sample`` to compare. A step of the
demo's exact mixture eps at 64 samples costs ~1 ms, so loop overhead is as visible as it gets."""

import pytest
import torch

from _timing import interleaved_medians
from _util import gpu_info
from dps_fast import DPS, NoiseSchedule
from dps_fast.problems import demo_problem

K, SAMPLES = 50, 64


@pytest.fixture(scope="module")
def contenders():
    p = demo_problem()
    sched = NoiseSchedule.linear(1000).respace(K)
    dps = DPS(p.prior.eps_model(sched), sched, p.operator, zeta=0.3 / K, sigma_n=p.sigma_n, backend="torch")

    def bare():
        prob, x = dps.prepare(p.y, SAMPLES, seed=0)
        be = dps.backend(x.device)
        with prob.net.frozen():
            for i in range(K - 1, -1, -1):
                out = be.step(prob, x, i, final=(i == 0), in_place=True)
        return out.x0hat

    fns = {"bare loop": bare, "DPS.sample": lambda: dps.sample(p.y, SAMPLES, seed=0).samples}
    return fns, interleaved_medians(fns, reps=15)  # timed once; both variants' rows record it


@pytest.mark.parametrize("variant", ["bare loop", "DPS.sample"])
def test_chain_overhead(benchmark, contenders, variant):
    fns, medians = contenders
    benchmark.extra_info.update(gpu_info() | {
        "steps": K, "samples": SAMPLES, "dtype": "float64", "median_s_interleaved": medians,
        "sample_over_bare_loop": medians["DPS.sample"] / medians["bare loop"]})
    out = benchmark.pedantic(fns[variant], rounds=5, iterations=1, warmup_rounds=1)
    assert torch.isfinite(out).all()
