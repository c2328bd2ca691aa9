"""Philox4x32-10 in Triton: known answers, words bit for bit, the normal stream.

Part of the Triton backend's tests (the others: tests/kernels/test_*.py): every op against its
pure-torch reference (``torch_ops``). float64 states compare elementwise at rtol 1e-10; float32
within ``TOL``; bfloat16 by the flash-attention rule (at most 2x the error of torch_ops run in
bfloat16). Outputs are poisoned with NaN before every kernel (tests/kernels/conftest.py). On CPU
the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py), so shapes stay small.
"""

from __future__ import annotations

import pytest
import torch
from dps_fast.kernels import philox as kphilox

from dps_fast.noise import STREAM_INIT, STREAM_STEP, philox4x32, philox_normal


def test_philox_known_answers(device: torch.device) -> None:
    """Random123's Philox4x32-10 known-answer vectors, on the raw uint32 words."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, expect in cases:
        args = [torch.tensor([v], dtype=torch.int64, device=device) for v in ctr + key]
        got = [int(w) for w in kphilox.philox_words(*args)]
        assert got == list(expect)


def test_philox_words_bit_exact(device: torch.device) -> None:
    """The Triton rounds equal noise.philox4x32 bit for bit: element counters, several steps and
    streams, 64-bit seeds above 2^32 (both key words non-zero)."""
    gen = torch.Generator().manual_seed(0)
    seeds = torch.tensor([2**32 + 5, 2**62 - 1, 0x5EADBEEF12345678, 1, -3], dtype=torch.int64)
    numel = 97
    c0 = torch.arange(numel, dtype=torch.int64).repeat(len(seeds) * 3 * 2)
    cols = []
    for s in seeds.tolist():
        for step in (0, 1, 2**31 + 3):
            for stream in (STREAM_STEP, STREAM_INIT):
                cols.append((s, step, stream))
    meta = torch.tensor(cols, dtype=torch.int64).repeat_interleave(numel, 0)
    seed, step, stream = meta.unbind(1)
    c3 = torch.randint(0, 2**32, c0.shape, generator=gen, dtype=torch.int64)
    args = (c0, step & 0xFFFFFFFF, stream, c3, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    want = philox4x32(*args)
    got = kphilox.philox_words(*(a.to(device) for a in args))
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_philox_normal_stream(device: torch.device, dtype: torch.dtype) -> None:
    seeds = torch.tensor([7, 2**40 + 3, 2**62 - 11, -5], dtype=torch.int64, device=device)
    for step, stream in ((0, STREAM_STEP), (13, STREAM_STEP), (999, STREAM_INIT)):
        got = kphilox.normal(seeds, 301, step, stream, dtype)
        want = philox_normal(seeds, 301, step, stream, dtype)
        if dtype == torch.float64:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        else:
            # float32 log/cos of the interpreter (numpy) or libdevice vs torch: a few ulp
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
