"""Shared set-up of the Triton-backend tests: every output is poisoned with NaN before a kernel
writes it."""

import pytest
import torch


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.empty`` returns NaN-filled floating tensors, so unwritten outputs show up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)
