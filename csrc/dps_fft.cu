// The FFT blur's normal residual A^H(A x0hat - y) with cuFFT: R2C -> spectral stage -> C2R.
//
// Compared with torch.fft.rfftn / irfftn around the spectral kernel this saves two passes over
// memory: irfftn clones its input (cuFFT's C2R overwrites it) and scales the output by 1/n in a
// separate kernel; here the spectrum is our own scratch and the 1/n is folded into W.
//
// Plans: one cuFFT plan per (device, dtype, direction, signal shape, batch), created on first use
// and kept in a small LRU cache. Plans are made without auto-allocated work areas; the caller
// passes a work area from torch's caching allocator, which is set on the plan together with the
// stream under the cache's mutex right before each execution (what torch's own cuFFT cache does),
// so one plan can serve several streams and threads.
#include "dps_kernels.cuh"

#include <cufft.h>
#include <cuda_runtime.h>

#include <cstring>
#include <initializer_list>
#include <list>
#include <mutex>
#include <string>
#include <utility>

namespace dps_fast {
namespace {

thread_local std::string g_fft_error;

const char* fft_fail(const std::string& msg) {
  g_fft_error = msg;
  return g_fft_error.c_str();
}

const char* cufft_name(cufftResult r) {
  switch (r) {
    case CUFFT_SUCCESS: return "CUFFT_SUCCESS";
    case CUFFT_INVALID_PLAN: return "CUFFT_INVALID_PLAN";
    case CUFFT_ALLOC_FAILED: return "CUFFT_ALLOC_FAILED";
    case CUFFT_INVALID_TYPE: return "CUFFT_INVALID_TYPE";
    case CUFFT_INVALID_VALUE: return "CUFFT_INVALID_VALUE";
    case CUFFT_INTERNAL_ERROR: return "CUFFT_INTERNAL_ERROR";
    case CUFFT_EXEC_FAILED: return "CUFFT_EXEC_FAILED";
    case CUFFT_SETUP_FAILED: return "CUFFT_SETUP_FAILED";
    case CUFFT_INVALID_SIZE: return "CUFFT_INVALID_SIZE";
    case CUFFT_UNALIGNED_DATA: return "CUFFT_UNALIGNED_DATA";
    case CUFFT_NOT_SUPPORTED: return "CUFFT_NOT_SUPPORTED";
    default: return "cufftResult (see cufft.h)";
  }
}

const char* cufft_fail(const char* what, cufftResult r) {
  return fft_fail(std::string(what) + " failed: " + cufft_name(r) + " (" + std::to_string(static_cast<int>(r)) +
                  ")");
}

enum class Dir : int { Forward = 0, Inverse = 1 };

struct PlanKey {
  int device = 0;
  int dtype = 0;
  int dir = 0;
  int ndim = 0;
  long long n[3] = {0, 0, 0};
  long long batch = 0;

  bool operator==(const PlanKey& o) const {
    return device == o.device && dtype == o.dtype && dir == o.dir && ndim == o.ndim && n[0] == o.n[0] &&
           n[1] == o.n[1] && n[2] == o.n[2] && batch == o.batch;
  }
};

struct Plan {
  cufftHandle handle = 0;
  size_t work_bytes = 0;
};

cufftType plan_type(const PlanKey& k) {
  const bool dbl = k.dtype == static_cast<int>(DType::Float64);
  if (k.dir == static_cast<int>(Dir::Forward)) return dbl ? CUFFT_D2Z : CUFFT_R2C;
  return dbl ? CUFFT_Z2D : CUFFT_C2R;
}

class PlanCache {
 public:
  static constexpr size_t kCapacity = 32;

  // Finds or makes the plan of `key` (on the current device); mu_ must be held.
  const char* get_locked(const PlanKey& key, Plan* out) {
    for (auto it = plans_.begin(); it != plans_.end(); ++it) {
      if (it->first == key) {
        plans_.splice(plans_.begin(), plans_, it);  // most recently used first
        *out = plans_.front().second;
        return nullptr;
      }
    }
    Plan plan;
    cufftResult r = cufftCreate(&plan.handle);
    if (r != CUFFT_SUCCESS) return cufft_fail("cufftCreate", r);
    r = cufftSetAutoAllocation(plan.handle, 0);
    if (r != CUFFT_SUCCESS) {
      cufftDestroy(plan.handle);
      return cufft_fail("cufftSetAutoAllocation", r);
    }
    long long n[3] = {key.n[0], key.n[1], key.n[2]};
    // Default (contiguous) layouts: inembed/onembed nullptr, distances implied by the shape.
    r = cufftMakePlanMany64(plan.handle, key.ndim, n, nullptr, 1, 0, nullptr, 1, 0, plan_type(key), key.batch,
                            &plan.work_bytes);
    if (r != CUFFT_SUCCESS) {
      cufftDestroy(plan.handle);
      std::string shape;
      for (int i = 0; i < key.ndim; ++i) shape += (i ? ", " : "") + std::to_string(key.n[i]);
      return cufft_fail(("cufftMakePlanMany64 (signal [" + shape + "], batch " + std::to_string(key.batch) + ")")
                            .c_str(),
                        r);
    }
    if (plans_.size() >= kCapacity) {
      cufftDestroy(plans_.back().second.handle);
      plans_.pop_back();
    }
    plans_.emplace_front(key, plan);
    *out = plan;
    return nullptr;
  }

  std::mutex& mutex() { return mu_; }

 private:
  std::mutex mu_;
  std::list<std::pair<PlanKey, Plan>> plans_;
};

// Never destroyed: cufftDestroy at process exit may run after the CUDA context is gone.
PlanCache& cache() {
  static PlanCache* c = new PlanCache();
  return *c;
}

const char* make_key(DType dtype, Dir dir, int ndim, const int64_t* signal, int64_t batch, PlanKey* key) {
  if (dtype != DType::Float32 && dtype != DType::Float64) {
    return fft_fail("blur_normal_residual: float32 or float64 only, got dtype code " +
                    std::to_string(static_cast<int>(dtype)));
  }
  if (ndim < 1 || ndim > 3) return fft_fail("blur_normal_residual: 1 to 3 signal axes, got " + std::to_string(ndim));
  int dev = 0;
  const cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return fft_fail(std::string("cudaGetDevice: ") + cudaGetErrorString(err));
  key->device = dev;
  key->dtype = static_cast<int>(dtype);
  key->dir = static_cast<int>(dir);
  key->ndim = ndim;
  for (int i = 0; i < 3; ++i) key->n[i] = i < ndim ? static_cast<long long>(signal[i]) : 0;
  key->batch = batch;
  return nullptr;
}

// Looks up the plan, binds stream and work area, and enqueues the transform, all under the lock.
const char* exec(DType dtype, Dir dir, int ndim, const int64_t* signal, int64_t batch, void* in, void* out,
                 void* work, cudaStream_t stream) {
  PlanKey key;
  if (const char* e = make_key(dtype, dir, ndim, signal, batch, &key)) return e;
  PlanCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex());
  Plan plan;
  if (const char* e = c.get_locked(key, &plan)) return e;
  cufftResult r = cufftSetStream(plan.handle, stream);
  if (r != CUFFT_SUCCESS) return cufft_fail("cufftSetStream", r);
  if (plan.work_bytes > 0) {
    if (work == nullptr) return fft_fail("blur_normal_residual: cuFFT needs a work area, got none");
    r = cufftSetWorkArea(plan.handle, work);
    if (r != CUFFT_SUCCESS) return cufft_fail("cufftSetWorkArea", r);
  }
  const bool dbl = dtype == DType::Float64;
  if (dir == Dir::Forward) {
    r = dbl ? cufftExecD2Z(plan.handle, static_cast<cufftDoubleReal*>(in), static_cast<cufftDoubleComplex*>(out))
            : cufftExecR2C(plan.handle, static_cast<cufftReal*>(in), static_cast<cufftComplex*>(out));
    if (r != CUFFT_SUCCESS) return cufft_fail(dbl ? "cufftExecD2Z" : "cufftExecR2C", r);
  } else {
    r = dbl ? cufftExecZ2D(plan.handle, static_cast<cufftDoubleComplex*>(in), static_cast<cufftDoubleReal*>(out))
            : cufftExecC2R(plan.handle, static_cast<cufftComplex*>(in), static_cast<cufftReal*>(out));
    if (r != CUFFT_SUCCESS) return cufft_fail(dbl ? "cufftExecZ2D" : "cufftExecC2R", r);
  }
  return nullptr;
}

}  // namespace

const char* blur_fft_work_bytes(DType dtype, int ndim, const int64_t* signal, int64_t batch, size_t* work_bytes) {
  *work_bytes = 0;
  if (batch <= 0) return nullptr;
  PlanCache& c = cache();
  for (Dir dir : {Dir::Forward, Dir::Inverse}) {
    PlanKey key;
    if (const char* e = make_key(dtype, dir, ndim, signal, batch, &key)) return e;
    std::lock_guard<std::mutex> lock(c.mutex());
    Plan plan;
    if (const char* e = c.get_locked(key, &plan)) return e;
    if (plan.work_bytes > *work_bytes) *work_bytes = plan.work_bytes;
  }
  return nullptr;
}

const char* launch_blur_normal_residual(const BlurArgs& a, cudaStream_t stream) {
  if (a.batch <= 0 || a.n_samples <= 0) return nullptr;
  SpectralArgs s;
  if (const char* e = blur_spectral_args(a, &s)) return e;
  if (const char* e = exec(a.dtype, Dir::Forward, a.ndim, a.signal, a.batch, const_cast<void*>(a.x0hat), a.spectrum,
                           a.fft_work, stream)) {
    return e;
  }
  if (const char* e = launch_spectral_residual(s, stream)) return e;
  return exec(a.dtype, Dir::Inverse, a.ndim, a.signal, a.batch, a.spectrum, a.out, a.fft_work, stream);
}

}  // namespace dps_fast
