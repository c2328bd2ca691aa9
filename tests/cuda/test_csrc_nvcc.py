"""(a) every csrc/*.cu compiles with nvcc for sm_80 and sm_90, and the .cu files include no torch header.

A CPU-only torch wheel lacks two things the compile checks need, which are supplied here and only
here: c10/cuda/impl/cuda_cmake_macros.h (a one-line generated config header of CUDA builds), and
cufft.h when the toolkit has none: the real header, from NVIDIA's ``nvidia-cufft`` pip wheel
(downloaded once and cached, tests/cuda/cufft_header.py), or, only when that cannot be fetched
(no network), a declaration-only stand-in for the documented cuFFT C API subset dps_fft.cu uses.
The stand-in is named in a warning and in the skip reason of test_compiled_against_real_cufft_header.

Part of what can be checked of the CUDA extension without a GPU (CI has nvcc but no device);
the other parts are the sibling tests/cuda/test_csrc_*.py files.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from dps_fast import _build
from tests.cuda.csrc_build import CSRC, CU_FILES, CUFFT_STANDIN, needs_nvcc

log = logging.getLogger(__name__)


def test_cuda_sources_listed() -> None:
    srcs = [Path(p) for p in _build.cuda_sources()]
    assert [p.name for p in srcs] == [p.name for p in CU_FILES] + ["binding.cpp"]
    assert {"dps_kernels.cu", "dps_fft.cu"} <= {p.name for p in CU_FILES}
    assert all(p.is_file() for p in srcs)


@pytest.mark.parametrize("src", [p.name for p in CU_FILES])
@needs_nvcc
def test_cu_compiles_sm80_sm90(src: str, cu_objects: dict) -> None:
    proc, obj = cu_objects[src]
    assert proc.returncode == 0, f"nvcc failed on {src}:\n{proc.stdout}\n{proc.stderr}"
    assert obj.is_file() and obj.stat().st_size > 0


@needs_nvcc
def test_compiled_against_real_cufft_header(cufft_include: tuple[str, str], cu_objects: dict) -> None:
    """csrc/ compiled against NVIDIA's cufft.h, and the stand-in (kept for offline machines) agrees
    with it on every enum value it declares."""
    inc, how = cufft_include
    if how.startswith("stand-in"):
        pytest.skip(f"compiled against the cufft.h {how}")
    log.info("cufft.h: %s", how)
    real = (Path(inc) / "cufft.h").read_text()
    for name in ("cufftMakePlanMany64", "cufftSetWorkArea", "cufftExecR2C", "cufftExecZ2D", "cufftSetAutoAllocation"):
        assert re.search(rf"\b{name}\s*\(", real), name
    for name, value in re.findall(r"(CUFFT_\w+)\s*=\s*(0x[0-9A-Fa-f]+)", CUFFT_STANDIN):
        m = re.search(rf"\b{name}\s*=\s*(0x[0-9A-Fa-f]+|\d+)", real)
        assert m and int(m.group(1), 0) == int(value, 0), name


@pytest.mark.parametrize("src", [p.name for p in CU_FILES])
def test_cu_files_include_no_torch(src: str) -> None:
    text = (CSRC / src).read_text()
    includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', text)
    assert includes, f"{src} includes nothing?"
    bad = [h for h in includes if h.split("/")[0] in ("torch", "ATen", "c10", "pybind11")]
    assert not bad, f"{src} includes torch headers {bad}: .cu files must build with nvcc alone"

