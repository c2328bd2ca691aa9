"""(d) setup.py's decision to build the CUDA extension (DPS_FAST_BUILD_CUDA, toolchain, never a GPU probe),
its arch flags and the sources it ships.

Part of what can be checked of the CUDA extension without a GPU (CI has nvcc but no device);
the other parts are the sibling tests/cuda/test_csrc_*.py files.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from dps_fast import _build
from tests.cuda.csrc_build import ROOT


def _load_setup():
    spec = importlib.util.spec_from_file_location("dps_fast_setup_under_test", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # __name__ is not "__main__": setup() does not run
    return mod


@pytest.mark.parametrize(("env", "torch_cuda", "nvcc", "want"), [
    ({"DPS_FAST_BUILD_CUDA": "0"}, "13.0", "/usr/local/cuda/bin/nvcc", False),
    ({"DPS_FAST_BUILD_CUDA": "1"}, None, None, True),
    ({"DPS_FAST_BUILD_CUDA": "auto"}, None, "/usr/local/cuda/bin/nvcc", False),
    ({}, "13.0", None, False),
    ({}, "13.0", "/usr/local/cuda/bin/nvcc", True),
    ({"DPS_FAST_BUILD_CUDA": "AUTO"}, "12.8", "/opt/nvcc", True),
], ids=["0", "1-forced", "auto-cpu-torch", "auto-no-nvcc", "auto-cuda", "auto-case"])
def test_decide_build_cuda(env, torch_cuda, nvcc, want) -> None:
    got, why = _build.decide_build_cuda(env, torch_cuda=torch_cuda, nvcc=nvcc)
    assert got is want
    assert "DPS_FAST_BUILD_CUDA" in why


def test_decide_build_cuda_rejects_bad_value() -> None:
    with pytest.raises(ValueError, match="DPS_FAST_BUILD_CUDA.*'maybe'"):
        _build.decide_build_cuda({"DPS_FAST_BUILD_CUDA": "maybe"})


def test_setup_never_probes_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a, **k):
        raise AssertionError("setup.py queried the GPU")

    for fn in ("is_available", "device_count", "get_device_capability", "get_device_properties", "init"):
        monkeypatch.setattr(torch.cuda, fn, boom)
    setup_mod = _load_setup()
    monkeypatch.setenv("DPS_FAST_BUILD_CUDA", "0")
    assert setup_mod.cuda_extension_kwargs() == {}
    monkeypatch.setenv("DPS_FAST_BUILD_CUDA", "auto")
    if torch.version.cuda is None:
        assert setup_mod.cuda_extension_kwargs() == {}  # CPU torch: pure-Python install
    monkeypatch.setenv("DPS_FAST_BUILD_CUDA", "1")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    if _build.cuda_home() is None:
        pytest.skip("no CUDA toolkit: CUDAExtension() cannot be constructed")
    import torch.utils.cpp_extension as cpp

    # setup.py exports CUDA_HOME before torch reads it at import; here torch is imported already
    monkeypatch.setattr(cpp, "CUDA_HOME", _build.cuda_home())
    kw = setup_mod.cuda_extension_kwargs()
    (ext,) = kw["ext_modules"]
    assert ext.name == "dps_fast._C"
    assert sorted(Path(s).name for s in ext.sources) == sorted(Path(s).name for s in _build.cuda_sources())
    nvcc_flags = ext.extra_compile_args["nvcc"]
    assert "-gencode=arch=compute_80,code=sm_80" in nvcc_flags and "-gencode=arch=compute_90,code=sm_90" in nvcc_flags
    assert "--use_fast_math" not in nvcc_flags
    assert "build_ext" in kw["cmdclass"]


@pytest.mark.parametrize(("archs", "expect"), [
    ("8.0;9.0", ["compute_80,code=sm_80", "compute_90,code=sm_90", "compute_90,code=compute_90"]),
    ("8.6+PTX 9.0a", ["compute_86,code=sm_86", "compute_86,code=compute_86", "compute_90a,code=sm_90a",
                      "compute_90a,code=compute_90a"]),
    ("10.0", ["compute_100,code=sm_100", "compute_100,code=compute_100"]),
])
def test_gencode_flags(archs: str, expect: list[str]) -> None:
    assert _build.gencode_flags(archs) == [f"-gencode=arch={e}" for e in expect]


def test_arch_list_env() -> None:
    assert _build.arch_list({}) == "8.0;9.0"
    assert _build.arch_list({"TORCH_CUDA_ARCH_LIST": "9.0"}) == "9.0"
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        _build.gencode_flags("sm_90")


def test_package_data_ships_sources() -> None:
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert re.search(r"recursive-include csrc .*\*\.cu.*\*\.cuh.*\*\.cpp", manifest)


