"""Fixtures shared by the CUDA-extension checks: every csrc/*.cu and the CPU emulator compiled once
per session (in parallel), for the nvcc, binding and emulator test files."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import subprocess
import warnings
from pathlib import Path

import pytest

from dps_fast import _build
from tests.cuda.csrc_build import (ARCH_FLAGS, CSRC, CU_FILES, CUFFT_STANDIN, EMULATOR_SOURCE, NVCC, TORCH_NVCC_FLAGS,
                                   run_cmd)
from tests.cuda.cufft_header import real_cufft_include

log = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dps_csrc")


@pytest.fixture(scope="session")
def cufft_include(build_dir: Path) -> tuple[str, str]:
    """(include dir holding cufft.h, how it was found). The stand-in only as a last resort."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    inc, _ = _build.find_cufft()
    if inc is not None:
        return inc, f"real (toolkit or installed package: {inc})"
    inc, how = real_cufft_include(NVCC)
    if inc is not None:
        return inc, f"real ({how})"
    d = build_dir / "cufft_standin"
    d.mkdir(exist_ok=True)
    (d / "cufft.h").write_text(CUFFT_STANDIN)
    why = f"stand-in: no cufft.h in the toolkit and the nvidia-cufft wheel could not be fetched ({how})"
    warnings.warn(f"csrc/ is compile-checked against a declaration-only cufft.h {why}", stacklevel=1)
    return str(d), why


@pytest.fixture(scope="session")
def cu_objects(build_dir: Path, cufft_include: tuple[str, str]) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every csrc/*.cu compiled once (in parallel), position-independent for the link check."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    log.info("cufft.h used for the compile check: %s (%s)", *cufft_include)

    def compile_one(src: Path) -> tuple[str, tuple[subprocess.CompletedProcess, Path]]:
        obj = build_dir / (src.stem + ".o")
        cmd = [NVCC, "-c", "-o", str(obj), *ARCH_FLAGS, "-std=c++17", "-O3", "-Xcompiler", "-fPIC",
               *TORCH_NVCC_FLAGS, "-I", str(CSRC), "-I", cufft_include[0], str(src)]
        return src.name, (run_cmd(cmd), obj)

    def compile_emulator(_: object) -> tuple[str, tuple[subprocess.CompletedProcess, Path]]:
        src = build_dir / "emulator.cu"
        src.write_text(EMULATOR_SOURCE)
        lib = build_dir / "dps_emulator.so"
        # PTX only: the device side is checked by the sm_80/sm_90 builds, this build runs on the host
        cmd = [NVCC, "-shared", "-o", str(lib), "-gencode", "arch=compute_90,code=compute_90", "-std=c++17", "-O2",
               "-Xcompiler", "-fPIC", *TORCH_NVCC_FLAGS, "-I", str(CSRC), str(src)]
        return "<emulator>", (run_cmd(cmd), lib)

    jobs = [(compile_one, f) for f in CU_FILES] + [(compile_emulator, None)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as ex:
        return dict(ex.map(lambda job: job[0](job[1]), jobs))
