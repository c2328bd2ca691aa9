"""Divergence: NaN/inf and runaway growth that stays finite both raise NonFiniteError naming the step."""

from types import SimpleNamespace

import pytest
import torch

from dps_fast import DPS, NoiseSchedule, NonFiniteError, operators
from dps_fast.demo import DEFAULT_ZETA
from dps_fast.divergence import RUNAWAY_FACTOR, DivergenceGuard, runaway_limits, zeta_hint
from dps_fast.problems import demo_problem


def _demo_dps(zeta: float, steps: int) -> tuple[DPS, torch.Tensor]:
    p = demo_problem(seed=0)
    sched = NoiseSchedule.linear(1000).respace(steps)
    return DPS(p.prior.eps_model(sched), sched, p.operator, zeta=zeta, sigma_n=p.sigma_n, backend="torch"), p.y


def test_finite_runaway_raises_and_names_the_step():
    # Demo problem, 50 steps, zeta 0.04 (8x the tuned value): without the rule this run returned
    # finite samples of size ~2e7 (measured with the rule off: max |x| 1.8e7) and no error.
    dps, y = _demo_dps(0.04, 50)
    seen = []
    with pytest.raises(NonFiniteError, match=r"x_t ran away at step i=\d+ .*smaller zeta") as info:
        dps.sample(y, num_samples=16, seed=0, callback=lambda i, x, x0: seen.append(float(x.abs().max())))
    err = info.value
    assert err.kind == "runaway" and 0 < err.step < 50
    assert err.timestep == int(dps.schedule.timesteps[err.step])
    assert all(v < 1e30 for v in seen), "the state was still finite and far from overflow when reported"


def test_healthy_chains_are_not_flagged():
    # The demo's tuned zeta and 4x it (the figure's "too large") stay below RMS 2.3 (measured).
    for zeta in (DEFAULT_ZETA, 4 * DEFAULT_ZETA):
        dps, y = _demo_dps(zeta, 50)
        assert torch.isfinite(dps.sample(y, num_samples=16, seed=0).samples).all()


def test_runaway_check_can_be_switched_off_on_an_instance():
    dps, y = _demo_dps(0.04, 50)
    dps.runaway_factor = None
    res = dps.sample(y, num_samples=4, seed=0)  # finite but huge: exactly what the rule reports
    assert res.samples.abs().max() > 1e5


def test_limits_follow_the_schedule():
    sched = NoiseSchedule.linear(1000).respace(7)
    abar = [float(a) for a in sched.alphas_cumprod]
    want = [RUNAWAY_FACTOR * (a / abar[-1] + 1 - a) ** 0.5 for a in abar]
    assert runaway_limits(sched).tolist() == pytest.approx(want, rel=1e-12)
    assert runaway_limits(sched, 3.0)[-1] == pytest.approx(3.0 * (2 - abar[-1]) ** 0.5)
    with pytest.raises(ValueError, match="factor"):
        runaway_limits(sched, 0.0)


@pytest.mark.parametrize("scale, kind", [(0.99, None), (1.01, "runaway"), (float("nan"), "non-finite")],
                         ids=["just-below", "just-above", "nan-state"])
def test_guard_flags_the_first_bad_step(scale, kind):
    sched = NoiseSchedule.linear(1000).respace(6)
    guard = DivergenceGuard(sched, torch.device("cpu"))
    ok = SimpleNamespace(rnorm2=torch.ones(3), x=torch.zeros(3, 5), nfe=2)
    guard.observe(5, ok)
    # one of three samples has RMS = scale * the limit of state index 3 (made by step 4)
    x = torch.zeros(3, 5, dtype=torch.float64)
    x[1] = scale * float(guard.limits[3])
    guard.observe(4, SimpleNamespace(rnorm2=torch.ones(3), x=x, nfe=2))
    guard.observe(3, SimpleNamespace(rnorm2=torch.full((3,), float("nan")), x=x, nfe=2))
    with pytest.raises(NonFiniteError) as info:
        guard.check(zeta_hint(0.1))
    assert (info.value.kind, info.value.step) == ((kind, 4) if kind else ("non-finite", 3))
    if kind is None:  # a NaN residual from a state in the schedule's range: the network's doing, not zeta's
        assert "network returned non-finite values" in str(info.value) and "zeta" not in str(info.value)
    else:
        assert "zeta (now 0.1)" in str(info.value) and "nan" not in str(info.value)


def test_nonfinite_still_reported_as_before():
    sched = NoiseSchedule.linear(1000).respace(4)
    guard = DivergenceGuard(sched, torch.device("cpu"), factor=None)
    guard.observe(3, SimpleNamespace(rnorm2=torch.ones(2), x=torch.full((2, 3), 1e30), nfe=2))
    guard.observe(2, SimpleNamespace(rnorm2=torch.tensor([1.0, float("inf")]), x=torch.zeros(2, 3), nfe=2))
    t = int(sched.timesteps[2])
    with pytest.raises(NonFiniteError, match=rf"non-finite at step i=2 \(network timestep t={t}\).*smaller zeta"):
        guard.check(zeta_hint(0.1))


@pytest.mark.parametrize("factor", [RUNAWAY_FACTOR, None], ids=["runaway-check", "no-runaway-check"])
def test_a_non_finite_first_step_blames_the_network_not_zeta(factor):
    """x_T is finite and the first residual comes before any guidance: only the network (or the
    operator) can make it non-finite, whatever zeta is."""
    sched = NoiseSchedule.linear(1000).respace(4)
    guard = DivergenceGuard(sched, torch.device("cpu"), factor=factor)
    guard.observe(3, SimpleNamespace(rnorm2=torch.tensor([1.0, float("nan")]), x=torch.zeros(2, 3), nfe=2))
    with pytest.raises(NonFiniteError, match=r"network returned non-finite values at step i=3 \(network timestep "
                                             r"t=999\) from the start x_T") as info:
        guard.check(zeta_hint(0.1))
    assert "zeta" not in str(info.value) and info.value.kind == "non-finite"


def test_a_nan_network_in_a_real_chain_is_named():
    sched = NoiseSchedule.linear(1000).respace(5)
    nan_net = lambda x, t: x * float("nan")  # noqa: E731  (keeps the graph: DPS takes its VJP)
    dps = DPS(nan_net, sched, operators.Identity(), zeta=torch.tensor([1.0], dtype=torch.float64), sigma_n=0.1,
              backend="torch")
    with pytest.raises(NonFiniteError, match="network returned non-finite values at step i=4") as info:
        dps.sample(torch.zeros(1, 1, 8, dtype=torch.float64), num_samples=2, seed=0)
    assert "zeta" not in str(info.value) and "tensor(" not in str(info.value)


def test_messages_show_numbers_not_tensor_reprs():
    assert zeta_hint(torch.tensor([1.0], dtype=torch.float64)).endswith("(now 1)")
    assert zeta_hint(torch.tensor([0.5, 2.0])).endswith("(now [0.5, 2])")
    assert zeta_hint(torch.linspace(0.1, 0.9, 9)).endswith("(now 0.1 .. 0.9 (9 values))")
    assert "tensor(" not in zeta_hint(torch.tensor(0.25))


def test_a_bad_zeta_tensor_is_shown_as_numbers():
    sched = NoiseSchedule.linear(1000).respace(4)
    with pytest.raises(ValueError, match=r"zeta: expected finite values >= 0, got \[nan, 1\]$"):
        DPS(lambda x, t: x, sched, operators.Identity(), zeta=torch.tensor([float("nan"), 1.0]))
