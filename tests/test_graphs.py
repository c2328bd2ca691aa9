"""CUDA-graph capture of a step (dps_fast.graphs) happens on the state's device.

``torch.cuda.graph`` captures on the current device's stream and Triton launches on the current
device, so GraphedStep must make the state's device current for warm-up, capture and replay. On
a machine without a GPU the CUDA calls are replaced by recorders (a state that claims to live on
``cuda:1``), which is enough to see which device was current at each point.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from dps_fast import graphs
from dps_fast.backends import torch_ops
from dps_fast.backends.base import FusedBackend, StepOutput, StepProblem
from dps_fast.schedule import NoiseSchedule

DEV1 = torch.device("cuda", 1)


class _FakeState:
    """Stands in for a state tensor on ``cuda:1`` (GraphedStep reads its device and clones it)."""

    device = DEV1
    shape = (2, 3, 4, 4)

    def clone(self) -> "_FakeState":
        return self


@pytest.fixture
def cuda_recorder(monkeypatch: pytest.MonkeyPatch) -> dict:
    rec: dict = {"current": [None], "events": []}

    @contextlib.contextmanager
    def device(d):
        rec["current"].append(torch.device(d))
        try:
            yield
        finally:
            rec["current"].pop()

    class Stream:
        def __init__(self, device=None) -> None:
            rec["events"].append(("stream", torch.device(device) if device is not None else rec["current"][-1]))

        def wait_stream(self, other) -> None:
            pass

    class CUDAGraph:
        def replay(self) -> None:
            rec["events"].append(("replay", rec["current"][-1]))

    @contextlib.contextmanager
    def graph(g, *args, **kwargs):
        rec["events"].append(("capture", rec["current"][-1]))
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(device))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    return rec


class _RecordingBackend(FusedBackend):
    def __init__(self, rec: dict) -> None:
        super().__init__(torch_ops, "triton")
        self.rec = rec

    def step(self, p, x, i, noise=None, final=False, in_place=False, step=None) -> StepOutput:
        self.rec["events"].append(("step", self.rec["current"][-1]))
        return StepOutput(None, torch.zeros(1), torch.zeros(1), 2)


def test_capture_and_replay_on_the_states_device(cuda_recorder: dict) -> None:
    sched = NoiseSchedule.linear(1000).respace(10)
    p = StepProblem(net=None, operator=None, meas=None, table=sched.table(torch.float32), t=sched.timesteps.view(10, 1),
                    zeta=torch.ones(1), normalized=torch.zeros(1, dtype=torch.bool), inv_two_sigma2=1.0, clip=None,
                    variance="fixed_small", seeds=torch.zeros(1, dtype=torch.int64), channels=3)
    g = graphs.GraphedStep(_RecordingBackend(cuda_recorder), p, _FakeState(), warmup=2)
    g.replay(5)
    g.replay(4)
    kinds = [k for k, _ in cuda_recorder["events"]]
    assert kinds.count("step") == 3 and kinds.count("capture") == 1 and kinds.count("replay") == 2
    wrong = [(k, d) for k, d in cuda_recorder["events"] if d != DEV1]
    assert not wrong, f"not on the state's device {DEV1}: {wrong}"
    assert int(g.step_counter) == 4 and torch.equal(g.coefs, p.table[4])
