"""A compiled network is traced once per reconstruct run: several chunk sizes (a full chunk,
out-of-memory halving down to single rows), the auto-batch probes and the final no-VJP step all
reuse the first trace. Counted with a ``torch.compile`` backend that records each dynamo trace
(tiny32 ADM UNet on the CPU; inductor would only add minutes, the count is the same)."""

from __future__ import annotations

import pytest
import torch

from dps_fast import NoiseSchedule, operators
from dps_fast.models import ADMUNet
from dps_fast.reconstruct import reconstruct
from dps_fast.reconstruct.runner import probe_step
from tests.models.test_wrapper import CountingBackend
from tests.nets import TinyEps, UntrainedDPS


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny32() -> ADMUNet:
    torch.manual_seed(0)
    return ADMUNet.from_config("tiny32").eval()


def test_reconstruct_traces_the_network_once(tmp_path):
    torch._dynamo.reset()
    counting = CountingBackend()
    model = _tiny32()
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    calls: list[int] = []

    def fault(rows: int) -> None:
        # chunk sizes 4 (ok), 4 (OOM) -> 2 (ok), 2 (OOM) -> 1, 1: compiled calls at 4, 2 and 1 rows
        calls.append(rows)
        if (rows == 4 and calls.count(4) == 2) or (rows == 2 and calls.count(2) == 2):
            raise torch.cuda.OutOfMemoryError("fake: CUDA out of memory")

    done = []
    summary = reconstruct(images, tmp_path / "out", model, operators.GaussianBlur(1.5), steps=2, samples=1,
                          batch_size=4, device="cpu", compile={"backend": counting}, progress=False,
                          model_id="tiny32-random", fault=fault, on_item_done=done.append)
    assert calls == [4, 4, 2, 2, 1, 1] and summary.rows == 1 and len(done) == 8
    assert counting.traces == 1
    torch._dynamo.reset()


def test_probe_runs_uncompiled_and_the_run_still_traces_once():
    torch._dynamo.reset()
    counting = CountingBackend()
    A = operators.GaussianBlur(1.0, 5)
    dps = UntrainedDPS(TinyEps(3, 8), NoiseSchedule.linear(1000).respace(2), A, sigma_n=0.05, clip_x0=(-1, 1),
              compile={"backend": counting})
    probe = probe_step(dps, (1, 3, 8, 8), (3, 8, 8), torch.device("cpu"))
    for rows in (2, 8, 1):  # auto_rows' two sizes, time_step's, an out-of-memory retry
        probe(rows)
    assert counting.traces == 0
    dps.sample(A(torch.zeros(3, 3, 8, 8)), seed=0)
    assert counting.traces == 1
    torch._dynamo.reset()
