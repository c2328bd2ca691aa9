"""Posterior fidelity per method and problem (dps_fast.fidelity) at one setting each, as a
pytest-benchmark suite: each case times one ``sample`` call and records its fidelity against the
exact posterior, as ratios to baselines of the same run: sliced W2 over the exact-sample floor,
and seconds over DPS's at the same number of steps (interleaved). The full grid is
``dps-fast fidelity``; this suite is the per-commit check of the same numbers."""

import pytest
import torch

from _timing import interleaved_medians
from _util import gpu_info
from dps_fast import NoiseSchedule
from dps_fast.fidelity import (
    METHODS, PROBLEMS, build_problems, exact_draws, floor_row, make_sampler, sample_metrics, unsupported,
)

SAMPLES = 500
# (steps, hyperparameter): DPS/MCG zeta = c / K with c = 0.3 (inside every problem's good range in
# the fidelity scan), PiGDM's own scale 1, DDRM the paper's eta = 0.85 at its few-step regime
SETTINGS = {"DPS": (100, 0.3 / 100), "MCG": (100, 0.3 / 100), "PiGDM": (100, 1.0), "DDRM": (20, 0.85)}


@pytest.fixture(scope="module")
def problems():
    return build_problems()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("problem", PROBLEMS)
def test_fidelity(benchmark, problems, problem, method):
    p = problems[problem]
    why = unsupported(method, p)
    if why:
        pytest.skip(why)
    steps, value = SETTINGS[method]
    sched = NoiseSchedule.linear(1000).respace(steps)
    sampler = make_sampler(method, p, sched, value)
    dps = make_sampler("DPS", p, sched, SETTINGS["DPS"][1])
    fns = {method: lambda: sampler.sample(p.y, num_samples=SAMPLES, seed=0),
           "DPS": lambda: dps.sample(p.y, num_samples=SAMPLES, seed=0)}
    medians = interleaved_medians(fns, reps=1, warmup=0)
    res = benchmark.pedantic(fns[method], rounds=1, iterations=1)
    reference, sets = exact_draws(p, SAMPLES, 0)
    got = sample_metrics(res.samples[0, :, 0], p, reference)
    floor = floor_row(p, SAMPLES, 0, reference, sets)
    benchmark.extra_info.update(gpu_info() | {
        "problem": problem, "method": method, "steps": steps, "value": value, "samples": SAMPLES, "nfe": res.nfe,
        "dtype": "float64", "metrics": got, "floor": {"mean_rel_err": floor.mean_rel_err, "cov_rel_err": floor.cov_rel_err, "sw2": floor.sw2,
                                  "mode_tv": floor.mode_tv},
        "sw2_over_floor": got["sw2"] / floor.sw2,
        "seconds_interleaved": medians, "seconds_over_dps_same_steps": medians[method] / medians["DPS"],
    })
    assert torch.isfinite(res.samples).all()
