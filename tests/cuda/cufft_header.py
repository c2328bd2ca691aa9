"""The real ``cufft.h`` for the compile check of csrc/ on machines whose CUDA toolkit has none.

NVIDIA ships cuFFT's headers in its pip wheels: ``nvidia-cufft`` (CUDA 13; files under
``nvidia/cu13/include``) and ``nvidia-cufft-cu12`` / ``-cu11`` (``nvidia/cufft/include``). The
wheel matching the toolkit's major version is fetched once with ``pip download --no-deps`` and
only its headers are kept, in a cache folder shared by every run on the machine:
``$DPS_FAST_CACHE`` or ``$XDG_CACHE_HOME/dps_fast`` or ``~/.cache/dps_fast`` (the ~165 MB wheel
itself is deleted after extraction). Later runs find the header there and cost nothing.

Example:
    >>> inc, how = real_cufft_include("/usr/local/cuda/bin/nvcc")  # doctest: +SKIP
    >>> inc                                                         # doctest: +SKIP
    '/root/.cache/dps_fast/nvidia-cufft/include'
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

__all__ = ["cache_root", "cufft_package", "real_cufft_include"]

# A fresh download is ~165 MB: seconds at PyPI's usual rates, a minute on a slow link.
DOWNLOAD_TIMEOUT_S = 300


def cache_root() -> Path:
    """``$DPS_FAST_CACHE``, else ``$XDG_CACHE_HOME/dps_fast``, else ``~/.cache/dps_fast``."""
    if os.environ.get("DPS_FAST_CACHE"):
        return Path(os.environ["DPS_FAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dps_fast"


def _toolkit_major(nvcc: str) -> Optional[int]:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.", out)
    return int(m.group(1)) if m else None


def cufft_package(major: Optional[int]) -> str:
    """The pip distribution carrying cuFFT for a CUDA major version (13 and later: ``nvidia-cufft``)."""
    if major is not None and major <= 12:
        return f"nvidia-cufft-cu{major}"
    return "nvidia-cufft"


def _extract_headers(wheel: Path, dest: Path) -> str:
    """Copy ``nvidia/*/include/*.h`` of ``wheel`` into ``dest``; returns the wheel's file name."""
    dest.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if re.fullmatch(r"nvidia/[^/]+/include/[^/]+\.h", n)]
        if not any(n.endswith("/cufft.h") for n in names):
            raise FileNotFoundError(f"{wheel.name} holds no nvidia/*/include/cufft.h")
        for n in names:
            (dest / Path(n).name).write_bytes(z.read(n))
    (dest / "SOURCE").write_text(wheel.name + "\n")
    return wheel.name


def real_cufft_include(nvcc: str, cache: Optional[Path] = None) -> tuple[Optional[str], str]:
    """``(include dir with the real cufft.h, how it was obtained)``, or ``(None, why not)``.

    Downloads at most once per cache folder; concurrent runs race safely (each extracts into
    its own temporary folder and the first rename wins).
    """
    package = cufft_package(_toolkit_major(nvcc))
    cache = cache_root() if cache is None else cache
    dest = cache / package / "include"
    if (dest / "cufft.h").is_file():
        src = (dest / "SOURCE").read_text().strip() if (dest / "SOURCE").is_file() else package
        return str(dest), f"cached from {src} in {dest}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, package]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
            wheels = sorted(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                tail = " ".join((proc.stderr or proc.stdout).split())[-300:]
                return None, f"`pip download --no-deps {package}` failed (exit {proc.returncode}): {tail}"
            staged = Path(tmp) / "include"
            name = _extract_headers(wheels[0], staged)
            try:
                os.rename(staged, dest)
            except OSError:
                if not (dest / "cufft.h").is_file():  # not a lost race: a real failure
                    raise
        return str(dest), f"downloaded {name} into {dest}"
    except subprocess.TimeoutExpired:
        return None, f"`pip download {package}` took more than {DOWNLOAD_TIMEOUT_S} s"
    except (OSError, zipfile.BadZipFile) as e:
        shutil.rmtree(dest, ignore_errors=True) if dest.is_dir() and not (dest / "cufft.h").is_file() else None
        return None, f"could not fetch {package}'s headers: {type(e).__name__}: {e}"
