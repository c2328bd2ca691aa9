"""Decides whether to build the CUDA extension ``dps_fast._C``; all metadata is in pyproject.toml.

``DPS_FAST_BUILD_CUDA=auto`` (default) builds it when nvcc is found and torch is a CUDA build,
``1`` always, ``0`` never; no GPU is probed, so a GPU-less machine builds the same wheel as a GPU
one. Without the extension the install is pure Python and the CUDA backend JIT-builds or falls back
at first use (dps_fast._cuda). Flags come from dps_fast/_build.py, shared with the JIT build.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _load_build_config():
    # By path: importing the dps_fast package here would import torch and the whole package.
    spec = importlib.util.spec_from_file_location("_dps_fast_build", HERE / "dps_fast" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extension_kwargs() -> dict:
    """``ext_modules``/``cmdclass`` for setup(): empty unless the extension is to be built."""
    build = _load_build_config()
    want, why = build.decide_build_cuda()
    if not want:
        print(f"dps_fast: not building the CUDA extension ({why}); pure-Python install", file=sys.stderr)
        return {}
    print(f"dps_fast: building the CUDA extension dps_fast._C ({why})", file=sys.stderr)
    home = build.cuda_home()
    if home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = home  # read by torch.utils.cpp_extension when it is imported
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = [os.path.relpath(p, HERE) for p in build.cuda_sources()]
    ext = CUDAExtension(
        name="dps_fast._C",
        sources=sources,
        include_dirs=build.include_dirs(),
        extra_compile_args={"cxx": build.extra_cflags(), "nvcc": build.extra_cuda_cflags(build.arch_list())},
        extra_link_args=build.extra_ldflags(),
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


if __name__ == "__main__":
    setup(**cuda_extension_kwargs())
