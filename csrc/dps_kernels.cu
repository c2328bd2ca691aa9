// Fused elementwise kernels of dps_fast: the guided DDPM update, the Philox noise stream and the
// spectral stage of the FFT blur's normal residual. Each implements one function of
// dps_fast/backends/torch_ops.py (the contract) or dps_fast/noise.py; see dps_kernels.cuh.
//
// Built without --use_fast_math on purpose: the in-kernel noise must agree with the pure-torch
// stream, so log/sincos/sqrt are the correctly-rounded-to-a-few-ulp library versions.
//
// Noise layout (dps_fast/noise.py): element e of a sample is slot e % 4 of the Philox call with
// counter (e / 4, step, stream, 0); (r0, r1) give slots 0, 1 (rho cos, rho sin), (r2, r3) slots
// 2, 3. So every noise-drawing thread owns groups of 4 consecutive elements of one sample: one
// Philox call and two sincos per group, where one call per element kept the update compute-bound.
#include "dps_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <string>

// Each kernel is a thin __global__ shell around a __host__ __device__ "thread body" that takes its
// grid coordinates as arguments: tests/cuda/test_csrc_compile.py runs those bodies on the CPU over
// a whole emulated grid (no GPU needed) and compares them with the pure-torch reference.
#define DPS_HD __host__ __device__ __forceinline__
#if defined(__CUDA_ARCH__)
#define DPS_UNROLL _Pragma("unroll")
#else
#define DPS_UNROLL
#endif

namespace dps_fast {
namespace {

constexpr int kThreads = 256;

// Grid coordinates of one thread (blockIdx/gridDim/threadIdx/blockDim on the device).
struct Grid {
  int64_t bx, by, gx, gy, tx, bdx;
};

__device__ __forceinline__ Grid this_thread() {
  return {static_cast<int64_t>(blockIdx.x), static_cast<int64_t>(blockIdx.y), static_cast<int64_t>(gridDim.x),
          static_cast<int64_t>(gridDim.y), static_cast<int64_t>(threadIdx.x), static_cast<int64_t>(blockDim.x)};
}
constexpr int kMaxGridY = 65535;
constexpr int kMaxDevices = 64;
// Used when the runtime cannot answer (no device: the CPU emulation of the tests). A guess from
// the update kernel's register use, the reason for the occupancy query: ptxas -v for sm_90 reports
// 48 registers for the float32 update (5 resident 256-thread blocks per SM of 65536 registers),
// 44-52 for the 16-bit ones and 58-90 for float64 (2-4), not the 8 blocks that 2048 threads per
// SM would suggest.
constexpr int kFallbackBlocksPerSm = 4;
constexpr int kFallbackSmCount = 108;

thread_local std::string g_error;

const char* cuda_status(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return nullptr;
  g_error = std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
  return g_error.c_str();
}

const char* fail(const std::string& msg) {
  g_error = msg;
  return g_error.c_str();
}

// The current device (the op's binding set it with a CUDAGuard), or -1 when there is none.
int current_device() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return dev >= 0 && dev < kMaxDevices ? dev : -1;
}

// Streaming multiprocessors of the current device, cached per device (a runtime query of the
// device the op runs on, not a build-time probe).
int sm_count() {
  static std::atomic<int> cache[kMaxDevices];
  const int dev = current_device();
  if (dev < 0) return kFallbackSmCount;
  int n = cache[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
      cudaGetLastError();
      n = kFallbackSmCount;
    }
    cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Resident kThreads-thread blocks per SM of one kernel on the current device, from the occupancy
// API (registers, shared memory and the launch bounds of that kernel), cached per kernel and device.
template <auto Kernel>
int resident_blocks_per_sm() {
  static std::atomic<int> cache[kMaxDevices];
  const int dev = current_device();
  if (dev < 0) return kFallbackBlocksPerSm;
  int n = cache[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, kThreads, 0) != cudaSuccess || n <= 0) {
      cudaGetLastError();
      n = kFallbackBlocksPerSm;
    }
    cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks along y: one per sample, capped at the grid's limit (the kernels stride over the rest).
unsigned grid_y(int64_t n_samples) { return static_cast<unsigned>(n_samples < kMaxGridY ? n_samples : kMaxGridY); }

// Blocks along x (within a sample) so that grid.x * grid.y fills the device about once with
// `blocks_per_sm` resident blocks per SM; the kernels grid-stride over whatever is left.
unsigned blocks_within_sample(int64_t work_items, int64_t n_samples, int blocks_per_sm) {
  const int64_t gy = n_samples > 0 ? grid_y(n_samples) : 1;
  const int64_t target = static_cast<int64_t>(sm_count()) * blocks_per_sm;
  int64_t bx = ceil_div(target, gy);
  const int64_t need = ceil_div(work_items, kThreads);
  if (bx > need) bx = need;
  if (bx < 1) bx = 1;
  return static_cast<unsigned>(bx);
}

// ---- arithmetic types ---------------------------------------------------------------------
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

DPS_HD float to_acc(float v) { return v; }
DPS_HD double to_acc(double v) { return v; }
DPS_HD float to_acc(__half v) { return __half2float(v); }
DPS_HD float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> DPS_HD T from_acc(typename AccType<T>::type v);
template <> DPS_HD float from_acc<float>(float v) { return v; }
template <> DPS_HD double from_acc<double>(double v) { return v; }
template <> DPS_HD __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> DPS_HD __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

DPS_HD float acc_exp(float v) { return expf(v); }
DPS_HD double acc_exp(double v) { return exp(v); }

// ---- Philox4x32-10, exactly dps_fast.noise.philox4x32 -------------------------------------
struct Words { uint32_t r0, r1, r2, r3; };

DPS_HD uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

DPS_HD Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                               uint32_t k0, uint32_t k1) {
  constexpr uint32_t kA = 0xD2511F53u, kB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  DPS_UNROLL
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi_b = mulhi(kB, c2), lo_b = kB * c2;
    const uint32_t hi_a = mulhi(kA, c0), lo_a = kA * c0;
    const uint32_t n0 = hi_b ^ c1 ^ k0;
    const uint32_t n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return {c0, c1, c2, c3};
}

// One Box-Muller pair: (rho cos theta, rho sin theta), u1 = ((ra >> 8) + 1) 2^-24,
// u2 = (rb >> 8) 2^-24, rho = sqrt(-2 ln u1), theta = 2 pi u2; in float32 for every state dtype
// but float64, as noise.philox_normal ("work" dtype) does.
DPS_HD void box_muller(uint32_t ra, uint32_t rb, float* z) {
  const float u1 = static_cast<float>((ra >> 8) + 1u) * 0x1p-24f;
  const float u2 = static_cast<float>(rb >> 8) * 0x1p-24f;
  const float rho = sqrtf(-2.0f * logf(u1));
  float s, c;
  sincosf(6.28318530717958647692f * u2, &s, &c);
  z[0] = rho * c;
  z[1] = rho * s;
}
DPS_HD void box_muller(uint32_t ra, uint32_t rb, double* z) {
  const double u1 = static_cast<double>((ra >> 8) + 1u) * 0x1p-24;
  const double u2 = static_cast<double>(rb >> 8) * 0x1p-24;
  const double rho = sqrt(-2.0 * log(u1));
  double s, c;
  sincos(6.28318530717958647692 * u2, &s, &c);
  z[0] = rho * c;
  z[1] = rho * s;
}

// The four normals (slots 0..3) of Philox call `call` of one sample.
template <typename A>
DPS_HD void philox_normal4(uint32_t call, uint32_t step, uint32_t stream_id, uint32_t k0, uint32_t k1, A* z) {
  const Words r = philox4x32_10(call, step, stream_id, 0u, k0, k1);
  box_muller(r.r0, r.r1, z);
  box_muller(r.r2, r.r3, z + 2);
}

DPS_HD void seed_key(int64_t seed, uint32_t* k0, uint32_t* k1) {
  const uint64_t s = static_cast<uint64_t>(seed);
  *k0 = static_cast<uint32_t>(s);
  *k1 = static_cast<uint32_t>(s >> 32);
}

// ---- vector access -------------------------------------------------------------------------
template <typename T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };

// A group of 4 consecutive elements: one 16-byte (float32), 8-byte (16-bit types) or two 16-byte
// (float64) accesses, from a base aligned to kGroupAlign<T> bytes.
template <typename T> constexpr int kGroupAlign = sizeof(T) * 4 < 16 ? sizeof(T) * 4 : 16;

template <typename T> DPS_HD void load4(const T* p, T* out) {
  if constexpr (sizeof(T) * 4 <= 16) {
    const Pack<T, 4> v = *reinterpret_cast<const Pack<T, 4>*>(p);
    DPS_UNROLL
    for (int k = 0; k < 4; ++k) out[k] = v.v[k];
  } else {
    const Pack<T, 2> a = *reinterpret_cast<const Pack<T, 2>*>(p);
    const Pack<T, 2> b = *reinterpret_cast<const Pack<T, 2>*>(p + 2);
    out[0] = a.v[0];
    out[1] = a.v[1];
    out[2] = b.v[0];
    out[3] = b.v[1];
  }
}
template <typename T> DPS_HD void store4(T* p, const T* in) {
  if constexpr (sizeof(T) * 4 <= 16) {
    Pack<T, 4> v;
    DPS_UNROLL
    for (int k = 0; k < 4; ++k) v.v[k] = in[k];
    *reinterpret_cast<Pack<T, 4>*>(p) = v;
  } else {
    Pack<T, 2> a, b;
    a.v[0] = in[0];
    a.v[1] = in[1];
    b.v[0] = in[2];
    b.v[1] = in[3];
    *reinterpret_cast<Pack<T, 2>*>(p) = a;
    *reinterpret_cast<Pack<T, 2>*>(p + 2) = b;
  }
}

bool aligned(const void* p, int bytes) { return (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes)) == 0; }

// ---- fused update ----------------------------------------------------------------------------
template <typename T> struct UpdateParams {
  using A = typename AccType<T>::type;
  const T* x; const T* eps; const T* w; const T* u; const T* v; const T* noise;
  const int64_t* seeds; const A* gscale; const A* coefs; T* out; T* x0hat;
  int64_t n_samples; int64_t per_sample; int64_t eps_stride; int64_t v_stride;
  uint32_t step; int clip; A lo, hi; int variance;
};

template <typename T> struct StepCoefs {
  using A = typename AccType<T>::type;
  A sra, srm1, s1m2sra, s1m, cx0, cxt, sigma, log_beta, log_var_small, nonzero;
};

// The update of one element (torch_ops.dps_update): returns x_{t-1}, writes the clamped x0hat.
template <typename T>
DPS_HD typename AccType<T>::type update_one(const UpdateParams<T>& p, const StepCoefs<T>& c, T xv, T ev, T wv,
                                            T uv, T vv, typename AccType<T>::type z,
                                            typename AccType<T>::type gs, T* x0_out) {
  using A = typename AccType<T>::type;
  const A x = to_acc(xv);
  // torch_ops.tweedie, then torch.clamp's min(max(x, lo), hi) with NaN propagated
  A x0 = c.sra * x - c.srm1 * to_acc(ev);
  if (p.clip) {
    x0 = x0 < p.lo ? p.lo : x0;
    x0 = x0 > p.hi ? p.hi : x0;
  }
  A sigma = c.sigma;
  if (p.variance == static_cast<int>(Variance::LearnedRange)) {
    const A f = (to_acc(vv) + A(1)) * A(0.5);
    const A log_var = f * c.log_beta + (A(1) - f) * c.log_var_small;
    sigma = c.nonzero * acc_exp(A(0.5) * log_var);
  }
  const A g = (to_acc(wv) - c.s1m * to_acc(uv)) * c.s1m2sra;
  *x0_out = from_acc<T>(x0);
  return c.cx0 * x0 + c.cxt * x + sigma * z - gs * g;
}

template <typename T>
DPS_HD StepCoefs<T> step_coefs(const UpdateParams<T>& p) {
  using A = typename AccType<T>::type;
  StepCoefs<T> c;
  c.sra = p.coefs[coef::SQRT_RECIP_ABAR];
  c.srm1 = p.coefs[coef::SQRT_RECIPM1_ABAR];
  c.s1m = p.coefs[coef::SQRT_1M_ABAR];
  c.s1m2sra = A(2) * c.sra;
  c.cx0 = p.coefs[coef::COEF_X0];
  c.cxt = p.coefs[coef::COEF_XT];
  c.sigma = p.coefs[p.variance == static_cast<int>(Variance::FixedLarge) ? coef::SIGMA_LARGE : coef::SIGMA_SMALL];
  c.log_beta = p.coefs[coef::LOG_BETA];
  c.log_var_small = p.coefs[coef::LOG_VAR_SMALL];
  c.nonzero = p.coefs[coef::NONZERO];
  return c;
}

// One thread of the update grid (blocks within a sample, samples). Work item = one group of 4
// consecutive elements j = 4 g .. 4 g + 3 of a sample = one Philox call. VEC: every group is
// whole (per_sample % 4 == 0) and starts kGroupAlign-aligned in every tensor (checked by
// plan_update), so each tensor is read and written with vector accesses; else element by element
// with the tail group masked.
template <typename T, bool VEC>
DPS_HD void dps_update_thread(const UpdateParams<T>& p, const Grid& g) {
  using A = typename AccType<T>::type;
  const StepCoefs<T> c = step_coefs(p);
  const bool learned = p.variance == static_cast<int>(Variance::LearnedRange);
  const int64_t M = p.per_sample;
  const int64_t groups = (M + 3) / 4;
  const int64_t stride = g.gx * g.bdx;
  for (int64_t n = g.by; n < p.n_samples; n += g.gy) {
    const int64_t base = n * M, ebase = n * p.eps_stride, vbase = n * p.v_stride;
    const A gs = p.gscale[n];
    uint32_t k0 = 0, k1 = 0;
    if (p.noise == nullptr) seed_key(p.seeds[n], &k0, &k1);
    for (int64_t grp = g.bx * g.bdx + g.tx; grp < groups; grp += stride) {
      const int64_t j = 4 * grp;
      A z[4] = {A(0), A(0), A(0), A(0)};
      if (p.noise == nullptr) philox_normal4<A>(static_cast<uint32_t>(grp), p.step, 0u, k0, k1, z);
      if constexpr (VEC) {
        T xv[4], ev[4], wv[4], uv[4], vv[4], res[4], x0[4];
        load4(p.x + base + j, xv);
        load4(p.eps + ebase + j, ev);
        load4(p.w + base + j, wv);
        load4(p.u + base + j, uv);
        if (learned) load4(p.v + vbase + j, vv);
        if (p.noise != nullptr) {
          T nv[4];
          load4(p.noise + base + j, nv);
          DPS_UNROLL
          for (int k = 0; k < 4; ++k) z[k] = to_acc(nv[k]);
        }
        DPS_UNROLL
        for (int k = 0; k < 4; ++k) {
          res[k] = from_acc<T>(update_one(p, c, xv[k], ev[k], wv[k], uv[k], learned ? vv[k] : xv[k], z[k], gs,
                                          &x0[k]));
        }
        store4(p.out + base + j, res);
        if (p.x0hat != nullptr) store4(p.x0hat + base + j, x0);
      } else {
        const int cnt = M - j < 4 ? static_cast<int>(M - j) : 4;
        for (int k = 0; k < cnt; ++k) {
          const int64_t e = j + k;
          const A zk = p.noise != nullptr ? to_acc(p.noise[base + e]) : z[k];
          T x0;
          const A r = update_one(p, c, p.x[base + e], p.eps[ebase + e], p.w[base + e], p.u[base + e],
                                 learned ? p.v[vbase + e] : p.x[base + e], zk, gs, &x0);
          p.out[base + e] = from_acc<T>(r);
          if (p.x0hat != nullptr) p.x0hat[base + e] = x0;
        }
      }
    }
  }
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) dps_update_kernel(UpdateParams<T> p) {
  dps_update_thread<T, VEC>(p, this_thread());
}

template <typename T>
UpdateParams<T> update_params(const UpdateArgs& a) {
  using A = typename AccType<T>::type;
  UpdateParams<T> p;
  p.x = static_cast<const T*>(a.x);
  p.eps = static_cast<const T*>(a.eps);
  p.w = static_cast<const T*>(a.w);
  p.u = static_cast<const T*>(a.u);
  p.v = static_cast<const T*>(a.v);
  p.noise = static_cast<const T*>(a.noise);
  p.seeds = a.seeds;
  p.gscale = static_cast<const A*>(a.gscale);
  p.coefs = static_cast<const A*>(a.coefs);
  p.out = static_cast<T*>(a.out);
  p.x0hat = static_cast<T*>(a.x0hat);
  p.n_samples = a.n_samples;
  p.per_sample = a.per_sample;
  p.eps_stride = a.eps_stride >= 0 ? a.eps_stride : a.per_sample;
  p.v_stride = a.v_stride >= 0 ? a.v_stride : a.per_sample;
  p.step = a.step;
  p.clip = a.clip ? 1 : 0;
  // torch.clamp casts its Python-float bounds to the tensor's compute type
  p.lo = static_cast<A>(a.lo);
  p.hi = static_cast<A>(a.hi);
  p.variance = a.variance;
  return p;
}

struct LaunchPlan {
  unsigned gx, gy;
  bool vec;
};

// Whole, aligned groups in every tensor the update touches.
template <typename T>
bool update_vectorizable(const UpdateParams<T>& p) {
  constexpr int al = kGroupAlign<T>;
  bool vec = p.per_sample % 4 == 0 && p.eps_stride % 4 == 0 && aligned(p.x, al) && aligned(p.eps, al) &&
             aligned(p.w, al) && aligned(p.u, al) && aligned(p.out, al);
  if (p.variance == static_cast<int>(Variance::LearnedRange)) vec = vec && p.v_stride % 4 == 0 && aligned(p.v, al);
  if (p.noise != nullptr) vec = vec && aligned(p.noise, al);
  if (p.x0hat != nullptr) vec = vec && aligned(p.x0hat, al);
  return vec;
}

template <typename T>
LaunchPlan plan_update(const UpdateParams<T>& p) {
  const bool vec = update_vectorizable(p);
  const int per_sm = vec ? resident_blocks_per_sm<dps_update_kernel<T, true>>()
                         : resident_blocks_per_sm<dps_update_kernel<T, false>>();
  return {blocks_within_sample((p.per_sample + 3) / 4, p.n_samples, per_sm), grid_y(p.n_samples), vec};
}

template <typename T>
const char* launch_update_t(const UpdateArgs& a, cudaStream_t stream) {
  const UpdateParams<T> p = update_params<T>(a);
  const LaunchPlan plan = plan_update<T>(p);
  const dim3 grid(plan.gx, plan.gy);
  if (plan.vec) {
    dps_update_kernel<T, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    dps_update_kernel<T, false><<<grid, kThreads, 0, stream>>>(p);
  }
  return cuda_status("dps_update kernel launch");
}

// ---- noise stream ----------------------------------------------------------------------------
// One thread per Philox call: the (up to) 4 consecutive elements 4 call .. 4 call + 3 of a sample.
template <typename T>
DPS_HD void philox_normal_thread(const int64_t* seeds, int64_t n_samples, int64_t numel, uint32_t step,
                                 uint32_t stream_id, T* out, const Grid& g) {
  using A = typename AccType<T>::type;
  const int64_t calls = (numel + 3) / 4;
  for (int64_t n = g.by; n < n_samples; n += g.gy) {
    uint32_t k0, k1;
    seed_key(seeds[n], &k0, &k1);
    for (int64_t c = g.bx * g.bdx + g.tx; c < calls; c += g.gx * g.bdx) {
      A z[4];
      philox_normal4<A>(static_cast<uint32_t>(c), step, stream_id, k0, k1, z);
      const int cnt = numel - 4 * c < 4 ? static_cast<int>(numel - 4 * c) : 4;
      for (int k = 0; k < cnt; ++k) out[n * numel + 4 * c + k] = from_acc<T>(z[k]);
    }
  }
}

// The raw words of the calls 0 .. calls - 1 (counter (c, step, stream, 0)).
DPS_HD void philox_words_thread(const int64_t* seeds, int64_t n_samples, int64_t calls, uint32_t step,
                                uint32_t stream_id, int32_t* out, const Grid& g) {
  for (int64_t n = g.by; n < n_samples; n += g.gy) {
    uint32_t k0, k1;
    seed_key(seeds[n], &k0, &k1);
    for (int64_t c = g.bx * g.bdx + g.tx; c < calls; c += g.gx * g.bdx) {
      const Words r = philox4x32_10(static_cast<uint32_t>(c), step, stream_id, 0u, k0, k1);
      int32_t* o = out + (n * calls + c) * 4;
      o[0] = static_cast<int32_t>(r.r0);
      o[1] = static_cast<int32_t>(r.r1);
      o[2] = static_cast<int32_t>(r.r2);
      o[3] = static_cast<int32_t>(r.r3);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
philox_normal_kernel(const int64_t* seeds, int64_t n_samples, int64_t numel, uint32_t step, uint32_t stream_id,
                     T* out) {
  philox_normal_thread<T>(seeds, n_samples, numel, step, stream_id, out, this_thread());
}

__global__ void __launch_bounds__(kThreads)
philox_words_kernel(const int64_t* seeds, int64_t n_samples, int64_t calls, uint32_t step, uint32_t stream_id,
                    int32_t* out) {
  philox_words_thread(seeds, n_samples, calls, step, stream_id, out, this_thread());
}

template <typename T>
void launch_normal_t(const int64_t* seeds, int64_t n_samples, int64_t numel, uint32_t step, uint32_t stream_id,
                     void* out, cudaStream_t stream) {
  const dim3 grid(blocks_within_sample((numel + 3) / 4, n_samples, resident_blocks_per_sm<philox_normal_kernel<T>>()),
                  grid_y(n_samples));
  philox_normal_kernel<T><<<grid, kThreads, 0, stream>>>(seeds, n_samples, numel, step, stream_id,
                                                          static_cast<T*>(out));
}

// ---- spectral stage ---------------------------------------------------------------------------
template <typename R> struct Cplx;
template <> struct Cplx<float> { using type = float2; };
template <> struct Cplx<double> { using type = double2; };

template <typename R, typename Idx> struct SpectralParams {
  using C = typename Cplx<R>::type;
  const C* X; const C* K; const C* Y; C* W; R* partials;
  int64_t n_samples; Idx per_sample, k_numel, f_last; int even_last; R w_scale;
};

// One thread's share of sample n: writes its elements of W, returns its part of
// sum(parseval weight * |K X - Y|^2).
template <typename R, typename Idx>
DPS_HD R spectral_thread(const SpectralParams<R, Idx>& p, int64_t n, const Grid& g) {
  using C = typename Cplx<R>::type;
  const int64_t base = n * static_cast<int64_t>(p.per_sample);
  const C* xs = p.X + base;
  const C* ys = p.Y + base;
  C* ws = p.W + base;
  const Idx stride = static_cast<Idx>(g.gx * g.bdx);
  R acc = R(0);
  for (Idx e = static_cast<Idx>(g.bx * g.bdx + g.tx); e < p.per_sample; e += stride) {
    const Idx ki = e % p.k_numel;
    const Idx last = ki % p.f_last;
    const C k = p.K[ki];
    const C x = xs[e];
    const C y = ys[e];
    // R = K X - Y, W = conj(K) R, as complex64/complex128 arithmetic in torch
    const R rr = (k.x * x.x - k.y * x.y) - y.x;
    const R ri = (k.x * x.y + k.y * x.x) - y.y;
    const R wt = (last == 0 || (p.even_last && last == p.f_last - 1)) ? R(1) : R(2);
    acc += (rr * rr + ri * ri) * wt;
    C wv;
    wv.x = (k.x * rr + k.y * ri) * p.w_scale;
    wv.y = (k.x * ri - k.y * rr) * p.w_scale;
    ws[e] = wv;
  }
  return acc;
}

// Deterministic block sum (fixed shuffle tree, then warp 0 over the warp sums).
template <typename R>
__device__ __forceinline__ R block_sum(R v, R* shared) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // `shared` may still be read from the previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  v = static_cast<int>(threadIdx.x) < nwarps ? shared[threadIdx.x] : R(0);
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;  // valid in thread 0
}

template <typename R, typename Idx>
__global__ void __launch_bounds__(kThreads) spectral_kernel(SpectralParams<R, Idx> p) {
  __shared__ R shared[kThreads / 32];
  const Grid g = this_thread();
  for (int64_t n = g.by; n < p.n_samples; n += g.gy) {
    const R total = block_sum(spectral_thread<R, Idx>(p, n, g), shared);
    if (threadIdx.x == 0) p.partials[n * g.gx + g.bx] = total;
  }
}

template <typename R>
__global__ void __launch_bounds__(kThreads)
spectral_finalize_kernel(const R* partials, int64_t n_samples, int64_t blocks_per_sample, R npix, R* rnorm2) {
  __shared__ R shared[kThreads / 32];
  for (int64_t n = blockIdx.x; n < n_samples; n += gridDim.x) {
    R acc = R(0);
    for (int64_t b = threadIdx.x; b < blocks_per_sample; b += blockDim.x) acc += partials[n * blocks_per_sample + b];
    const R total = block_sum(acc, shared);
    if (threadIdx.x == 0) rnorm2[n] = total / npix;
  }
}

template <typename R, typename Idx>
SpectralParams<R, Idx> spectral_params(const SpectralArgs& a) {
  using C = typename Cplx<R>::type;
  SpectralParams<R, Idx> p;
  p.X = static_cast<const C*>(a.X);
  p.K = static_cast<const C*>(a.K);
  p.Y = static_cast<const C*>(a.Y);
  p.W = static_cast<C*>(a.W);
  p.partials = static_cast<R*>(a.partials);
  p.n_samples = a.n_samples;
  p.per_sample = static_cast<Idx>(a.per_sample);
  p.k_numel = static_cast<Idx>(a.k_numel);
  p.f_last = static_cast<Idx>(a.f_last);
  p.even_last = (a.n_last % 2 == 0) ? 1 : 0;
  p.w_scale = static_cast<R>(a.w_scale);
  return p;
}

// 32-bit index arithmetic (two modulos per element) whenever the grid-stride loop cannot wrap.
bool spectral_index32(const SpectralArgs& a) {
  return a.per_sample + a.blocks_per_sample * kThreads < (int64_t{1} << 31);
}

// Resident blocks per SM of the spectral kernel variant a launch of `dtype` may use (the fewer of
// the two index widths, so the partials sized before the launch fit either).
int spectral_blocks_per_sm(DType dtype) {
  if (dtype == DType::Float64) {
    return std::min(resident_blocks_per_sm<spectral_kernel<double, uint32_t>>(),
                    resident_blocks_per_sm<spectral_kernel<double, uint64_t>>());
  }
  return std::min(resident_blocks_per_sm<spectral_kernel<float, uint32_t>>(),
                  resident_blocks_per_sm<spectral_kernel<float, uint64_t>>());
}

template <typename R>
const char* launch_spectral_t(const SpectralArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.blocks_per_sample), grid_y(a.n_samples));
  if (spectral_index32(a)) {
    spectral_kernel<R, uint32_t><<<grid, kThreads, 0, stream>>>(spectral_params<R, uint32_t>(a));
  } else {
    spectral_kernel<R, uint64_t><<<grid, kThreads, 0, stream>>>(spectral_params<R, uint64_t>(a));
  }
  if (const char* err = cuda_status("spectral_residual kernel launch")) return err;
  const unsigned fin_blocks = grid_y(a.n_samples);
  spectral_finalize_kernel<R><<<fin_blocks, kThreads, 0, stream>>>(
      static_cast<const R*>(a.partials), a.n_samples, a.blocks_per_sample, static_cast<R>(a.npix),
      static_cast<R*>(a.rnorm2));
  return cuda_status("spectral_residual finalize launch");
}

}  // namespace

// ---- public launchers -------------------------------------------------------------------------
const char* launch_dps_update(const UpdateArgs& a, cudaStream_t stream) {
  if (a.n_samples <= 0 || a.per_sample <= 0) return nullptr;
  if (a.noise == nullptr && a.seeds == nullptr) return fail("dps_update: neither noise nor seeds given");
  if (a.noise == nullptr && a.per_sample >= (int64_t{1} << 32)) {
    return fail("dps_update: Philox noise supports at most 2^32 - 1 elements per sample, got " +
                std::to_string(a.per_sample));
  }
  switch (a.dtype) {
    case DType::Float32: return launch_update_t<float>(a, stream);
    case DType::Float64: return launch_update_t<double>(a, stream);
    case DType::Float16: return launch_update_t<__half>(a, stream);
    case DType::BFloat16: return launch_update_t<__nv_bfloat16>(a, stream);
  }
  return fail("dps_update: unknown dtype code " + std::to_string(static_cast<int>(a.dtype)));
}

const char* launch_philox_normal(DType dtype, const int64_t* seeds, int64_t n_samples, int64_t numel,
                                 uint32_t step, uint32_t stream_id, void* out, cudaStream_t stream) {
  if (n_samples <= 0 || numel <= 0) return nullptr;
  if (numel >= (int64_t{1} << 32)) {
    return fail("philox_normal: at most 2^32 - 1 elements per sample, got " + std::to_string(numel));
  }
  switch (dtype) {
    case DType::Float32: launch_normal_t<float>(seeds, n_samples, numel, step, stream_id, out, stream); break;
    case DType::Float64: launch_normal_t<double>(seeds, n_samples, numel, step, stream_id, out, stream); break;
    case DType::Float16: launch_normal_t<__half>(seeds, n_samples, numel, step, stream_id, out, stream); break;
    case DType::BFloat16:
      launch_normal_t<__nv_bfloat16>(seeds, n_samples, numel, step, stream_id, out, stream);
      break;
    default:
      return fail("philox_normal: unknown dtype code " + std::to_string(static_cast<int>(dtype)));
  }
  return cuda_status("philox_normal kernel launch");
}

const char* launch_philox_words(const int64_t* seeds, int64_t n_samples, int64_t calls, uint32_t step,
                                uint32_t stream_id, int32_t* out, cudaStream_t stream) {
  if (n_samples <= 0 || calls <= 0) return nullptr;
  if (calls >= (int64_t{1} << 32)) {
    return fail("philox_words: at most 2^32 - 1 calls (counters) per sample, got " + std::to_string(calls));
  }
  const dim3 grid(blocks_within_sample(calls, n_samples, resident_blocks_per_sm<philox_words_kernel>()),
                  grid_y(n_samples));
  philox_words_kernel<<<grid, kThreads, 0, stream>>>(seeds, n_samples, calls, step, stream_id, out);
  return cuda_status("philox_words kernel launch");
}

int64_t spectral_blocks_per_sample(DType dtype, int64_t n_samples, int64_t per_sample) {
  if (n_samples <= 0 || per_sample <= 0) return 1;
  return static_cast<int64_t>(blocks_within_sample(per_sample, n_samples, spectral_blocks_per_sm(dtype)));
}

const char* launch_spectral_residual(const SpectralArgs& a, cudaStream_t stream) {
  if (a.n_samples <= 0 || a.per_sample <= 0) return nullptr;
  if (a.blocks_per_sample <= 0 || a.k_numel <= 0 || a.f_last <= 0 || a.npix <= 0) {
    return fail("spectral_residual: bad sizes (blocks_per_sample " + std::to_string(a.blocks_per_sample) +
                ", k_numel " + std::to_string(a.k_numel) + ", f_last " + std::to_string(a.f_last) +
                ", npix " + std::to_string(a.npix) + ")");
  }
  switch (a.dtype) {
    case DType::Float32: return launch_spectral_t<float>(a, stream);
    case DType::Float64: return launch_spectral_t<double>(a, stream);
    default: break;
  }
  return fail("spectral_residual: complex64 or complex128 only, got real dtype code " +
              std::to_string(static_cast<int>(a.dtype)));
}

const char* blur_spectral_args(const BlurArgs& a, SpectralArgs* s) {
  if (a.ndim < 1 || a.ndim > 3) return fail("blur_normal_residual: 1 to 3 signal axes, got " + std::to_string(a.ndim));
  if (a.n_samples <= 0 || a.batch % a.n_samples != 0) {
    return fail("blur_normal_residual: batch " + std::to_string(a.batch) + " is not a multiple of N " +
                std::to_string(a.n_samples));
  }
  int64_t npix = 1, k_numel = 1;
  for (int i = 0; i < a.ndim; ++i) {
    npix *= a.signal[i];
    k_numel *= (i == a.ndim - 1) ? a.signal[i] / 2 + 1 : a.signal[i];
  }
  s->dtype = a.dtype;
  s->X = a.spectrum;
  s->K = a.K;
  s->Y = a.Y;
  s->W = a.spectrum;
  s->rnorm2 = a.rnorm2;
  s->partials = a.partials;
  s->n_samples = a.n_samples;
  s->per_sample = (a.batch / a.n_samples) * k_numel;
  s->k_numel = k_numel;
  s->f_last = a.signal[a.ndim - 1] / 2 + 1;
  s->n_last = a.signal[a.ndim - 1];
  s->npix = npix;
  s->w_scale = 1.0 / static_cast<double>(npix);  // irfftn's "backward" norm, folded into W
  s->blocks_per_sample = a.blocks_per_sample;
  return nullptr;
}

}  // namespace dps_fast
