"""(b) binding.cpp compiles with g++ against the installed torch's headers, links with the nvcc
objects and, loaded into a fresh interpreter, registers its schemas and CUDA kernels: torch's
dispatcher checks there that each C++ kernel's signature matches its schema.

Part of what can be checked of the CUDA extension without a GPU (CI has nvcc but no device);
the other parts are the sibling tests/cuda/test_csrc_*.py files.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

from dps_fast import _cuda
from tests.cuda.csrc_build import CSRC, EXT_NAME, ROOT, cuda_include, cudart_dir, run_cmd, schemas_from_source


def _cxx_std() -> str:
    """The C++ standard torch's own extension builder uses with this torch (17 before 2.10)."""
    import torch.utils.cpp_extension as cpp

    return "-std=c++20" if "-std=c++20" in inspect.getsource(cpp) else "-std=c++17"


@pytest.fixture(scope="module")
def binding_object(build_dir: Path) -> tuple[subprocess.CompletedProcess, Path]:
    import torch.utils.cpp_extension as cpp

    cuda_inc = cuda_include()
    if cuda_inc is None:
        pytest.skip("no CUDA headers (cuda_runtime_api.h) for binding.cpp's c10/cuda includes")
    inc = [*cpp.include_paths(), cuda_inc, sysconfig.get_paths()["include"], str(CSRC)]
    torch_inc = cpp.include_paths()[0]
    if not os.path.isfile(os.path.join(torch_inc, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        stub = build_dir / "stub_include" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        inc.append(str(build_dir / "stub_include"))
    obj = build_dir / "binding.o"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = ["g++", "-c", "-fPIC", _cxx_std(), "-O0", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           f"-DTORCH_EXTENSION_NAME={EXT_NAME}", *[f"-I{d}" for d in inc], "-o", str(obj), str(CSRC / "binding.cpp")]
    return run_cmd(cmd), obj


def test_binding_compiles(binding_object: tuple[subprocess.CompletedProcess, Path]) -> None:
    proc, obj = binding_object
    assert proc.returncode == 0, f"g++ failed on binding.cpp:\n{proc.stderr[-6000:]}"
    assert obj.is_file()


LOAD_SCRIPT = textwrap.dedent("""\
    import ctypes, importlib.util, json, os, sys
    import torch
    so, name, stub = sys.argv[1], sys.argv[2], sys.argv[3]
    if stub:
        ctypes.CDLL(stub, mode=os.RTLD_GLOBAL)
    flags = sys.getdlopenflags()
    sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_GLOBAL)  # CUDA-only functions stay unresolved, never called
    spec = importlib.util.spec_from_file_location(name, so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.setdlopenflags(flags)
    import dps_fast._cuda as c   # registers the fake kernels now that the ops exist
    out = {"schemas": {}, "cuda_kernel": {}, "meta": {}, "fakes_registered": c._fakes_registered}
    for op in c.OP_NAMES:
        packet = getattr(torch.ops.dps_fast, op).default
        out["schemas"][op] = str(packet._schema)
        out["cuda_kernel"][op] = torch._C._dispatch_has_kernel_for_dispatch_key(packet.name(), "CUDA")
    m = lambda *s, dtype=torch.float32: torch.empty(*s, device="meta", dtype=dtype)
    x = m(2, 3, 5)
    torch.ops.dps_fast.dps_update(x, m(2, 3, 5), m(2, 3, 5), m(2, 3, 5), m(2), m(15), 3, True, -1.0, 1.0, 0,
                                  None, m(2, dtype=torch.int64), None, x, None)
    W, r = torch.ops.dps_fast.spectral_residual(m(2, 3, 4, 3, dtype=torch.complex64), m(4, 3, dtype=torch.complex64),
                                                m(2, 3, 4, 3, dtype=torch.complex64), 5)
    out["meta"]["spectral_residual"] = [list(W.shape), str(W.dtype), list(r.shape), str(r.dtype)]
    o, r = torch.ops.dps_fast.blur_normal_residual(m(2, 3, 4, 5, dtype=torch.float64), m(4, 3, dtype=torch.complex128),
                                                   m(2, 3, 4, 3, dtype=torch.complex128), 2)
    out["meta"]["blur_normal_residual"] = [list(o.shape), str(o.dtype), list(r.shape), str(r.dtype)]
    z = torch.ops.dps_fast.philox_normal(m(3, dtype=torch.int64), 7, 1, 0, torch.float64)
    out["meta"]["philox_normal"] = [list(z.shape), str(z.dtype)]
    wds = torch.ops.dps_fast.philox_words(m(3, dtype=torch.int64), 7, 1, 0)
    out["meta"]["philox_words"] = [list(wds.shape), str(wds.dtype)]
    print("JSON" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def loaded_library(build_dir: Path, binding_object, cu_objects) -> dict:
    """binding.o + the nvcc objects linked into an extension and loaded in a fresh interpreter."""
    proc, obj = binding_object
    objects = [o for name, (_, o) in cu_objects.items() if name != "<emulator>"]
    if proc.returncode != 0 or any(p.returncode != 0 for p, _ in cu_objects.values()):
        pytest.fail("compile step failed (see test_binding_compiles / test_cu_compiles_sm80_sm90)")
    cudart = cudart_dir()
    if cudart is None:
        pytest.skip("libcudart.so not found in the CUDA toolkit")
    torch_lib = str(Path(torch.__file__).parent / "lib")
    libs = ["-lc10", "-ltorch_cpu", "-ltorch"]
    stub = ""
    if os.path.isfile(os.path.join(torch_lib, "libc10_cuda.so")):
        libs += ["-lc10_cuda", "-ltorch_cuda"]
    else:
        # A CPU wheel has no libc10_cuda: functions stay lazily unresolved, but the one data symbol
        # the c10/cuda headers reference must exist at load time.
        src = build_dir / "c10_cuda_stub.cpp"
        src.write_text("namespace c10 { namespace cuda { namespace CUDACachingAllocator {\n"
                       "void* allocator = nullptr; } } }\n")
        stub = str(build_dir / "libc10_cuda_stub.so")
        p = run_cmd(["g++", "-shared", "-fPIC", "-o", stub, str(src)])
        assert p.returncode == 0, p.stderr
    so = build_dir / f"{EXT_NAME}.so"
    cmd = ["g++", "-shared", "-o", str(so), str(obj), *[str(o) for o in objects],
           f"-L{torch_lib}", *libs, f"-L{cudart}", "-lcudart", f"-Wl,-rpath,{cudart}", f"-Wl,-rpath,{torch_lib}",
           "-Wl,--unresolved-symbols=ignore-all"]
    p = run_cmd(cmd)
    assert p.returncode == 0, f"link failed:\n{p.stderr[-4000:]}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(so), EXT_NAME, stub], capture_output=True,
                         text=True, timeout=180, env=env, cwd=str(ROOT))
    assert run.returncode == 0, f"loading the extension failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("JSON")][-1]
    return json.loads(line[4:])


def test_binding_links_and_registers(loaded_library: dict) -> None:
    """torch checked every C++ kernel's signature against its schema while loading."""
    assert set(loaded_library["schemas"]) == set(_cuda.OP_NAMES)
    assert all(loaded_library["cuda_kernel"].values()), loaded_library["cuda_kernel"]
    assert loaded_library["fakes_registered"] is True


def test_loaded_schemas_equal_source(loaded_library: dict) -> None:
    parsed = schemas_from_source()
    for op, schema in loaded_library["schemas"].items():
        assert schema == f"dps_fast::{parsed[op]}", op


def test_fakes_through_real_library(loaded_library: dict) -> None:
    """The fake kernels, dispatched by the loaded C++ schemas on meta tensors."""
    meta = loaded_library["meta"]
    assert meta["spectral_residual"] == [[2, 3, 4, 3], "torch.complex64", [2], "torch.float32"]
    assert meta["blur_normal_residual"] == [[2, 3, 4, 5], "torch.float64", [2], "torch.float64"]
    assert meta["philox_normal"] == [[3, 7], "torch.float64"]
    assert meta["philox_words"] == [[3, 7, 4], "torch.int32"]


