"""Loading the CUDA extension (``torch.ops.dps_fast.*``) and its fake kernels.

Importing this module compiles nothing. :func:`load_extension`, on its first call:

1. imports the prebuilt ``dps_fast._C`` (built by ``setup.py``), else
2. JIT-builds the sources in csrc/ with :func:`torch.utils.cpp_extension.load` (same flags as
   setup.py, from :mod:`dps_fast._build`) when torch is a CUDA build, nvcc is found and
   ``DPS_FAST_BUILD_CUDA`` is not ``0``, else
3. returns None after one ``logging.warning`` line saying why, and that the pure-torch backend
   is used instead.

The result is cached. Once the ops exist, their fake (meta) kernels are registered with
``torch.library.register_fake`` so ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck``
can trace them; binding.cpp names this module with ``set_python_module``, so torch imports it by
itself when it needs a fake kernel of an op loaded some other way.

Example:
    >>> ext = load_extension()          # None on a machine without CUDA torch / nvcc
    >>> if ext is not None:
    ...     torch.ops.dps_fast.philox_normal(seeds, 16, 0, 0, torch.float32)
"""

from __future__ import annotations

import logging
import os
import threading
from types import ModuleType
from typing import Optional

import torch

from . import _build

__all__ = ["load_extension", "ops_registered", "OP_NAMES", "FALLBACK"]

logger = logging.getLogger(__name__)

OP_NAMES = ("dps_update", "spectral_residual", "blur_normal_residual", "philox_normal", "philox_words")
FALLBACK = "the pure-torch backend (dps_fast.backends.torch_ops)"
JIT_NAME = "dps_fast_C"

_UNSET = object()
_state: object = _UNSET  # the loaded module, or None once loading failed
_lock = threading.Lock()
_fakes_registered = False


def ops_registered() -> bool:
    """Whether every ``torch.ops.dps_fast`` op of binding.cpp exists in this process."""
    for name in OP_NAMES:
        try:
            getattr(torch.ops.dps_fast, name).default
        except (AttributeError, RuntimeError):
            return False
    return True


def load_extension() -> Optional[ModuleType]:
    """The CUDA extension module (prebuilt or JIT-built), or None with one warning line. Cached."""
    global _state
    if _state is not _UNSET:
        return _state  # type: ignore[return-value]
    with _lock:
        if _state is _UNSET:
            module, why = _load()
            if module is None:
                logger.warning("dps_fast: CUDA extension unavailable (%s); using %s instead", why, FALLBACK)
            else:
                _register_fakes()
            _state = module
    return _state  # type: ignore[return-value]


def _reset_for_tests() -> None:
    """Forget the cached result (tests only; the ops stay registered)."""
    global _state
    with _lock:
        _state = _UNSET


def _load() -> tuple[Optional[ModuleType], str]:
    prebuilt_error = ""
    try:
        from . import _C  # type: ignore[attr-defined]

        return _C, "prebuilt dps_fast._C"
    except ImportError as exc:
        prebuilt_error = _one_line(exc)
        logger.debug("dps_fast: no prebuilt dps_fast._C: %s", prebuilt_error)

    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    try:
        mode = _build.build_mode()
    except ValueError as exc:
        return None, str(exc)
    if mode == "0":
        return None, f"no prebuilt dps_fast._C ({prebuilt_error}) and {_build.ENV_BUILD}=0 forbids a JIT build"
    nvcc = _build.find_nvcc()
    if nvcc is None:
        return None, "no prebuilt dps_fast._C and no nvcc for a JIT build (set CUDA_HOME or put nvcc on PATH)"
    try:
        return _jit_build(), "JIT build"
    except Exception as exc:  # a compiler error is long and multi-line: keep the warning to one line
        logger.debug("dps_fast: JIT build of the CUDA extension failed", exc_info=True)
        return None, f"JIT build with {nvcc} failed: {_one_line(exc)}"


def _jit_build() -> ModuleType:
    home = _build.cuda_home()
    if home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = home  # read by torch.utils.cpp_extension when first imported
    from torch.utils.cpp_extension import load

    logger.info("dps_fast: JIT-building the CUDA extension (first use only; cached by torch afterwards)")
    return load(
        name=JIT_NAME,
        sources=_build.cuda_sources(),
        extra_cflags=_build.extra_cflags(),
        extra_cuda_cflags=_build.extra_cuda_cflags(_build.arch_list()),
        extra_ldflags=_build.extra_ldflags(),
        extra_include_paths=_build.include_dirs(),
        verbose=os.environ.get("DPS_FAST_VERBOSE_BUILD", "") == "1",
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---- fake kernels: output metadata only, the same shapes and dtypes as the CUDA kernels --------

def fake_dps_update(
    x: torch.Tensor, eps: torch.Tensor, w: torch.Tensor, u: torch.Tensor, gscale: torch.Tensor,
    coefs: torch.Tensor, step: int, clip: bool, lo: float, hi: float, variance: int,
    v: Optional[torch.Tensor], seeds: Optional[torch.Tensor], noise: Optional[torch.Tensor],
    out: torch.Tensor, x0hat_out: Optional[torch.Tensor],
) -> None:
    torch._check(out.shape == x.shape, lambda: f"out must have x's shape {tuple(x.shape)}, got {tuple(out.shape)}")
    torch._check(noise is not None or seeds is not None, lambda: "seeds: needed when noise is None")
    return None


def fake_spectral_residual(
    X: torch.Tensor, K: torch.Tensor, Y: torch.Tensor, n_last: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    real = torch.float64 if X.dtype == torch.complex128 else torch.float32
    return torch.empty_like(X), X.new_empty((X.shape[0],), dtype=real)


def fake_blur_normal_residual(
    x0hat: torch.Tensor, K: torch.Tensor, Y: torch.Tensor, ndim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x0hat), x0hat.new_empty((x0hat.shape[0],))


def fake_philox_normal(seeds: torch.Tensor, numel: int, step: int, stream: int, dtype: torch.dtype) -> torch.Tensor:
    return seeds.new_empty((seeds.shape[0], numel), dtype=dtype)


def fake_philox_words(seeds: torch.Tensor, calls: int, step: int, stream: int) -> torch.Tensor:
    return seeds.new_empty((seeds.shape[0], calls, 4), dtype=torch.int32)


FAKES = {
    "dps_update": fake_dps_update,
    "spectral_residual": fake_spectral_residual,
    "blur_normal_residual": fake_blur_normal_residual,
    "philox_normal": fake_philox_normal,
    "philox_words": fake_philox_words,
}


def _register_fakes() -> None:
    """register_fake for every op, once, and only when the C++ ops exist (it needs them)."""
    global _fakes_registered
    if _fakes_registered or not ops_registered():
        return
    for name, fn in FAKES.items():
        torch.library.register_fake(f"dps_fast::{name}", fn)
    _fakes_registered = True


# Imported by torch through binding.cpp's set_python_module when the ops were loaded directly.
_register_fakes()
