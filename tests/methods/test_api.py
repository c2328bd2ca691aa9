"""What MCG, PiGDM and DDRM share with DPS through dps_fast.chain: the result type, seeds that
reproduce a sample whatever its batch position, record/callback/progress, frozen weights, the
non-finite error, and sample == the chain of explicit steps on the Philox noise stream."""

import pytest
import torch

from dps_fast import DPS, DPSResult, NoiseSchedule, NonFiniteError, operators
from dps_fast.methods import DDRM, MCG, PiGDM
from dps_fast.noise import STREAM_INIT, STREAM_MEASUREMENT, STREAM_STEP, philox_normal
from tests.methods._dense import F64, setup

METHODS = {
    "MCG": lambda net, s, A: MCG(net, s, A, zeta=0.05, sigma_n=0.1, backend="torch"),
    "PiGDM": lambda net, s, A: PiGDM(net, s, A, zeta=1.0, sigma_n=0.1, backend="torch"),
    "DDRM": lambda net, s, A: DDRM(net, s, A, eta=0.85, sigma_n=0.1, backend="torch"),
}
NFE = {"MCG": lambda k: 2 * k - 1, "PiGDM": lambda k: 2 * k - 1, "DDRM": lambda k: k}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_result_record_callback_progress_and_weights(method, capsys):
    A, net, y, *_ = setup("inpaint", batch=2)
    flags = [p.requires_grad for p in net.parameters()]
    sched = NoiseSchedule.linear(1000).respace(6)
    m = METHODS[method](net, sched, A)
    res = m.sample(y, num_samples=3, seed=1, record=[5, 2, 0], progress=True)
    assert isinstance(res, DPSResult)
    assert res.samples.shape == (2, 3, 3, 5, 7) and res.mean.shape == (2, 3, 5, 7)
    torch.testing.assert_close(res.mean, res.samples.mean(1))
    torch.testing.assert_close(res.std, res.samples.std(1, unbiased=False))
    assert sorted(res.trajectory) == [0, 2, 5] and torch.equal(res.trajectory[0], res.samples)
    assert res.nfe == NFE[method](6) and res.steps == 6 and res.stopped_at is None
    r = A(res.samples.flatten(0, 1)) - y.repeat_interleave(3, 0)
    torch.testing.assert_close(res.residual_norm.flatten(), r.flatten(1).norm(dim=1), rtol=1e-10, atol=1e-12)
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    assert method in capsys.readouterr().err  # the tqdm bar is labelled with the method
    seen = []
    stop = m.sample(y, seed=1, callback=lambda i, x, x0: seen.append(i) or (i > 3))
    assert seen == [5, 4, 3] and stop.stopped_at == 3


@pytest.mark.parametrize("method", sorted(METHODS))
def test_seeds_reproduce_and_do_not_depend_on_batch_layout(method):
    A, net, y, *_ = setup("matrix", batch=2)
    m = METHODS[method](net, NoiseSchedule.linear(1000).respace(5), A)
    r1 = m.sample(y, num_samples=3, seed=9)
    assert torch.equal(m.sample(y, num_samples=3, seed=9).samples, r1.samples)
    r2 = m.sample(y[1:], num_samples=3, seeds=r1.seeds[1:])
    torch.testing.assert_close(r2.samples[0], r1.samples[1], rtol=1e-12, atol=1e-12)
    assert not torch.equal(m.sample(y, num_samples=3, seed=10).samples, r1.samples)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sample_is_the_chain_of_explicit_steps_on_the_philox_stream(method):
    A, net, y, *_ = setup("superres1d", batch=1)
    K = 5
    m = METHODS[method](net, NoiseSchedule.linear(1000).respace(K), A)
    res = m.sample(y, num_samples=2, seed=3, record="all")
    seeds, numel = res.seeds.flatten(), 12
    seen = []
    if method == "DDRM":  # DDRM starts from q(x_T | y): take x_T from the sampled chain's first state
        x = None
        m2 = DDRM(lambda x, t: seen.append(x.clone()) or net(x, t), m.schedule, A, eta=0.85, sigma_n=0.1,
                  backend="torch")
        m2.sample(y, num_samples=2, seed=3)
        x = seen[-K]  # the variance probe is the call before the chain's K calls
    else:
        x = philox_normal(seeds, numel, K, STREAM_INIT, F64).view(2, 1, 12)
    for i in range(K - 1, 0, -1):
        z = philox_normal(seeds, numel, i, STREAM_STEP, F64).view_as(x)
        kw = {"noise_y": philox_normal(seeds, numel, i, STREAM_MEASUREMENT, F64).view_as(x)} if method == "MCG" else {}
        x_next, x0hat = m.step(x, i, y, z, num_samples=2, **kw)
        torch.testing.assert_close(x0hat, res.trajectory[i][0], rtol=1e-12, atol=1e-12)
        x = x_next
    if method != "MCG":  # MCG's sample is the final x0hat projected; the others' is x0hat(x_1) itself
        _, x0hat = m.step(x, 0, y, torch.zeros_like(x), num_samples=2)
        torch.testing.assert_close(x0hat, res.samples[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_nonfinite_state_names_the_step_and_what_to_change(method):
    sched = NoiseSchedule.linear(1000).respace(10)

    # the exact eps of an N(0, I) prior (x_t ~ N(0, I) at every t) until t < 500, then NaN: the
    # chain stays in the schedule's range (no runaway) and turns non-finite at step i = 4
    abar = NoiseSchedule.linear(1000).alphas_cumprod.to(F64)

    def exploding(x, t):
        scale = (1 - abar[t]).sqrt().view(-1, 1, 1).to(x.dtype)
        return torch.where(t.view(-1, 1, 1) < 500, torch.full_like(x, float("nan")), scale * x)

    # x_4 passed the runaway check, so the NaN residual of step 4 is the network's, whatever the method
    with pytest.raises(NonFiniteError, match=r"network returned non-finite values at step i=4 .*not the cause"):
        METHODS[method](exploding, sched, operators.Identity()).sample(torch.zeros(1, 1, 4, dtype=F64))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_step_argument_errors_are_named(method):
    A, net, y, x_t, noise, _ = setup("identity", batch=1, samples=1)
    m = METHODS[method](net, NoiseSchedule.linear(1000).respace(4), A)
    with pytest.raises(ValueError, match=r"i: expected a step index in \[0, 4\), got 4"):
        m.step(x_t, 4, y, noise)
    with pytest.raises(ValueError, match=r"noise: expected shape \(1, 2, 5, 3\)"):
        m.step(x_t, 1, y, noise[..., :2])
    with pytest.raises(TypeError, match="x_t: expected torch.float64"):
        m.step(x_t.float(), 1, y, noise)
    with pytest.raises(ValueError, match="y: expected finite values"):
        m.step(x_t, 1, torch.full_like(y, float("nan")), noise)


def test_a_method_is_not_a_dps_but_shares_its_api():
    A, net, *_ = setup("identity")
    sched = NoiseSchedule.linear(1000).respace(4)
    for m in (f(net, sched, A) for f in METHODS.values()):
        assert not isinstance(m, DPS)
        assert type(m).__name__ in repr(m) and "Identity()" in repr(m)


@pytest.mark.parametrize("method,option", [("DDRM", {"clip_x0": (-1.0, 1.0)}), ("DDRM", {"variance": "fixed_large"}),
                                           ("MCG", {"cuda_graph": True}), ("PiGDM", {"noise": "poisson"})])
def test_an_engine_option_a_method_does_not_use_is_refused(method, option):
    A, net, *_ = setup("identity")
    cls = {"MCG": MCG, "PiGDM": PiGDM, "DDRM": DDRM}[method]
    name = next(iter(option))
    with pytest.raises(TypeError, match=rf"{name}: {method} does not use this option"):
        cls(net, NoiseSchedule.linear(1000).respace(4), A, **option)


def test_methods_are_siblings_on_the_engine():
    """None is built on (or builds) another method: each is a direct subclass of the engine."""
    from dps_fast.engine import Engine

    for cls in (DPS, MCG, PiGDM, DDRM):
        assert cls.__bases__ == (Engine,)
