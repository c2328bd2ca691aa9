// The one binding file of dps_fast._C: op schemas (TORCH_LIBRARY), their CUDA implementations
// (TORCH_LIBRARY_IMPL) with input checks, and the Python module init. The kernels live in the
// .cu files behind dps_kernels.cuh; fake (meta) kernels are registered from Python
// (dps_fast/_cuda.py), which torch imports on its own through set_python_module when the ops are
// traced before the Python side was loaded.
//
// dps_update is an out= op that returns nothing (schema `Tensor(a!) out`): the sampler updates
// the state in place (out may be x itself), torch.compile functionalizes it (auto_functionalized)
// and torch.library.opcheck checks the mutation annotations. The Python wrapper
// (dps_fast/backends/cuda_ops.py) gives it torch_ops.dps_update's functional signature.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "dps_kernels.cuh"

namespace {

using dps_fast::DType;

void check_launch(const char* err) { TORCH_CHECK(err == nullptr, "dps_fast: ", err == nullptr ? "" : err); }

DType real_dtype(at::ScalarType st, const char* name, bool allow_half) {
  switch (st) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf:
      if (allow_half) return DType::Float16;
      break;
    case at::kBFloat16:
      if (allow_half) return DType::BFloat16;
      break;
    default: break;
  }
  TORCH_CHECK(false, name, " must be ", allow_half ? "float32, float64, float16 or bfloat16" : "float32 or float64",
              ", got ", st);
  return DType::Float32;
}

DType complex_dtype(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kComplexFloat) return DType::Float32;
  if (t.scalar_type() == at::kComplexDouble) return DType::Float64;
  TORCH_CHECK(false, name, " must be complex64 or complex128, got ", t.scalar_type());
  return DType::Float32;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous, got sizes ", t.sizes(), " with strides ", t.strides());
}

// Same device, dtype and shape as `ref` (the checks check_like and check_rows_like share).
void check_same(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref_name, "'s device ", ref.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have ", ref_name, "'s dtype ", ref.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have ", ref_name, "'s shape ", ref.sizes(), ", got ", t.sizes());
}

// Same device, dtype and shape as `ref` (and contiguous, on CUDA).
void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_cuda(t, name);
  check_same(t, name, ref, ref_name);
}

// Same device, dtype and shape as `ref`, each sample t[n] contiguous (channel slices of a model
// output qualify): returns the element stride between samples.
int64_t check_rows_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  check_same(t, name, ref, ref_name);
  int64_t expect = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    TORCH_CHECK(t.size(d) == 1 || t.stride(d) == expect, name,
                " must have contiguous samples (t[n] contiguous; a sample stride is fine), got sizes ", t.sizes(),
                " with strides ", t.strides());
    expect *= t.size(d);
  }
  return t.size(0) > 1 ? t.stride(0) : expect;
}

// A per-sample vector [N] on ref's device.
void check_per_sample(const at::Tensor& t, const char* name, const at::Tensor& ref, at::ScalarType dtype) {
  check_cuda(t, name);
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == ref.size(0), name, " must be [N] with N = ", ref.size(0), ", got shape ",
              t.sizes());
}

cudaStream_t current_stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

// ---- dps_update ------------------------------------------------------------------------------
void dps_update_cuda(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& w, const at::Tensor& u,
                     const at::Tensor& gscale, const at::Tensor& coefs, int64_t step, bool clip, double lo,
                     double hi, int64_t variance, const std::optional<at::Tensor>& v,
                     const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& noise,
                     const at::Tensor& out, const std::optional<at::Tensor>& x0hat_out) {
  check_cuda(x, "x");
  const DType dtype = real_dtype(x.scalar_type(), "x", /*allow_half=*/true);
  TORCH_CHECK(x.dim() >= 1, "x must be [N, *S], got a 0-d tensor");
  const int64_t eps_stride = check_rows_like(eps, "eps", x, "x");
  check_like(w, "w", x, "x");
  check_like(u, "u", x, "x");
  check_like(out, "out", x, "x");
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_per_sample(gscale, "gscale", x, acc);
  check_cuda(coefs, "coefs");
  TORCH_CHECK(coefs.device() == x.device(), "coefs must be on x's device ", x.device(), ", got ", coefs.device());
  TORCH_CHECK(coefs.scalar_type() == acc, "coefs must be ", acc, " (the arithmetic type of a ", x.scalar_type(),
              " state; a lower-precision row rounds sqrt(1/abar) ~157 by up to 0.2%), got ", coefs.scalar_type());
  TORCH_CHECK(coefs.dim() == 1 && coefs.size(0) >= dps_fast::coef::COUNT,
              "coefs must be one table row [", dps_fast::coef::COUNT, "], got shape ", coefs.sizes());
  TORCH_CHECK(variance >= 0 && variance <= 2,
              "variance must be 0 (fixed_small), 1 (fixed_large) or 2 (learned_range), got ", variance);
  const bool learned = variance == static_cast<int64_t>(dps_fast::Variance::LearnedRange);
  TORCH_CHECK(!learned || v.has_value(), "v: learned_range variance (2) needs the model's variance channels, got None");
  const int64_t v_stride = learned ? check_rows_like(*v, "v", x, "x") : -1;
  const bool has_noise = noise.has_value();
  TORCH_CHECK(has_noise || seeds.has_value(), "seeds: needed when noise is None");
  if (has_noise) check_like(*noise, "noise", x, "x");
  if (!has_noise) check_per_sample(*seeds, "seeds", x, at::kLong);
  if (x0hat_out.has_value()) check_like(*x0hat_out, "x0hat_out", x, "x");

  const int64_t n = x.size(0);
  const int64_t per_sample = n > 0 ? x.numel() / n : 0;
  TORCH_CHECK(has_noise || per_sample < (int64_t{1} << 32),
              "x: Philox noise supports at most 2^32 - 1 elements per sample, got ", per_sample);
  if (x.numel() == 0) return;

  c10::cuda::CUDAGuard guard(x.device());
  dps_fast::UpdateArgs a;
  a.dtype = dtype;
  a.x = x.data_ptr();
  a.eps = eps.data_ptr();
  a.w = w.data_ptr();
  a.u = u.data_ptr();
  a.v = learned ? v->data_ptr() : nullptr;
  a.noise = has_noise ? noise->data_ptr() : nullptr;
  a.seeds = has_noise ? nullptr : seeds->data_ptr<int64_t>();
  a.gscale = gscale.data_ptr();
  a.coefs = coefs.data_ptr();
  a.out = out.data_ptr();
  a.x0hat = x0hat_out.has_value() ? x0hat_out->data_ptr() : nullptr;
  a.n_samples = n;
  a.per_sample = per_sample;
  a.eps_stride = eps_stride;
  a.v_stride = v_stride;
  a.step = static_cast<uint32_t>(static_cast<uint64_t>(step) & 0xFFFFFFFFull);
  a.clip = clip;
  a.lo = lo;
  a.hi = hi;
  a.variance = static_cast<int>(variance);
  check_launch(dps_fast::launch_dps_update(a, current_stream(x)));
}

// ---- noise -----------------------------------------------------------------------------------
void check_noise_args(const at::Tensor& seeds, int64_t numel, const char* op, const char* numel_name) {
  check_cuda(seeds, "seeds");
  TORCH_CHECK(seeds.scalar_type() == at::kLong && seeds.dim() == 1, op, ": seeds must be an int64 tensor [N], got ",
              seeds.scalar_type(), " of shape ", seeds.sizes());
  TORCH_CHECK(numel >= 0 && numel < (int64_t{1} << 32), op, ": ", numel_name, " must be in [0, 2^32), got ", numel);
}

at::Tensor philox_normal_cuda(const at::Tensor& seeds, int64_t numel, int64_t step, int64_t stream,
                              at::ScalarType dtype) {
  check_noise_args(seeds, numel, "philox_normal", "numel");
  const DType dt = real_dtype(dtype, "philox_normal: dtype", /*allow_half=*/true);
  at::Tensor out = at::empty({seeds.size(0), numel}, seeds.options().dtype(dtype));
  if (out.numel() == 0) return out;
  c10::cuda::CUDAGuard guard(seeds.device());
  check_launch(dps_fast::launch_philox_normal(dt, seeds.data_ptr<int64_t>(), seeds.size(0), numel,
                                              static_cast<uint32_t>(static_cast<uint64_t>(step) & 0xFFFFFFFFull),
                                              static_cast<uint32_t>(static_cast<uint64_t>(stream) & 0xFFFFFFFFull),
                                              out.data_ptr(), current_stream(seeds)));
  return out;
}

at::Tensor philox_words_cuda(const at::Tensor& seeds, int64_t calls, int64_t step, int64_t stream) {
  check_noise_args(seeds, calls, "philox_words", "calls");
  at::Tensor out = at::empty({seeds.size(0), calls, 4}, seeds.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  c10::cuda::CUDAGuard guard(seeds.device());
  check_launch(dps_fast::launch_philox_words(seeds.data_ptr<int64_t>(), seeds.size(0), calls,
                                             static_cast<uint32_t>(static_cast<uint64_t>(step) & 0xFFFFFFFFull),
                                             static_cast<uint32_t>(static_cast<uint64_t>(stream) & 0xFFFFFFFFull),
                                             out.data_ptr<int32_t>(), current_stream(seeds)));
  return out;
}

// ---- spectral stage --------------------------------------------------------------------------
// K is [*F] (leading size-1 axes allowed), broadcast over X's first two axes.
void check_transfer(const at::Tensor& K, const at::Tensor& X, const char* x_name) {
  check_cuda(K, "K");
  TORCH_CHECK(K.device() == X.device(), "K must be on ", x_name, "'s device ", X.device(), ", got ", K.device());
  TORCH_CHECK(K.scalar_type() == X.scalar_type(), "K must have dtype ", X.scalar_type(), ", got ", K.scalar_type());
  const auto f = X.sizes().slice(2);
  bool ok = K.dim() >= static_cast<int64_t>(f.size());
  const int64_t lead = K.dim() - static_cast<int64_t>(f.size());
  for (int64_t i = 0; ok && i < K.dim(); ++i) ok = i < lead ? K.size(i) == 1 : K.size(i) == f[i - lead];
  TORCH_CHECK(ok, "K must be the transfer function [*F] with F = ", f, " (", x_name, "'s trailing axes), got shape ",
              K.sizes());
}

std::tuple<at::Tensor, at::Tensor> spectral_residual_cuda(const at::Tensor& X, const at::Tensor& K,
                                                          const at::Tensor& Y, int64_t n_last) {
  check_cuda(X, "X");
  const DType dt = complex_dtype(X, "X");
  TORCH_CHECK(X.dim() >= 3, "X must be [N, C, *F] (rfftn over 1 or 2 axes), got shape ", X.sizes());
  check_like(Y, "Y", X, "X");
  check_transfer(K, X, "X");
  TORCH_CHECK(n_last >= 1 && X.size(-1) == n_last / 2 + 1, "n_last must satisfy X.shape[-1] == n_last // 2 + 1, got n_last ",
              n_last, " for X of shape ", X.sizes());

  const int64_t n = X.size(0);
  at::Tensor W = at::empty_like(X);
  at::Tensor rnorm2 = at::empty({n}, X.options().dtype(dt == DType::Float64 ? at::kDouble : at::kFloat));
  if (n == 0) return {W, rnorm2};
  const int64_t per_sample = X.numel() / n;
  if (per_sample == 0) {
    rnorm2.zero_();
    return {W, rnorm2};
  }
  int64_t npix = n_last;
  for (int64_t d = 2; d < X.dim() - 1; ++d) npix *= X.size(d);

  c10::cuda::CUDAGuard guard(X.device());
  const int64_t blocks = dps_fast::spectral_blocks_per_sample(dt, n, per_sample);
  at::Tensor partials = at::empty({n * blocks}, rnorm2.options());
  dps_fast::SpectralArgs a;
  a.dtype = dt;
  a.X = X.data_ptr();
  a.K = K.data_ptr();
  a.Y = Y.data_ptr();
  a.W = W.data_ptr();
  a.rnorm2 = rnorm2.data_ptr();
  a.partials = partials.data_ptr();
  a.n_samples = n;
  a.per_sample = per_sample;
  a.k_numel = K.numel();
  a.f_last = X.size(-1);
  a.n_last = n_last;
  a.npix = npix;
  a.w_scale = 1.0;
  a.blocks_per_sample = blocks;
  check_launch(dps_fast::launch_spectral_residual(a, current_stream(X)));
  return {W, rnorm2};
}

// ---- blur normal residual --------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> blur_normal_residual_cuda(const at::Tensor& x0hat, const at::Tensor& K,
                                                             const at::Tensor& Y, int64_t ndim) {
  check_cuda(x0hat, "x0hat");
  const DType dt = real_dtype(x0hat.scalar_type(), "x0hat", /*allow_half=*/false);
  TORCH_CHECK(ndim >= 1 && ndim <= 3, "ndim must be 1, 2 or 3 signal axes, got ", ndim);
  TORCH_CHECK(x0hat.dim() == ndim + 2, "x0hat must be [N, C, *S] with ", ndim, " signal axes, got shape ",
              x0hat.sizes());
  std::vector<int64_t> fshape(x0hat.sizes().begin(), x0hat.sizes().end());
  fshape.back() = fshape.back() / 2 + 1;
  const auto ctype = dt == DType::Float64 ? at::kComplexDouble : at::kComplexFloat;
  check_cuda(Y, "Y");
  TORCH_CHECK(Y.device() == x0hat.device(), "Y must be on x0hat's device ", x0hat.device(), ", got ", Y.device());
  TORCH_CHECK(Y.scalar_type() == ctype, "Y must be ", ctype, " (rfftn of a ", x0hat.scalar_type(), " y), got ",
              Y.scalar_type());
  TORCH_CHECK(Y.sizes() == at::IntArrayRef(fshape), "Y must be rfftn(y) of shape ", at::IntArrayRef(fshape),
              ", got ", Y.sizes());

  const int64_t n = x0hat.size(0);
  at::Tensor out = at::empty_like(x0hat);
  at::Tensor rnorm2 = at::empty({n}, x0hat.options());
  at::Tensor spectrum = at::empty(fshape, x0hat.options().dtype(ctype));
  check_transfer(K, spectrum, "Y");
  if (x0hat.numel() == 0) {
    rnorm2.zero_();
    return {out, rnorm2};
  }

  c10::cuda::CUDAGuard guard(x0hat.device());
  dps_fast::BlurArgs a;
  a.dtype = dt;
  a.ndim = static_cast<int>(ndim);
  for (int64_t i = 0; i < ndim; ++i) a.signal[i] = x0hat.size(2 + i);
  a.batch = n * x0hat.size(1);
  a.n_samples = n;
  size_t work_bytes = 0;
  check_launch(dps_fast::blur_fft_work_bytes(dt, a.ndim, a.signal, a.batch, &work_bytes));
  at::Tensor work = at::empty({static_cast<int64_t>(work_bytes)}, x0hat.options().dtype(at::kByte));
  a.blocks_per_sample = dps_fast::spectral_blocks_per_sample(dt, n, spectrum.numel() / n);
  at::Tensor partials = at::empty({n * a.blocks_per_sample}, rnorm2.options());
  a.x0hat = x0hat.data_ptr();
  a.K = K.data_ptr();
  a.Y = Y.data_ptr();
  a.spectrum = spectrum.data_ptr();
  a.out = out.data_ptr();
  a.rnorm2 = rnorm2.data_ptr();
  a.partials = partials.data_ptr();
  a.fft_work = work_bytes > 0 ? work.data_ptr() : nullptr;
  check_launch(dps_fast::launch_blur_normal_residual(a, current_stream(x0hat)));
  return {out, rnorm2};
}

}  // namespace

TORCH_LIBRARY(dps_fast, m) {
  m.set_python_module("dps_fast._cuda");
  m.def(
      "dps_update(Tensor x, Tensor eps, Tensor w, Tensor u, Tensor gscale, Tensor coefs, int step, bool clip, "
      "float lo, float hi, int variance, Tensor? v, Tensor? seeds, Tensor? noise, Tensor(a!) out, "
      "Tensor(b!)? x0hat_out) -> ()");
  m.def("spectral_residual(Tensor X, Tensor K, Tensor Y, int n_last) -> (Tensor, Tensor)");
  m.def("blur_normal_residual(Tensor x0hat, Tensor K, Tensor Y, int ndim) -> (Tensor, Tensor)");
  m.def("philox_normal(Tensor seeds, int numel, int step, int stream, ScalarType dtype) -> Tensor");
  m.def("philox_words(Tensor seeds, int calls, int step, int stream) -> Tensor");
}

TORCH_LIBRARY_IMPL(dps_fast, CUDA, m) {
  m.impl("dps_update", TORCH_FN(dps_update_cuda));
  m.impl("spectral_residual", TORCH_FN(spectral_residual_cuda));
  m.impl("blur_normal_residual", TORCH_FN(blur_normal_residual_cuda));
  m.impl("philox_normal", TORCH_FN(philox_normal_cuda));
  m.impl("philox_words", TORCH_FN(philox_words_cuda));
}

// A Python module with no functions: importing it (dps_fast._C, or dps_fast_C when JIT-built) runs
// the static registrations above. TORCH_EXTENSION_NAME is set by BuildExtension and by
// torch.utils.cpp_extension.load alike.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define DPS_FAST_STR_(x) #x
#define DPS_FAST_STR(x) DPS_FAST_STR_(x)
#define DPS_FAST_CAT_(a, b) a##b
#define DPS_FAST_CAT(a, b) DPS_FAST_CAT_(a, b)

PyMODINIT_FUNC DPS_FAST_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, DPS_FAST_STR(TORCH_EXTENSION_NAME),
                                          "dps_fast CUDA ops (registered as torch.ops.dps_fast.*)", -1, nullptr};
  return PyModule_Create(&module_def);
}
