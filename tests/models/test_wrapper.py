"""ScoreNetwork: compiled once per run (dynamic batch, padded single rows, the final forward in
the traced mode, uncompiled side calls) and the channels_last default.

Compiles are counted with a custom ``torch.compile`` backend that records each dynamo trace and
runs the traced graph eagerly (the count is what matters; inductor would only make it slower)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dps_fast import DPS, NoiseSchedule, operators
from dps_fast.backends import torch_ops
from dps_fast.models.wrapper import ScoreNetwork, default_channels_last, run_uncompiled
from tests.nets import TinyEps, UntrainedDPS

F64 = torch.float64


class CountingBackend:
    """A ``torch.compile`` backend that counts dynamo traces and runs each traced graph eagerly."""

    def __init__(self) -> None:
        self.traces = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]):
        self.traces += 1
        return gm.forward


@pytest.fixture
def counting():
    torch._dynamo.reset()
    yield CountingBackend()
    torch._dynamo.reset()


def _net(counting: CountingBackend, dtype=F64) -> tuple[torch.nn.Module, ScoreNetwork]:
    model = TinyEps(3, 8, learn_sigma=True).to(dtype).eval()
    return model, ScoreNetwork(model, compile=True, compile_options={"backend": counting})


def _fwd_vjp(net: ScoreNetwork, x: torch.Tensor, w: torch.Tensor, graph: bool = True):
    t = torch.full((x.shape[0],), 321, dtype=torch.int64)
    x_in, out = net.forward(x, t, graph=graph)
    u = net.vjp(out[:, :3], x_in, w) if graph else None
    return out, u


def test_batch_sizes_single_rows_and_final_forward_share_one_trace(counting):
    model, net = _net(counting)
    eager = ScoreNetwork(model, compile=False)
    g = torch.Generator().manual_seed(0)
    with net.frozen():
        for b in (4, 2, 7, 1, 3, 1):  # auto batch, halving, a last partial chunk, single rows
            x = torch.randn(b, 3, 6, 5, generator=g, dtype=F64)
            w = torch.randn(b, 3, 6, 5, generator=g, dtype=F64)
            out, u = _fwd_vjp(net, x, w)
            ref_out, ref_u = _fwd_vjp(eager, x, w)
            # the same float64 ops in the same order: a padded row must not change the result
            torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(u, ref_u, rtol=1e-12, atol=1e-14)
        final, _ = _fwd_vjp(net, x, w, graph=False)  # the final step: no VJP, no graph kept
        assert not final.requires_grad
        torch.testing.assert_close(final, ref_out, rtol=1e-12, atol=1e-14)
    assert counting.traces == 1


def test_uncompiled_block_runs_the_eager_module_and_traces_nothing(counting):
    model, net = _net(counting)
    calls = []
    model.register_forward_hook(lambda mod, args, out: calls.append(torch.compiler.is_compiling()))
    x, w = torch.randn(3, 3, 6, 5, dtype=F64), torch.randn(3, 3, 6, 5, dtype=F64)
    with net.frozen(), run_uncompiled():
        _fwd_vjp(net, x, w)
        _fwd_vjp(net, x[:1], w[:1], graph=False)
    assert counting.traces == 0 and calls == [False, False]
    with net.frozen():
        _fwd_vjp(net, x, w)
    assert counting.traces == 1


def test_a_first_single_row_call_traces_static_then_once_dynamic(counting):
    """The documented exception: a run that starts with ONE row traces for batch 1, and a later
    larger batch traces once more (dynamo specialises size 1)."""
    _, net = _net(counting)
    with net.frozen():
        for b in (1, 1, 3, 5, 1):
            _fwd_vjp(net, torch.randn(b, 3, 4, 4, dtype=F64), torch.randn(b, 3, 4, 4, dtype=F64))
    assert counting.traces == 2


def test_dps_sample_compiles_once_across_calls_of_other_sizes(counting):
    A = operators.GaussianBlur(1.0, 5)
    model = TinyEps(3, 8).to(F64)
    sched = NoiseSchedule.linear(1000).respace(3)
    dps = UntrainedDPS(model, sched, A, zeta=0.3, sigma_n=0.1, backend="torch", compile={"backend": counting})
    eager = UntrainedDPS(model, sched, A, zeta=0.3, sigma_n=0.1, backend="torch", compile=False)
    g = torch.Generator().manual_seed(1)
    for b, s in ((2, 2), (1, 3), (1, 1)):
        y = torch.randn(b, 3, 6, 6, generator=g, dtype=F64)
        a, e = dps.sample(y, num_samples=s, seed=4), eager.sample(y, num_samples=s, seed=4)
        torch.testing.assert_close(a.samples, e.samples, rtol=1e-10, atol=1e-12)
    assert counting.traces == 1


@pytest.mark.parametrize("explicit", [None, True, False], ids=["auto", "on", "off"])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_channels_last_default(device, autocast, explicit):
    module = torch.nn.Conv2d(3, 3, 1)
    got = default_channels_last(explicit, autocast, torch.device(device), module)
    want = explicit if explicit is not None else (device == "cuda" and autocast is not None)
    assert got is want
    # a plain function (no module to convert) never runs channels_last by default
    assert default_channels_last(None, autocast, torch.device(device), lambda x, t: x) is False


def test_channels_last_must_be_none_or_bool():
    with pytest.raises(TypeError, match="channels_last: expected None .* got 'yes'"):
        DPS(TinyEps(3, 8), NoiseSchedule.linear(1000).respace(2), operators.GaussianBlur(1.0, 5), channels_last="yes")


def test_dps_channels_last_auto_keeps_cpu_models_nchw():
    """On the CPU the auto default changes nothing, with or without autocast."""
    A = operators.GaussianBlur(1.0, 5)
    y = torch.randn(1, 3, 8, 8)
    for ac in (None, torch.bfloat16):
        model = TinyEps(3, 8)
        dps = DPS(model, NoiseSchedule.linear(1000).respace(2), A, compile=False, autocast=ac)
        assert dps.channels_last is None
        assert dps.network(y.device).channels_last is False
        assert model.c1.weight.is_contiguous()
    model = TinyEps(3, 8)
    dps = DPS(model, NoiseSchedule.linear(1000).respace(2), A, compile=False, channels_last=True)
    assert dps.network(y.device).channels_last is True
    assert model.c1.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("autocast", [torch.bfloat16, None], ids=["bf16", "f32"])
def test_channels_last_output_comes_back_contiguous(autocast):
    """A channels_last network returns channels_last; forward hands the state ops NCHW memory
    (folded into the cast under autocast), so eps = out[:, :C] and v = out[:, C:] have contiguous
    samples and the fused ops read them in place instead of copying them once per op. The values
    and the VJP through that copy match the same network run NCHW."""
    model = TinyEps(3, 8, learn_sigma=True).eval()
    ref = ScoreNetwork(TinyEps(3, 8, learn_sigma=True).eval(), autocast=autocast)  # same seed, NCHW
    net = ScoreNetwork(model, autocast=autocast, channels_last=True)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    t = torch.full((2,), 321, dtype=torch.int64)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        raw = model(x.contiguous(memory_format=torch.channels_last), t)
    assert not raw.is_contiguous()  # what the network itself returns: channels_last
    with net.frozen(), ref.frozen():
        x_in, out = net.forward(x, t)
        x_ref, out_ref = ref.forward(x, t)
        assert x_in.is_contiguous(memory_format=torch.channels_last)
        assert out.dtype == torch.float32 and out.is_contiguous()
        eps, v = out[:, :3], out[:, 3:]
        assert torch_ops.sample_stride(eps) == 6 * 8 * 8 and torch_ops.sample_stride(v) == 6 * 8 * 8
        u, u_ref = net.vjp(eps, x_in, w), ref.vjp(out_ref[:, :3], x_ref, w)
    tol = dict(rtol=2e-2, atol=2e-2) if autocast is not None else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, out_ref, **tol)
    torch.testing.assert_close(u, u_ref, **tol)
    # the copy is made once, in forward: the same-dtype path too (no cast to fold it into)
    _, out2 = net.forward(x, t, graph=False)
    assert out2.is_contiguous() and not out2.requires_grad


def test_docstring_examples():
    import doctest

    from dps_fast.models import wrapper

    result = doctest.testmod(wrapper, extraglobs={"torch": torch})
    assert result.failed == 0 and result.attempted > 0
