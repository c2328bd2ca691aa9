"""Shared pieces of the CUDA-extension checks that need no GPU (tests/cuda/test_csrc_*.py, tests/cuda/conftest.py):
nvcc flags and paths, the cuFFT stand-in header, the CPU emulator source, the schemas read from binding.cpp
and the float64 reference of the documented Philox normal layout."""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
from pathlib import Path
from typing import Optional

import pytest
import torch

from dps_fast import _build
from dps_fast.noise import philox4x32
from dps_fast.schedule import NoiseSchedule

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
NVCC = _build.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, PATH, /usr/local/cuda/bin)")

# The flags torch's extension builder always passes to nvcc (torch.utils.cpp_extension.COMMON_NVCC_FLAGS).
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
]
ARCH_FLAGS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
EXT_NAME = "dps_fast_C_check"

CUFFT_STANDIN = textwrap.dedent("""\
    /* Declaration-only stand-in for <cufft.h> (test use only): the subset of the documented cuFFT
       C API that csrc/dps_fft.cu calls, with the enum values of cufft.h. */
    #pragma once
    #include <cuComplex.h>
    #include <driver_types.h>
    #ifdef __cplusplus
    extern "C" {
    #endif
    typedef enum cufftResult_t {
      CUFFT_SUCCESS = 0x0, CUFFT_INVALID_PLAN = 0x1, CUFFT_ALLOC_FAILED = 0x2, CUFFT_INVALID_TYPE = 0x3,
      CUFFT_INVALID_VALUE = 0x4, CUFFT_INTERNAL_ERROR = 0x5, CUFFT_EXEC_FAILED = 0x6, CUFFT_SETUP_FAILED = 0x7,
      CUFFT_INVALID_SIZE = 0x8, CUFFT_UNALIGNED_DATA = 0x9, CUFFT_INVALID_DEVICE = 0xB, CUFFT_NO_WORKSPACE = 0xD,
      CUFFT_NOT_IMPLEMENTED = 0xE, CUFFT_NOT_SUPPORTED = 0x10
    } cufftResult;
    typedef float cufftReal;
    typedef double cufftDoubleReal;
    typedef cuComplex cufftComplex;
    typedef cuDoubleComplex cufftDoubleComplex;
    typedef enum cufftType_t { CUFFT_R2C = 0x2a, CUFFT_C2R = 0x2c, CUFFT_C2C = 0x29,
                               CUFFT_D2Z = 0x6a, CUFFT_Z2D = 0x6c, CUFFT_Z2Z = 0x69 } cufftType;
    typedef int cufftHandle;
    cufftResult cufftCreate(cufftHandle* handle);
    cufftResult cufftSetAutoAllocation(cufftHandle plan, int autoAllocate);
    cufftResult cufftMakePlanMany64(cufftHandle plan, int rank, long long int* n, long long int* inembed,
                                    long long int istride, long long int idist, long long int* onembed,
                                    long long int ostride, long long int odist, cufftType type,
                                    long long int batch, size_t* workSize);
    cufftResult cufftSetWorkArea(cufftHandle plan, void* workArea);
    cufftResult cufftSetStream(cufftHandle plan, cudaStream_t stream);
    cufftResult cufftExecR2C(cufftHandle plan, cufftReal* idata, cufftComplex* odata);
    cufftResult cufftExecC2R(cufftHandle plan, cufftComplex* idata, cufftReal* odata);
    cufftResult cufftExecD2Z(cufftHandle plan, cufftDoubleReal* idata, cufftDoubleComplex* odata);
    cufftResult cufftExecZ2D(cufftHandle plan, cufftDoubleComplex* idata, cufftDoubleReal* odata);
    cufftResult cufftDestroy(cufftHandle plan);
    #ifdef __cplusplus
    }
    #endif
""")


EMULATOR_SOURCE = r"""\
// CPU emulation of the dps_fast kernels (tests only): runs each kernel's thread body serially over
// the whole grid the launcher would use.
#include "dps_kernels.cu"

using namespace dps_fast;

namespace {

template <typename Body>
void emulate(unsigned gx, unsigned gy, Body body) {
  for (int64_t by = 0; by < gy; ++by)
    for (int64_t bx = 0; bx < gx; ++bx)
      for (int64_t tx = 0; tx < kThreads; ++tx) body(Grid{bx, by, gx, gy, tx, kThreads});
}

template <typename T>
int update_t(const UpdateArgs& a, unsigned gx, unsigned gy, int vec, unsigned* used) {
  const UpdateParams<T> p = update_params<T>(a);
  LaunchPlan plan = plan_update<T>(p);
  if (gx) plan.gx = gx;
  if (gy) plan.gy = gy;
  if (vec >= 0) plan.vec = plan.vec && vec;
  used[0] = plan.gx;
  used[1] = plan.gy;
  if (plan.vec) {
    emulate(plan.gx, plan.gy, [&](const Grid& g) { dps_update_thread<T, true>(p, g); });
  } else {
    emulate(plan.gx, plan.gy, [&](const Grid& g) { dps_update_thread<T, false>(p, g); });
  }
  return plan.vec ? 1 : 0;
}

template <typename R, typename Idx>
void spectral_t(const SpectralArgs& a) {
  const SpectralParams<R, Idx> p = spectral_params<R, Idx>(a);
  const unsigned gy = grid_y(a.n_samples);
  R* partials = static_cast<R*>(a.partials);
  for (int64_t by = 0; by < gy; ++by)
    for (int64_t n = by; n < a.n_samples; n += gy)
      for (int64_t bx = 0; bx < a.blocks_per_sample; ++bx) {
        R block = R(0);
        for (int64_t tx = 0; tx < kThreads; ++tx)
          block += spectral_thread<R, Idx>(p, n, Grid{bx, by, a.blocks_per_sample, gy, tx, kThreads});
        partials[n * a.blocks_per_sample + bx] = block;
      }
  for (int64_t n = 0; n < a.n_samples; ++n) {
    R acc = R(0);
    for (int64_t b = 0; b < a.blocks_per_sample; ++b) acc += partials[n * a.blocks_per_sample + b];
    static_cast<R*>(a.rnorm2)[n] = acc / static_cast<R>(a.npix);
  }
}

template <typename R>
void spectral_r(const SpectralArgs& a) {
  if (spectral_index32(a)) {
    spectral_t<R, uint32_t>(a);
  } else {
    spectral_t<R, uint64_t>(a);
  }
}

}  // namespace

extern "C" {

int emu_dps_update(int dtype, const void* x, const void* eps, const void* w, const void* u, const void* v,
                   const void* noise, const int64_t* seeds, const void* gscale, const void* coefs, void* out,
                   void* x0hat, int64_t n, int64_t per_sample, int64_t eps_stride, int64_t v_stride, uint32_t step,
                   int clip, double lo, double hi, int variance, unsigned gx, unsigned gy, int vec, unsigned* used) {
  UpdateArgs a;
  a.dtype = static_cast<DType>(dtype);
  a.x = x; a.eps = eps; a.w = w; a.u = u; a.v = v; a.noise = noise; a.seeds = seeds; a.gscale = gscale;
  a.coefs = coefs; a.out = out; a.x0hat = x0hat; a.n_samples = n; a.per_sample = per_sample;
  a.eps_stride = eps_stride; a.v_stride = v_stride; a.step = step;
  a.clip = clip != 0; a.lo = lo; a.hi = hi; a.variance = variance;
  switch (a.dtype) {
    case DType::Float32: return update_t<float>(a, gx, gy, vec, used);
    case DType::Float64: return update_t<double>(a, gx, gy, vec, used);
    case DType::Float16: return update_t<__half>(a, gx, gy, vec, used);
    case DType::BFloat16: return update_t<__nv_bfloat16>(a, gx, gy, vec, used);
  }
  return -1;
}

void emu_philox_words(const int64_t* seeds, int64_t n, int64_t calls, uint32_t step, uint32_t stream_id,
                      int32_t* out, unsigned gx, unsigned gy) {
  emulate(gx, gy, [&](const Grid& g) { philox_words_thread(seeds, n, calls, step, stream_id, out, g); });
}

void emu_philox_normal(int dtype, const int64_t* seeds, int64_t n, int64_t numel, uint32_t step,
                       uint32_t stream_id, void* out, unsigned gx, unsigned gy) {
  if (dtype == 0) {
    emulate(gx, gy, [&](const Grid& g) {
      philox_normal_thread<float>(seeds, n, numel, step, stream_id, static_cast<float*>(out), g); });
  } else {
    emulate(gx, gy, [&](const Grid& g) {
      philox_normal_thread<double>(seeds, n, numel, step, stream_id, static_cast<double*>(out), g); });
  }
}

// blocks == 0: spectral_blocks_per_sample(); returns 0 on success.
int emu_spectral(int dtype, const void* X, const void* K, const void* Y, void* W, void* rnorm2, void* partials,
                 int64_t n, int64_t per_sample, int64_t k_numel, int64_t f_last, int64_t n_last, int64_t npix,
                 double w_scale, int64_t blocks) {
  SpectralArgs a;
  a.dtype = static_cast<DType>(dtype);
  a.X = X; a.K = K; a.Y = Y; a.W = W; a.rnorm2 = rnorm2; a.partials = partials; a.n_samples = n;
  a.per_sample = per_sample; a.k_numel = k_numel; a.f_last = f_last; a.n_last = n_last; a.npix = npix;
  a.w_scale = w_scale;
  a.blocks_per_sample = blocks ? blocks : spectral_blocks_per_sample(a.dtype, n, per_sample);
  if (a.dtype == DType::Float64) spectral_r<double>(a); else spectral_r<float>(a);
  return 0;
}

int64_t emu_spectral_blocks(int dtype, int64_t n, int64_t per_sample) {
  return spectral_blocks_per_sample(static_cast<DType>(dtype), n, per_sample);
}

// The grid the launchers plan (blocks within a sample) for a kernel of `kind` (0: update float32
// vector path, 1: philox_normal float32, 2: philox_words) over `items` work items per sample.
unsigned emu_blocks_within_sample(int kind, int64_t items, int64_t n) {
  const int per_sm = kind == 0 ? resident_blocks_per_sm<dps_update_kernel<float, true>>()
                   : kind == 1 ? resident_blocks_per_sm<philox_normal_kernel<float>>()
                               : resident_blocks_per_sm<philox_words_kernel>();
  return blocks_within_sample(items, n, per_sm);
}

// The blur's spectral stage as launch_blur_normal_residual sets it up, on a given spectrum.
int emu_blur_spectral(int dtype, int ndim, const int64_t* signal, int64_t batch, int64_t n, void* spectrum,
                      const void* K, const void* Y, void* rnorm2, void* partials, int64_t blocks) {
  BlurArgs b;
  b.dtype = static_cast<DType>(dtype);
  b.ndim = ndim;
  for (int i = 0; i < ndim; ++i) b.signal[i] = signal[i];
  b.batch = batch; b.n_samples = n; b.spectrum = spectrum; b.K = K; b.Y = Y; b.rnorm2 = rnorm2;
  b.partials = partials; b.blocks_per_sample = blocks;
  SpectralArgs s;
  if (blur_spectral_args(b, &s) != nullptr) return 1;
  if (s.dtype == DType::Float64) spectral_r<double>(s); else spectral_r<float>(s);
  return 0;
}

}  // extern "C"
"""



def run_cmd(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def cuda_include() -> Optional[str]:
    home = _build.cuda_home()
    for cand in ([os.path.join(home, "include")] if home else []) + ["/usr/local/cuda/include"]:
        if os.path.isfile(os.path.join(cand, "cuda_runtime_api.h")):
            return cand
    return None


def cudart_dir() -> Optional[str]:
    home = _build.cuda_home()
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        d = os.path.join(home or "/usr/local/cuda", sub)
        if os.path.isfile(os.path.join(d, "libcudart.so")):
            return d
    return None


def schemas_from_source() -> dict[str, str]:
    """{op name: schema} from binding.cpp's m.def("...") calls (adjacent literals concatenated)."""
    text = (CSRC / "binding.cpp").read_text()
    body = re.search(r"TORCH_LIBRARY\(dps_fast,\s*m\)\s*\{(.*?)\n\}", text, re.S)
    assert body, "TORCH_LIBRARY(dps_fast, m) block not found in binding.cpp"
    out = {}
    for call in re.findall(r"m\.def\((.*?)\);", body.group(1), re.S):
        schema = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call))
        out[schema.split("(", 1)[0]] = schema
    return out


def normals_from_words(w: torch.Tensor, numel: int) -> torch.Tensor:
    """float64 normals ``[N, numel]`` of the words ``[N, calls, 4]`` of calls 0.. by the documented
    layout (dps_fast.noise): element e = slot e % 4 of call e // 4, slots (rho cos, rho sin) of the
    pairs (r0, r1) and (r2, r3)."""
    w = w.to(torch.int64) & 0xFFFFFFFF
    ra, rb = w[..., 0::2], w[..., 1::2]                     # [N, calls, 2 pairs]
    rho = torch.sqrt(-2 * torch.log(((ra >> 8) + 1).double() * 2.0**-24))
    theta = 2 * torch.pi * (rb >> 8).double() * 2.0**-24
    z = torch.stack((rho * torch.cos(theta), rho * torch.sin(theta)), -1)  # [N, calls, pair, (cos, sin)]
    return z.flatten(1)[:, :numel]


def cpu_philox_words(seeds, calls, step, stream):
    m32 = 0xFFFFFFFF
    k0, k1 = (seeds & m32).unsqueeze(1), ((seeds >> 32) & m32).unsqueeze(1)
    c0 = torch.arange(calls, dtype=torch.int64).unsqueeze(0)
    full = lambda val: torch.full((1, 1), val, dtype=torch.int64)  # noqa: E731
    words = philox4x32(c0, full(step & m32), full(stream & m32), full(0), k0, k1)
    w = torch.stack(torch.broadcast_tensors(*words), -1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def update_inputs(dtype=torch.float64, n=3, shape=(2, 5, 3)):
    g = torch.Generator().manual_seed(0)
    r = lambda: torch.randn(n, *shape, generator=g, dtype=dtype)  # noqa: E731
    coefs = NoiseSchedule.linear(1000).respace(50).table(dtype)[7].clone()
    return dict(x=r(), eps=r(), w=r(), u=r(), gscale=torch.rand(n, generator=g, dtype=dtype), coefs=coefs,
                v=r().clamp(-1, 1), seeds=torch.tensor([1, 2**40 + 3, 7], dtype=torch.int64)[:n], noise=r())
