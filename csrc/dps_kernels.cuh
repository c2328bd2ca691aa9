// Launch interface of the dps_fast CUDA kernels: plain C++ over raw device pointers, sizes and a
// cudaStream_t. No torch header is included here or in any .cu file, so every kernel compiles
// with nvcc alone (tests/cuda/test_csrc_compile.py does that on machines without a GPU); the
// only file that sees torch is csrc/binding.cpp.
//
// Error convention: every launcher returns nullptr on success, else a message (valid until the
// next launcher call on the same host thread) that binding.cpp turns into a TORCH_CHECK failure.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace dps_fast {

// Element type of the real tensors; complex tensors use the matching real type (Float32 ->
// complex64 laid out as float2, Float64 -> complex128 laid out as double2).
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// Column indices of one row of NoiseSchedule.table(): a mirror of dps_fast.schedule.Coef
// (tests/cuda/test_csrc_compile.py checks that the two agree).
namespace coef {
constexpr int SQRT_ABAR = 0;
constexpr int SQRT_1M_ABAR = 1;
constexpr int SQRT_RECIP_ABAR = 2;
constexpr int SQRT_RECIPM1_ABAR = 3;
constexpr int COEF_X0 = 4;
constexpr int COEF_XT = 5;
constexpr int VAR_SMALL = 6;
constexpr int LOG_VAR_SMALL = 7;
constexpr int VAR_LARGE = 8;
constexpr int LOG_VAR_LARGE = 9;
constexpr int LOG_BETA = 10;
constexpr int SIGMA_SMALL = 11;
constexpr int SIGMA_LARGE = 12;
constexpr int NONZERO = 13;
constexpr int STEP = 14;
constexpr int COUNT = 15;
}  // namespace coef

// Variance modes of torch_ops.step_sigma, by the integer the op schema carries.
enum class Variance : int { FixedSmall = 0, FixedLarge = 1, LearnedRange = 2 };

// One guided DDPM step, torch_ops.dps_update. Every tensor is [N, per_sample] of `dtype`, contiguous
// except eps and v, whose samples are contiguous but eps_stride / v_stride elements apart (channel
// slices of a learned-variance model output, read in place); seeds [N] int64; gscale [N] and coefs
// [coef::COUNT] in the arithmetic type, float64 for Float64 and float32 for the others (a coefficient
// such as sqrt(1/abar) ~157 rounded to bfloat16 would be off by up to 0.2%).
struct UpdateArgs {
  DType dtype = DType::Float32;
  const void* x = nullptr;
  const void* eps = nullptr;
  const void* w = nullptr;
  const void* u = nullptr;
  const void* v = nullptr;          // model variance channels; read only for LearnedRange
  const void* noise = nullptr;      // explicit z; nullptr: Philox noise of `seeds` at `step`
  const int64_t* seeds = nullptr;   // [N]; read only when noise == nullptr
  const void* gscale = nullptr;     // [N], float32 (float64 for Float64)
  const void* coefs = nullptr;      // [coef::COUNT], float32 (float64 for Float64), device memory
  void* out = nullptr;              // x_{t-1}; may alias x (each element is read, then written)
  void* x0hat = nullptr;            // optional clamped Tweedie estimate; nullptr: not written
  int64_t n_samples = 0;
  int64_t per_sample = 0;           // numel of one sample; < 2^32 when Philox noise is drawn
  int64_t eps_stride = -1;          // elements between samples of eps (0: broadcast; -1: per_sample)
  int64_t v_stride = -1;            // elements between samples of v (0: broadcast; -1: per_sample)
  uint32_t step = 0;                // Philox counter word 1
  bool clip = false;
  double lo = 0.0;
  double hi = 0.0;
  int variance = 0;                 // a Variance
};
const char* launch_dps_update(const UpdateArgs& args, cudaStream_t stream);

// Standard normals of dps_fast.noise.philox_normal: out [N, numel] of `dtype` (element e = slot e % 4
// of Philox call e / 4; one thread per call).
const char* launch_philox_normal(DType dtype, const int64_t* seeds, int64_t n_samples, int64_t numel,
                                 uint32_t step, uint32_t stream_id, void* out, cudaStream_t stream);

// The raw Philox4x32-10 words (r0, r1, r2, r3) of the calls (counters) 0 .. calls - 1 as int32 bit
// patterns, out [N, calls, 4]: the bit-exact test hook against dps_fast.noise.philox4x32.
const char* launch_philox_words(const int64_t* seeds, int64_t n_samples, int64_t calls, uint32_t step,
                                uint32_t stream_id, int32_t* out, cudaStream_t stream);

// The spectral stage, torch_ops.spectral_residual: W = w_scale * conj(K) (K X - Y) and
// rnorm2[n] = sum(parseval weight * |K X - Y|^2) / npix. X, Y, W are [N, per_sample] complex
// (per_sample = C * k_numel), K is [k_numel] complex broadcast over N and C, the half-spectrum's
// last axis has f_last = n_last / 2 + 1 entries. W may alias X. The reduction is deterministic:
// each block writes one partial per sample into `partials` [N, blocks_per_sample] (real), then
// one block per sample sums them in a fixed order.
struct SpectralArgs {
  DType dtype = DType::Float32;     // Float32 (complex64) or Float64 (complex128)
  const void* X = nullptr;
  const void* K = nullptr;
  const void* Y = nullptr;
  void* W = nullptr;
  void* rnorm2 = nullptr;           // [N] real
  void* partials = nullptr;         // [N * blocks_per_sample] real scratch
  int64_t n_samples = 0;
  int64_t per_sample = 0;
  int64_t k_numel = 0;
  int64_t f_last = 0;
  int64_t n_last = 0;
  int64_t npix = 0;                 // number of real samples of one signal (Parseval's 1/n)
  double w_scale = 1.0;
  int64_t blocks_per_sample = 0;    // from spectral_blocks_per_sample()
};
// Blocks per sample of the spectral kernel of `dtype` on the current device, from its occupancy
// (sizes `partials`).
int64_t spectral_blocks_per_sample(DType dtype, int64_t n_samples, int64_t per_sample);
const char* launch_spectral_residual(const SpectralArgs& args, cudaStream_t stream);

// torch_ops.blur_normal_residual: cuFFT R2C of x0hat [batch, *signal] -> spectral stage (with the
// 1/npix of irfftn's "backward" norm folded into W) -> cuFFT C2R into out [batch, *signal].
// Plans are created once per (device, dtype, signal shape, batch) and cached (csrc/dps_fft.cu).
struct BlurArgs {
  DType dtype = DType::Float32;     // Float32 or Float64
  int ndim = 0;                     // 1, 2 or 3 signal axes
  int64_t signal[3] = {0, 0, 0};
  int64_t batch = 0;                // N * C
  int64_t n_samples = 0;            // N
  const void* x0hat = nullptr;      // [batch, *signal] real
  const void* K = nullptr;          // [*F] complex, F = signal[:-1] + (signal[-1] / 2 + 1,)
  const void* Y = nullptr;          // [batch, *F] complex
  void* spectrum = nullptr;         // [batch, *F] complex scratch (C2R overwrites it)
  void* out = nullptr;              // [batch, *signal] real
  void* rnorm2 = nullptr;           // [N] real
  void* partials = nullptr;         // [N * blocks_per_sample] real scratch
  void* fft_work = nullptr;         // cuFFT work area of blur_fft_work_bytes() bytes
  int64_t blocks_per_sample = 0;
};
// The spectral stage's arguments inside blur_normal_residual (in place on `spectrum`, with w_scale
// = 1 / npix); errors (bad ndim, batch not a multiple of N) are returned as a message.
const char* blur_spectral_args(const BlurArgs& args, SpectralArgs* out);
// Creates (or finds) the two cached cuFFT plans on the current device and reports the work area
// they need.
const char* blur_fft_work_bytes(DType dtype, int ndim, const int64_t* signal, int64_t batch,
                                size_t* work_bytes);
const char* launch_blur_normal_residual(const BlurArgs& args, cudaStream_t stream);

}  // namespace dps_fast
