"""Shared test set-up: Triton runs under its CPU interpreter when no GPU is present, and one
dtype -> tolerance table for every comparison against a float64 reference."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any Triton kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Relative tolerance of a fast path against the float64 reference, per state dtype.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}

HAS_CUDA = torch.cuda.is_available()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against reference ``b`` (float64)."""
    a = a.detach().to(torch.complex128 if a.is_complex() else torch.float64)
    b = b.detach().to(torch.complex128 if b.is_complex() else torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small chains and CLI runs: on the shared 2-core CI
    machine a second OpenMP thread only oversubscribes (one tiny32 forward + VJP took 1.6-7 s
    instead of 0.07 s; a compile-count test 45 s instead of ~10 s). Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
