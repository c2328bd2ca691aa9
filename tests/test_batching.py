"""Out-of-memory detection of the auto batch (dps_fast.reconstruct.batching.is_oom): the errors
cuDNN, cuBLAS and cuFFT raise near the memory limit halve the chunk like torch's own
OutOfMemoryError; unrelated errors propagate at once.

The messages are the texts torch raises (RuntimeError from its CUDA-library checks) as users
reported them in public issue threads; they are built here as synthetic exceptions."""

from __future__ import annotations

import pytest
import torch

from dps_fast.reconstruct.batching import is_oom, stream_chunks

OOM_MESSAGES = {
    "torch": "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)",
    "cuda-runtime": "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
    "cudnn-not-supported": "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed "
                           "in a non-contiguous input.",
    "cudnn-alloc": "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "cudnn-internal": "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR",
    "cudnn-no-engine": "GET was unable to find an engine to execute this computation",
    "cudnn-find-no-engine": "FIND was unable to find an engine to execute this computation",
    "cublas-alloc": "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cublas-create": "CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`",
    "cufft-alloc": "cuFFT error: CUFFT_ALLOC_FAILED",
    "cufft-internal": "cuFFT error: CUFFT_INTERNAL_ERROR",
}

OTHER_ERRORS = {
    "illegal-access": RuntimeError("CUDA error: an illegal memory access was encountered"),
    "cudnn-execution": RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
    "cudnn-bad-param": RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM"),
    "cublas-execution": RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, "
                                     "opa, opb, m, n, k, &alpha, a, lda, b, ldb, &beta, c, ldc)`"),
    "cublas-not-initialized-elsewhere": RuntimeError("CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling "
                                                     "`cublasLtMatmul(...)`"),
    "cufft-invalid-plan": RuntimeError("cuFFT error: CUFFT_INVALID_PLAN"),
    "device-mismatch": RuntimeError("Expected all tensors to be on the same device, but found at least two "
                                    "devices, cuda:0 and cpu!"),
    "value-error-with-oom-text": ValueError("out of memory"),
    "type-error-with-cudnn-text": TypeError("CUDNN_STATUS_NOT_SUPPORTED"),
    "keyboard": KeyboardInterrupt(),
}


@pytest.mark.parametrize("kind", list(OOM_MESSAGES))
def test_library_allocation_failures_are_out_of_memory(kind):
    exc = RuntimeError(OOM_MESSAGES[kind])
    assert is_oom(exc)
    assert is_oom(torch.cuda.OutOfMemoryError(OOM_MESSAGES[kind]))
    accel = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises CUDA errors as this subclass
    if accel is not None and issubclass(accel, RuntimeError):
        try:
            assert is_oom(accel(OOM_MESSAGES[kind]))
        except TypeError:  # its constructor may need more arguments on some versions
            pass


@pytest.mark.parametrize("kind", list(OTHER_ERRORS))
def test_unrelated_errors_are_not_out_of_memory(kind):
    assert not is_oom(OTHER_ERRORS[kind])


@pytest.mark.parametrize("kind", ["cudnn-no-engine", "cublas-alloc", "cufft-alloc"])
def test_library_oom_halves_the_chunk(kind):
    calls = []

    def run(jobs):
        calls.append(len(jobs))
        if len(jobs) > 1:
            raise RuntimeError(OOM_MESSAGES[kind])
        return [j.key for j in jobs]

    resized = []
    out = list(stream_chunks("abcd", samples=1, rows=4, run=run, on_resize=resized.append))
    assert resized == [2, 1] and calls == [4, 2, 1, 1, 1, 1]
    assert [res for _, res, _ in out] == [["a"], ["b"], ["c"], ["d"]]


def test_library_oom_with_one_row_names_the_library_error():
    def run(jobs):
        raise RuntimeError(OOM_MESSAGES["cudnn-no-engine"])

    with pytest.raises(torch.cuda.OutOfMemoryError, match="single row.*unable to find an engine"):
        list(stream_chunks("a", samples=1, rows=1, run=run))


@pytest.mark.parametrize("kind", ["cudnn-execution", "illegal-access", "cufft-invalid-plan"])
def test_unrelated_library_errors_propagate_without_retry(kind):
    calls = []

    def run(jobs):
        calls.append(len(jobs))
        raise OTHER_ERRORS[kind]

    with pytest.raises(RuntimeError) as info:
        list(stream_chunks("abcd", samples=1, rows=4, run=run))
    assert info.value is OTHER_ERRORS[kind] and calls == [4]


def test_docstring_examples():
    import doctest

    from dps_fast.reconstruct import batching

    result = doctest.testmod(batching, extraglobs={"torch": torch})
    assert result.failed == 0 and result.attempted > 0
