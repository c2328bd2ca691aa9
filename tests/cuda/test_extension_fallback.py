"""(e) without CUDA torch (or nvcc, or with the build disabled), load_extension() returns None after
exactly one warning line; importing dps_fast compiles nothing.

Part of what can be checked of the CUDA extension without a GPU (CI has nvcc but no device);
the other parts are the sibling tests/cuda/test_csrc_*.py files.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dps_fast import _build, _cuda
from dps_fast.backends import cuda_ops, torch_ops
from tests.cuda.csrc_build import ROOT, update_inputs

log = logging.getLogger(__name__)


@pytest.fixture
def fresh_loader():
    _cuda._reset_for_tests()
    yield
    _cuda._reset_for_tests()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "dps_fast._cuda" and r.levelno >= logging.WARNING]


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build")
def test_load_extension_cpu_torch_warns_once(fresh_loader, caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG, logger="dps_fast._cuda")
    monkeypatch.setattr(cuda_ops, "_ready", None)
    assert _cuda.load_extension() is None
    assert _cuda.load_extension() is None
    assert cuda_ops.is_available() is False
    (rec,) = _warnings(caplog)
    msg = rec.getMessage()
    assert "\n" not in msg
    assert "CPU-only build" in msg and "torch_ops" in msg


def test_load_extension_no_nvcc_warns_once(fresh_loader, caplog, monkeypatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(_build, "find_nvcc", lambda env=None: None)
    monkeypatch.setitem(sys.modules, "dps_fast._C", None)  # no prebuilt module, whatever is installed
    monkeypatch.delenv("DPS_FAST_BUILD_CUDA", raising=False)
    assert _cuda.load_extension() is None and _cuda.load_extension() is None
    (rec,) = _warnings(caplog)
    assert "nvcc" in rec.getMessage() and "\n" not in rec.getMessage()


def test_load_extension_build_disabled(fresh_loader, caplog, monkeypatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setitem(sys.modules, "dps_fast._C", None)
    monkeypatch.setenv("DPS_FAST_BUILD_CUDA", "0")
    monkeypatch.setattr(_cuda, "_jit_build", lambda: pytest.fail("JIT build despite DPS_FAST_BUILD_CUDA=0"))
    assert _cuda.load_extension() is None
    (rec,) = _warnings(caplog)
    assert "DPS_FAST_BUILD_CUDA=0" in rec.getMessage()


def test_load_extension_jit_failure_is_one_line(fresh_loader, caplog, monkeypatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setitem(sys.modules, "dps_fast._C", None)
    monkeypatch.setattr(_build, "find_nvcc", lambda env=None: "/usr/local/cuda/bin/nvcc")
    monkeypatch.delenv("DPS_FAST_BUILD_CUDA", raising=False)

    def broken():
        raise RuntimeError("Error building extension 'dps_fast_C':\nline 1\nline 2")

    monkeypatch.setattr(_cuda, "_jit_build", broken)
    assert _cuda.load_extension() is None
    (rec,) = _warnings(caplog)
    assert "\n" not in rec.getMessage() and "Error building extension" in rec.getMessage()


def test_cuda_ops_fall_back_on_cpu_tensors() -> None:
    a = update_inputs()
    got = cuda_ops.dps_update(a["x"], a["eps"], a["w"], a["u"], a["gscale"], a["coefs"], 3, (-1.0, 1.0),
                              seeds=a["seeds"])
    want = torch_ops.dps_update(a["x"], a["eps"], a["w"], a["u"], a["gscale"], a["coefs"], 3, (-1.0, 1.0),
                                seeds=a["seeds"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="variance"):
        cuda_ops.dps_update(a["x"], a["eps"], a["w"], a["u"], a["gscale"], a["coefs"], 3, variance="large",
                            seeds=a["seeds"])


def test_import_compiles_nothing() -> None:
    code = textwrap.dedent("""\
        import sys
        import torch.utils.cpp_extension as cpp
        def boom(*a, **k):
            raise SystemExit("import compiled something")
        cpp.load = cpp.load_inline = boom
        import dps_fast, dps_fast._cuda, dps_fast.backends.cuda_ops
        assert "dps_fast._C" not in sys.modules
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


