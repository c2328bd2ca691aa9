// Fused elementwise kernels of dps_fast: the guided DDPM update, the Philox noise stream and the
// spectral stage of the FFT blur's normal residual. Each implements one function of
// dps_fast/backends/torch_ops.py (the contract) or dps_fast/noise.py; see dps_kernels.cuh.
//
// Built without --use_fast_math on purpose: the in-kernel noise must agree with the pure-torch
// stream, so log/cos/sqrt are the correctly-rounded-to-a-few-ulp library versions.
#include "dps_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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
constexpr int kBlocksPerSm = 2048 / kThreads;  // resident 256-thread blocks per SM (sm_80/sm_90)

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

// Streaming multiprocessors of the current device, cached per device (a runtime query of the
// device the op runs on, not a build-time probe).
int sm_count() {
  static std::atomic<int> cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return 108;
  }
  if (dev < 0 || dev >= 64) dev = 0;
  int n = cache[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
      cudaGetLastError();
      n = 108;
    }
    cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks along x (within a sample) so that grid.x * grid.y fills the device about once; the
// kernels grid-stride over whatever is left.
unsigned blocks_within_sample(int64_t work_items, int64_t n_samples) {
  const int64_t gy = n_samples < kMaxGridY ? n_samples : kMaxGridY;
  const int64_t target = static_cast<int64_t>(sm_count()) * kBlocksPerSm;
  int64_t bx = ceil_div(target, gy > 0 ? gy : 1);
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

// z = sqrt(-2 ln u1) cos(2 pi u2), u1 = ((r0 >> 8) + 1) 2^-24, u2 = (r1 >> 8) 2^-24: in float32 for
// every state dtype but float64, as noise.philox_normal ("work" dtype) does.
DPS_HD float box_muller(uint32_t r0, uint32_t r1, float) {
  const float u1 = static_cast<float>((r0 >> 8) + 1u) * 0x1p-24f;
  const float u2 = static_cast<float>(r1 >> 8) * 0x1p-24f;
  return sqrtf(-2.0f * logf(u1)) * cosf(6.28318530717958647692f * u2);
}
DPS_HD double box_muller(uint32_t r0, uint32_t r1, double) {
  const double u1 = static_cast<double>((r0 >> 8) + 1u) * 0x1p-24;
  const double u2 = static_cast<double>(r1 >> 8) * 0x1p-24;
  return sqrt(-2.0 * log(u1)) * cos(6.28318530717958647692 * u2);
}

template <typename A>
DPS_HD A philox_normal(uint32_t index, uint32_t step, uint32_t stream_id,
                                           uint32_t k0, uint32_t k1) {
  const Words r = philox4x32_10(index, step, stream_id, 0u, k0, k1);
  return box_muller(r.r0, r.r1, A(0));
}

// ---- vector access -------------------------------------------------------------------------
template <typename T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };

template <typename T, int V> DPS_HD Pack<T, V> load(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}
template <typename T, int V> DPS_HD void store(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- fused update ----------------------------------------------------------------------------
template <typename T> struct UpdateParams {
  const T* x; const T* eps; const T* w; const T* u; const T* v; const T* noise;
  const int64_t* seeds; const typename AccType<T>::type* gscale; const T* coefs; T* out; T* x0hat;
  int64_t n_samples; int64_t per_sample;
  uint32_t step; int clip; typename AccType<T>::type lo, hi; int variance;
};

template <typename T> struct StepCoefs {
  using A = typename AccType<T>::type;
  A sra, srm1, s1m2sra, s1m, cx0, cxt, sigma, log_beta, log_var_small, nonzero;
};

// Elements [off, off + V) of the flat tensors; j is the index of `off` within its sample (the
// Philox counter).
template <typename T, int V>
DPS_HD void update_pack(const UpdateParams<T>& p, const StepCoefs<T>& c, int64_t off, int64_t j,
                        typename AccType<T>::type gs, uint32_t k0, uint32_t k1) {
  using A = typename AccType<T>::type;
  const bool learned = p.variance == static_cast<int>(Variance::LearnedRange);
  const Pack<T, V> xv = load<T, V>(p.x + off);
  const Pack<T, V> ev = load<T, V>(p.eps + off);
  const Pack<T, V> wv = load<T, V>(p.w + off);
  const Pack<T, V> uv = load<T, V>(p.u + off);
  Pack<T, V> vv = xv, nv = xv;  // placeholders, overwritten when used
  if (learned) vv = load<T, V>(p.v + off);
  if (p.noise != nullptr) nv = load<T, V>(p.noise + off);
  Pack<T, V> res, x0p;
  DPS_UNROLL
  for (int k = 0; k < V; ++k) {
    const A x = to_acc(xv.v[k]);
    // torch_ops.tweedie, then torch.clamp's min(max(x, lo), hi) with NaN propagated
    A x0 = c.sra * x - c.srm1 * to_acc(ev.v[k]);
    if (p.clip) {
      x0 = x0 < p.lo ? p.lo : x0;
      x0 = x0 > p.hi ? p.hi : x0;
    }
    A sigma = c.sigma;
    if (learned) {
      const A f = (to_acc(vv.v[k]) + A(1)) * A(0.5);
      const A log_var = f * c.log_beta + (A(1) - f) * c.log_var_small;
      sigma = c.nonzero * acc_exp(A(0.5) * log_var);
    }
    const A z = p.noise != nullptr ? to_acc(nv.v[k])
                                   : philox_normal<A>(static_cast<uint32_t>(j + k), p.step, 0u, k0, k1);
    const A g = (to_acc(wv.v[k]) - c.s1m * to_acc(uv.v[k])) * c.s1m2sra;
    const A r = c.cx0 * x0 + c.cxt * x + sigma * z - gs * g;
    res.v[k] = from_acc<T>(r);
    x0p.v[k] = from_acc<T>(x0);
  }
  store<T, V>(p.out + off, res);
  if (p.x0hat != nullptr) store<T, V>(p.x0hat + off, x0p);
}

// One thread of the update grid (blocks within a sample, samples). A sample is
// [head scalars][vectors of V][tail scalars]: the head brings the flat offset to a multiple of V
// (all base pointers are 16-byte aligned when V > 1), so any per-sample numel gets 16-byte loads
// and stores for all but < 2 V of its elements.
template <typename T, int V>
DPS_HD void dps_update_thread(const UpdateParams<T>& p, const Grid& g) {
  using A = typename AccType<T>::type;
  StepCoefs<T> c;
  c.sra = to_acc(p.coefs[coef::SQRT_RECIP_ABAR]);
  c.srm1 = to_acc(p.coefs[coef::SQRT_RECIPM1_ABAR]);
  c.s1m = to_acc(p.coefs[coef::SQRT_1M_ABAR]);
  c.s1m2sra = A(2) * c.sra;
  c.cx0 = to_acc(p.coefs[coef::COEF_X0]);
  c.cxt = to_acc(p.coefs[coef::COEF_XT]);
  c.sigma = to_acc(p.coefs[p.variance == static_cast<int>(Variance::FixedLarge) ? coef::SIGMA_LARGE
                                                                                 : coef::SIGMA_SMALL]);
  c.log_beta = to_acc(p.coefs[coef::LOG_BETA]);
  c.log_var_small = to_acc(p.coefs[coef::LOG_VAR_SMALL]);
  c.nonzero = to_acc(p.coefs[coef::NONZERO]);

  const int64_t M = p.per_sample;
  const int64_t stride = g.gx * g.bdx;
  for (int64_t n = g.by; n < p.n_samples; n += g.gy) {
    const int64_t base = n * M;
    const A gs = p.gscale[n];
    uint32_t k0 = 0, k1 = 0;
    if (p.noise == nullptr) {
      const uint64_t s = static_cast<uint64_t>(p.seeds[n]);
      k0 = static_cast<uint32_t>(s);
      k1 = static_cast<uint32_t>(s >> 32);
    }
    int64_t head = 0, nvec = M;
    if (V > 1) {
      head = (V - base % V) % V;
      if (head > M) head = M;
      nvec = (M - head) / V;
    }
    const int64_t items = M - nvec * (V - 1);  // nvec vectors + (head + tail) scalars
    for (int64_t it = g.bx * g.bdx + g.tx; it < items; it += stride) {
      if (it < nvec) {
        const int64_t j = head + it * V;
        update_pack<T, V>(p, c, base + j, j, gs, k0, k1);
      } else {
        const int64_t s = it - nvec;
        const int64_t j = s < head ? s : nvec * V + s;
        update_pack<T, 1>(p, c, base + j, j, gs, k0, k1);
      }
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) dps_update_kernel(UpdateParams<T> p) {
  dps_update_thread<T, V>(p, this_thread());
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
  p.coefs = static_cast<const T*>(a.coefs);
  p.out = static_cast<T*>(a.out);
  p.x0hat = static_cast<T*>(a.x0hat);
  p.n_samples = a.n_samples;
  p.per_sample = a.per_sample;
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

template <typename T> constexpr int vec_width() { return 16 / static_cast<int>(sizeof(T)); }

template <typename T>
LaunchPlan plan_update(const UpdateArgs& a) {
  constexpr int kVec = vec_width<T>();
  bool vec = aligned16(a.x) && aligned16(a.eps) && aligned16(a.w) && aligned16(a.u) && aligned16(a.out);
  if (a.variance == static_cast<int>(Variance::LearnedRange)) vec = vec && aligned16(a.v);
  if (a.noise != nullptr) vec = vec && aligned16(a.noise);
  if (a.x0hat != nullptr) vec = vec && aligned16(a.x0hat);
  const int64_t items = vec ? a.per_sample / kVec + 2 * kVec : a.per_sample;
  return {blocks_within_sample(items, a.n_samples),
          static_cast<unsigned>(a.n_samples < kMaxGridY ? a.n_samples : kMaxGridY), vec};
}

template <typename T>
const char* launch_update_t(const UpdateArgs& a, cudaStream_t stream) {
  const UpdateParams<T> p = update_params<T>(a);
  const LaunchPlan plan = plan_update<T>(a);
  const dim3 grid(plan.gx, plan.gy);
  if (plan.vec) {
    dps_update_kernel<T, vec_width<T>()><<<grid, kThreads, 0, stream>>>(p);
  } else {
    dps_update_kernel<T, 1><<<grid, kThreads, 0, stream>>>(p);
  }
  return cuda_status("dps_update kernel launch");
}

// ---- noise stream ----------------------------------------------------------------------------
template <typename T>
DPS_HD void philox_normal_thread(const int64_t* seeds, int64_t n_samples, int64_t numel, uint32_t step,
                                 uint32_t stream_id, T* out, const Grid& g) {
  using A = typename AccType<T>::type;
  for (int64_t n = g.by; n < n_samples; n += g.gy) {
    const uint64_t s = static_cast<uint64_t>(seeds[n]);
    const uint32_t k0 = static_cast<uint32_t>(s), k1 = static_cast<uint32_t>(s >> 32);
    for (int64_t j = g.bx * g.bdx + g.tx; j < numel; j += g.gx * g.bdx) {
      out[n * numel + j] = from_acc<T>(philox_normal<A>(static_cast<uint32_t>(j), step, stream_id, k0, k1));
    }
  }
}

DPS_HD void philox_words_thread(const int64_t* seeds, int64_t n_samples, int64_t numel, uint32_t step,
                                uint32_t stream_id, int32_t* out, const Grid& g) {
  for (int64_t n = g.by; n < n_samples; n += g.gy) {
    const uint64_t s = static_cast<uint64_t>(seeds[n]);
    const uint32_t k0 = static_cast<uint32_t>(s), k1 = static_cast<uint32_t>(s >> 32);
    for (int64_t j = g.bx * g.bdx + g.tx; j < numel; j += g.gx * g.bdx) {
      const Words r = philox4x32_10(static_cast<uint32_t>(j), step, stream_id, 0u, k0, k1);
      int32_t* o = out + (n * numel + j) * 4;
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
philox_words_kernel(const int64_t* seeds, int64_t n_samples, int64_t numel, uint32_t step, uint32_t stream_id,
                    int32_t* out) {
  philox_words_thread(seeds, n_samples, numel, step, stream_id, out, this_thread());
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

template <typename R>
const char* launch_spectral_t(const SpectralArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.blocks_per_sample),
                  static_cast<unsigned>(a.n_samples < kMaxGridY ? a.n_samples : kMaxGridY));
  if (spectral_index32(a)) {
    spectral_kernel<R, uint32_t><<<grid, kThreads, 0, stream>>>(spectral_params<R, uint32_t>(a));
  } else {
    spectral_kernel<R, uint64_t><<<grid, kThreads, 0, stream>>>(spectral_params<R, uint64_t>(a));
  }
  if (const char* err = cuda_status("spectral_residual kernel launch")) return err;
  const unsigned fin_blocks = static_cast<unsigned>(a.n_samples < kMaxGridY ? a.n_samples : kMaxGridY);
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
  const dim3 grid(blocks_within_sample(numel, n_samples),
                  static_cast<unsigned>(n_samples < kMaxGridY ? n_samples : kMaxGridY));
  switch (dtype) {
    case DType::Float32:
      philox_normal_kernel<float><<<grid, kThreads, 0, stream>>>(seeds, n_samples, numel, step, stream_id,
                                                                  static_cast<float*>(out));
      break;
    case DType::Float64:
      philox_normal_kernel<double><<<grid, kThreads, 0, stream>>>(seeds, n_samples, numel, step, stream_id,
                                                                   static_cast<double*>(out));
      break;
    case DType::Float16:
      philox_normal_kernel<__half><<<grid, kThreads, 0, stream>>>(seeds, n_samples, numel, step, stream_id,
                                                                   static_cast<__half*>(out));
      break;
    case DType::BFloat16:
      philox_normal_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          seeds, n_samples, numel, step, stream_id, static_cast<__nv_bfloat16*>(out));
      break;
    default:
      return fail("philox_normal: unknown dtype code " + std::to_string(static_cast<int>(dtype)));
  }
  return cuda_status("philox_normal kernel launch");
}

const char* launch_philox_words(const int64_t* seeds, int64_t n_samples, int64_t numel, uint32_t step,
                                uint32_t stream_id, int32_t* out, cudaStream_t stream) {
  if (n_samples <= 0 || numel <= 0) return nullptr;
  if (numel >= (int64_t{1} << 32)) {
    return fail("philox_words: at most 2^32 - 1 elements per sample, got " + std::to_string(numel));
  }
  const dim3 grid(blocks_within_sample(numel, n_samples),
                  static_cast<unsigned>(n_samples < kMaxGridY ? n_samples : kMaxGridY));
  philox_words_kernel<<<grid, kThreads, 0, stream>>>(seeds, n_samples, numel, step, stream_id, out);
  return cuda_status("philox_words kernel launch");
}

int64_t spectral_blocks_per_sample(int64_t n_samples, int64_t per_sample) {
  if (n_samples <= 0 || per_sample <= 0) return 1;
  return static_cast<int64_t>(blocks_within_sample(per_sample, n_samples));
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
