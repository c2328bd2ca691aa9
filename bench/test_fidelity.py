"""Posterior fidelity per method and problem (dps_fast.fidelity) at one setting each, as a
pytest-benchmark suite: each case times one ``sample`` call and records its fidelity against the
exact posterior, as ratios to baselines of the same run: sliced W2 over the exact-sample floor,
and seconds over DPS's at the same number of steps (DPS's timed once per problem and number of
steps; the exact draws and the floor computed once per problem). The full grid is
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


@pytest.fixture(scope="module")
def baselines():
    """What depends on the problem only, computed once per problem: the exact reference draws,
    the exact-sample floor; and per (problem, steps) DPS's sampler and seconds (the baseline of
    every method at that number of steps)."""
    exact: dict[str, tuple] = {}
    dps: dict[tuple[str, int], tuple] = {}

    def exact_of(p):
        if p.name not in exact:
            reference, sets = exact_draws(p, SAMPLES, 0)
            exact[p.name] = (reference, floor_row(p, SAMPLES, 0, reference, sets))
        return exact[p.name]

    def dps_of(p, steps):
        if (p.name, steps) not in dps:
            sched = NoiseSchedule.linear(1000).respace(steps)
            sampler = make_sampler("DPS", p, sched, SETTINGS["DPS"][1])
            fn = (lambda: sampler.sample(p.y, num_samples=SAMPLES, seed=0))
            # one warm-up call: the first sample call of the session costs ~4x a later one (lazy
            # set-up of torch), and this one time is every method's baseline for the problem
            dps[(p.name, steps)] = (fn, interleaved_medians({"DPS": fn}, reps=1, warmup=1)["DPS"])
        return dps[(p.name, steps)]

    return exact_of, dps_of


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("problem", PROBLEMS)
def test_fidelity(benchmark, problems, baselines, problem, method):
    p = problems[problem]
    why = unsupported(method, p)
    if why:
        pytest.skip(why)
    exact_of, dps_of = baselines
    steps, value = SETTINGS[method]
    dps_fn, dps_s = dps_of(p, steps)
    if method == "DPS":  # the baseline itself (its seconds were timed when it was built)
        fn, medians = dps_fn, {"DPS": dps_s}
    else:
        sampler = make_sampler(method, p, NoiseSchedule.linear(1000).respace(steps), value)
        fn = (lambda: sampler.sample(p.y, num_samples=SAMPLES, seed=0))
        medians = interleaved_medians({method: fn}, reps=1, warmup=0) | {"DPS": dps_s}
    res = benchmark.pedantic(fn, rounds=1, iterations=1)
    reference, floor = exact_of(p)
    got = sample_metrics(res.samples[0, :, 0], p, reference)
    benchmark.extra_info.update(gpu_info() | {
        "problem": problem, "method": method, "steps": steps, "value": value, "samples": SAMPLES, "nfe": res.nfe,
        "dtype": "float64", "metrics": got, "floor": {"mean_rel_err": floor.mean_rel_err, "cov_rel_err": floor.cov_rel_err, "sw2": floor.sw2,
                                  "mode_tv": floor.mode_tv},
        "sw2_over_floor": got["sw2"] / floor.sw2,
        "seconds_interleaved": medians, "seconds_over_dps_same_steps": medians[method] / medians["DPS"],
    })
    assert torch.isfinite(res.samples).all()
