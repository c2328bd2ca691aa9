"""Build configuration of the CUDA extension, shared by ``setup.py`` and the lazy JIT build
(:func:`dps_fast._cuda.load_extension`) so the two cannot drift apart.

Only the standard library is imported at module level: ``setup.py`` loads this file by path,
before (and without) importing the ``dps_fast`` package, and possibly without torch.

Decisions come from environment variables and the toolchain, never from probing a GPU:

* ``DPS_FAST_BUILD_CUDA=auto|0|1`` (default ``auto``): ``1`` always builds, ``0`` never (neither
  in ``setup.py`` nor as a JIT build), ``auto`` builds when nvcc is found and torch is a CUDA build.
* ``TORCH_CUDA_ARCH_LIST`` (default ``"8.0;9.0"``): the GPU architectures compiled for; the
  highest one is also embedded as PTX so newer GPUs can JIT it.
* ``CUDA_HOME`` / ``CUDA_PATH``: the toolkit (else ``nvcc`` on ``PATH``, else /usr/local/cuda).
* ``DPS_FAST_CUFFT_ROOT``: a folder with ``include/cufft.h`` and ``lib/libcufft.so*`` when cuFFT is
  neither in the toolkit nor in the ``nvidia`` pip packages torch depends on.

>>> decide_build_cuda({"DPS_FAST_BUILD_CUDA": "0"}, torch_cuda="13.0", nvcc="/usr/bin/nvcc")
(False, 'DPS_FAST_BUILD_CUDA=0')
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Mapping, Optional

__all__ = [
    "ENV_BUILD", "DEFAULT_ARCH_LIST", "decide_build_cuda", "build_mode", "find_nvcc", "cuda_home",
    "csrc_dir", "cuda_sources", "include_dirs", "extra_cflags", "extra_cuda_cflags", "extra_ldflags",
    "arch_list", "gencode_flags", "find_cufft",
]

ENV_BUILD = "DPS_FAST_BUILD_CUDA"
DEFAULT_ARCH_LIST = "8.0;9.0"
_MODES = ("auto", "0", "1")


def build_mode(env: Optional[Mapping[str, str]] = None) -> str:
    """The value of ``DPS_FAST_BUILD_CUDA`` ("auto", "0" or "1"); raises ValueError otherwise."""
    env = os.environ if env is None else env
    raw = env.get(ENV_BUILD, "auto")
    mode = raw.strip().lower()
    mode = {"": "auto", "true": "1", "yes": "1", "on": "1", "false": "0", "no": "0", "off": "0"}.get(mode, mode)
    if mode not in _MODES:
        raise ValueError(f"{ENV_BUILD}: expected auto, 0 or 1, got {raw!r}")
    return mode


def decide_build_cuda(
    env: Optional[Mapping[str, str]] = None,
    torch_cuda: Optional[str] = "<detect>",
    nvcc: Optional[str] = "<detect>",
) -> tuple[bool, str]:
    """Whether to build the CUDA extension, and why, from the environment and the toolchain only.

    ``torch_cuda`` is ``torch.version.cuda`` (None for a CPU build of torch, or when torch is not
    importable) and ``nvcc`` the compiler's path (None when absent); both are detected when left at
    their defaults. No GPU is ever queried, so the answer is the same on a GPU-less build machine.
    """
    mode = build_mode(env)
    if mode == "0":
        return False, f"{ENV_BUILD}=0"
    if mode == "1":
        return True, f"{ENV_BUILD}=1"
    if torch_cuda == "<detect>":
        torch_cuda = _torch_cuda_version()
    if nvcc == "<detect>":
        nvcc = find_nvcc(env)
    if torch_cuda is None:
        return False, f"{ENV_BUILD}=auto and torch is not a CUDA build (torch.version.cuda is None)"
    if nvcc is None:
        return False, f"{ENV_BUILD}=auto and nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return True, f"{ENV_BUILD}=auto, torch CUDA {torch_cuda}, nvcc at {nvcc}"


def _torch_cuda_version() -> Optional[str]:
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def cuda_home(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The CUDA toolkit root: CUDA_HOME, CUDA_PATH, nvcc's grandparent on PATH, or /usr/local/cuda."""
    env = os.environ if env is None else env
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            return env[var]
    on_path = shutil.which("nvcc", path=env.get("PATH"))
    if on_path:
        home = str(Path(os.path.realpath(on_path)).parent.parent)
        # nvcc on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc): trust it only with headers
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return "/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None


def find_nvcc(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Path of nvcc: $CUDA_HOME/bin/nvcc, else ``nvcc`` on PATH, else /usr/local/cuda/bin/nvcc."""
    env = os.environ if env is None else env
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            cand = os.path.join(env[var], "bin", "nvcc")
            if os.access(cand, os.X_OK):
                return cand
    on_path = shutil.which("nvcc", path=env.get("PATH"))
    if on_path:
        return on_path
    cand = "/usr/local/cuda/bin/nvcc"
    return cand if os.access(cand, os.X_OK) else None


def csrc_dir() -> Path:
    """The CUDA sources: ``dps_fast/csrc`` in an installed wheel, ``<repo>/csrc`` in a checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "binding.cpp").is_file():
            return cand
    raise FileNotFoundError(
        f"dps_fast CUDA sources: neither {here / 'csrc'} nor {here.parent / 'csrc'} holds binding.cpp"
    )


def cuda_sources() -> list[str]:
    """Absolute paths of every .cu file in csrc/ (sorted) plus the one binding file."""
    d = csrc_dir()
    return [str(p) for p in sorted(d.glob("*.cu"))] + [str(d / "binding.cpp")]


def find_cufft(env: Optional[Mapping[str, str]] = None) -> tuple[Optional[str], Optional[str]]:
    """``(include_dir, library_file)`` of cuFFT: DPS_FAST_CUFFT_ROOT, the toolkit, or the
    ``nvidia`` pip packages (``nvidia/cu13/...`` or ``nvidia/cufft/...``) torch wheels depend on."""
    env = os.environ if env is None else env
    roots: list[str] = []
    if env.get("DPS_FAST_CUFFT_ROOT"):
        roots.append(env["DPS_FAST_CUFFT_ROOT"])
    home = cuda_home(env)
    if home:
        roots.append(home)
    for entry in sys.path:
        if entry and os.path.isdir(os.path.join(entry, "nvidia")):
            roots += sorted(glob.glob(os.path.join(entry, "nvidia", "*")), reverse=True)
    for root in roots:
        inc = os.path.join(root, "include")
        if not os.path.isfile(os.path.join(inc, "cufft.h")):
            continue
        libs: list[str] = []
        for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            libs += sorted(glob.glob(os.path.join(root, sub, "libcufft.so*")))
        # prefer the unversioned link, else the shortest soname (libcufft.so.12 over .so.12.0.1)
        libs.sort(key=lambda p: (not p.endswith(".so"), len(p)))
        return inc, (libs[0] if libs else None)
    return None, None


def include_dirs(env: Optional[Mapping[str, str]] = None) -> list[str]:
    """Include folders beyond torch's own: csrc/ and cuFFT's when it is not in the toolkit."""
    dirs = [str(csrc_dir())]
    inc, _ = find_cufft(env)
    home = cuda_home(env)
    if inc and (home is None or os.path.realpath(inc) != os.path.realpath(os.path.join(home, "include"))):
        dirs.append(inc)
    return dirs


def extra_cflags() -> list[str]:
    """Host compiler flags. No ``-std``: torch's build helpers pass the standard its headers need
    (C++17 up to torch 2.9, C++20 after); the .cu files compile with either."""
    return ["-O3", "-Wall", "-Wno-unused-function"]


def arch_list(env: Optional[Mapping[str, str]] = None) -> str:
    """TORCH_CUDA_ARCH_LIST, or the default "8.0;9.0"."""
    env = os.environ if env is None else env
    value = env.get("TORCH_CUDA_ARCH_LIST", "").strip()
    return value if value and value != "native" else DEFAULT_ARCH_LIST


def gencode_flags(archs: str) -> list[str]:
    """``-gencode`` flags of an arch list such as ``"8.0;9.0"``, ``"8.0 8.6+PTX"`` or ``"9.0a"``.

    Each arch gets SASS; the highest (and any marked ``+PTX``) also gets PTX so that a newer GPU
    can JIT it.
    """
    items = [a for a in re.split(r"[;,\s]+", archs.strip()) if a]
    if not items:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST: no architecture in {archs!r}")
    parsed: list[tuple[str, bool]] = []
    for item in items:
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", item)
        if m is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: expected entries like 8.0, 8.6+PTX or 9.0a, got {item!r}")
        parsed.append((f"{m.group(1)}{m.group(2)}{m.group(3)}", m.group(4) is not None))
    highest = max(parsed, key=lambda p: int(re.sub(r"\D", "", p[0])))[0]
    flags: list[str] = []
    for num, ptx in parsed:
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx or num == highest:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return list(dict.fromkeys(flags))


def extra_cuda_cflags(archs: Optional[str] = None) -> list[str]:
    """nvcc flags. Explicit ``-gencode`` flags (torch then adds none of its own). Deliberately no
    ``--use_fast_math``: the in-kernel Philox noise must match dps_fast.noise (logf/cosf/sqrtf)."""
    archs = arch_list() if archs is None else archs
    return ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + gencode_flags(archs)


def extra_ldflags(env: Optional[Mapping[str, str]] = None) -> list[str]:
    """Linker flags for cuFFT. A pip-installed cuFFT ships only ``libcufft.so.N``, so that file is
    linked by path, with an rpath to its folder (torch has normally loaded it already)."""
    _, lib = find_cufft(env)
    if lib is None:
        return ["-lcufft"]
    folder = os.path.dirname(lib)
    if lib.endswith(".so"):
        return [f"-L{folder}", "-lcufft", f"-Wl,-rpath,{folder}"]
    return [lib, f"-Wl,-rpath,{folder}"]
