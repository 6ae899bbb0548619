#include "cpu_gemm.h"

#include "../rnn_layer.h"
#include "panel_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <exception>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

// Weak: resolved from torch's CPU library when it exports them, null otherwise (the extension still
// loads, and the ATen path runs).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's packed GEMM (CBLAS), LP64. Enum values from the CBLAS headers.
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
}

namespace fused_rnn::cpu {
namespace {

bool aten_forced() {
  static const bool forced = [] {
    const char* v = std::getenv("FUSED_RNN_CPU_GEMM");
    return v != nullptr && std::strcmp(v, "aten") == 0;
  }();
  return forced;
}

template <typename scalar_t>
bool blas_available();
template <>
bool blas_available<float>() {
  return sgemm_ != nullptr && !aten_forced();
}
template <>
bool blas_available<double>() {
  return dgemm_ != nullptr && !aten_forced();
}

inline void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                         const float* alpha, const float* a, const int* lda, const float* b,
                         const int* ldb, const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                         const double* alpha, const double* a, const int* lda, const double* b,
                         const int* ldb, const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

bool fits_int(int64_t v) { return v <= std::numeric_limits<int>::max(); }

template <typename scalar_t>
void aten_gemm(int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda, const scalar_t* b,
               int64_t ldb, bool transpose_b, scalar_t beta, scalar_t* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto* a_mut = const_cast<scalar_t*>(a);
  auto* b_mut = const_cast<scalar_t*>(b);
  const at::Tensor A = at::from_blob(a_mut, {m, k}, {lda, 1}, opts);
  const at::Tensor B = transpose_b ? at::from_blob(b_mut, {n, k}, {ldb, 1}, opts).t()
                                   : at::from_blob(b_mut, {k, n}, {ldb, 1}, opts);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (beta == scalar_t(0)) {
    C.copy_(at::mm(A, B));
  } else {
    C.addmm_(A, B);
  }
}

}  // namespace

template <typename scalar_t>
void gemm_rowmajor(int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda,
                   const scalar_t* b, int64_t ldb, bool transpose_b, scalar_t beta, scalar_t* c,
                   int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == scalar_t(0)) {
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, scalar_t(0));
    }
    return;
  }
  const bool fits = fits_int(m) && fits_int(n) && fits_int(k) && fits_int(lda) &&
                    fits_int(ldb) && fits_int(ldc);
  if (!fits || !blas_available<scalar_t>()) {
    aten_gemm(m, n, k, a, lda, b, ldb, transpose_b, beta, c, ldc);
    return;
  }
  // Row-major C = A · op(B) is column-major Cᵀ = op(B)ᵀ · Aᵀ, and a row-major matrix read as
  // column-major is its transpose: so B goes first, transposed exactly when op(B) = B.
  const char ta = transpose_b ? 'T' : 'N';
  const char tb = 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  const scalar_t alpha = 1;
  fortran_gemm(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
}

template void gemm_rowmajor<float>(int64_t, int64_t, int64_t, const float*, int64_t, const float*,
                                   int64_t, bool, float, float*, int64_t);
template void gemm_rowmajor<double>(int64_t, int64_t, int64_t, const double*, int64_t,
                                    const double*, int64_t, bool, double, double*, int64_t);

const char* gemm_path() { return blas_available<float>() ? "blas" : "aten"; }

namespace {
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;

bool packing_available() {
  static const bool ok = [] {
    const char* v = std::getenv("FUSED_RNN_CPU_GEMM");
    const bool unpacked = v != nullptr && std::strcmp(v, "unpacked") == 0;
    return !unpacked && cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr &&
           cblas_sgemm_compute != nullptr;
  }();
  return ok && blas_available<float>();
}
}  // namespace

namespace {

// Products of about this many multiply-adds or more are cut across threads (the rows of a
// whole-sequence product, the panels of a packing); the at::parallel_for grain.
constexpr int64_t kMinThreadMacs = int64_t{1} << 17;

// op(B) (pack_panels' arguments) packed for panel_gemm, in parallel over ranges of panels, into a
// buffer from torch's allocator (so that its memory profilers count it).
at::Tensor packed_panels(const float* b, int64_t n, int64_t k, int64_t ldb, bool transpose_b) {
  at::Tensor panels = at::empty({panel_floats(n, k)}, at::kFloat);
  float* dst = panels.data_ptr<float>();
  const int64_t grain =
      std::max<int64_t>(1, kMinThreadMacs / std::max<int64_t>(1, kPanelWidth * k));
  at::parallel_for(0, panel_count(n), grain, [&](int64_t p0, int64_t p1) {
    const int64_t j0 = p0 * kPanelWidth, j1 = std::min(n, p1 * kPanelWidth);
    pack_panels(transpose_b ? b + j0 * ldb : b + j0, j1 - j0, k, ldb, transpose_b, dst + j0 * k);
  });
  return panels;
}

// A count from the environment variable `name`, read at every call (tests switch these within one
// process): fallback where it is unset or empty, negative values as 0.
int64_t env_count(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v == nullptr || *v == '\0' ? fallback : std::max<int64_t>(0, std::atoll(v));
}

}  // namespace

int64_t min_packing_rows() { return env_count("FUSED_RNN_CPU_MIN_PACK_ROWS", kMinPackingRows); }

int64_t min_packing_steps() { return env_count("FUSED_RNN_CPU_MIN_PACK_STEPS", kMinPackingSteps); }

bool step_packing_pays(int64_t steps) { return steps >= min_packing_steps(); }

namespace {
bool panels_pay(int64_t steps) { return panel_gemm_available() && step_packing_pays(steps); }
}  // namespace

bool float_step_packed(int64_t rows, int64_t n, int64_t k, int64_t steps) {
  return fits_int(n) && fits_int(k) && fits_int(rows) && rows >= kMinPackedRows &&
         n * k >= kMinPackedElements && step_packing_pays(steps) &&
         packing_available();
}

const char* float_step_kernel(int64_t rows, int64_t n, int64_t k, int64_t steps) {
  if (panels_pay(steps)) return "panel";
  return float_step_packed(rows, n, k, steps) ? "packed" : gemm_path();
}

template <typename scalar_t>
StepRhs<scalar_t>::StepRhs(const scalar_t* b, int64_t n, int64_t k, int64_t ldb,
                           bool transpose_b, int64_t rows, int64_t /*steps*/)
    : b_(b), n_(n), k_(k), ldb_(ldb), rows_(rows), transpose_b_(transpose_b) {}

template <>
StepRhs<float>::StepRhs(const float* b, int64_t n, int64_t k, int64_t ldb, bool transpose_b,
                        int64_t rows, int64_t steps)
    : b_(b), n_(n), k_(k), ldb_(ldb), rows_(rows), transpose_b_(transpose_b) {
  if (panels_pay(steps)) {
    panels_ = packed_panels(b, n, k, ldb, transpose_b);
    return;
  }
  if (!fits_int(ldb) || !float_step_packed(rows, n, k, steps)) return;
  const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, static_cast<int>(rows),
                                                 static_cast<int>(n), static_cast<int>(k));
  packed_ = static_cast<float*>(std::malloc(bytes));
  if (packed_ == nullptr) return;  // plain path
  cblas_sgemm_pack(kRowMajor, kBMatrix, transpose_b ? kTrans : kNoTrans, static_cast<int>(rows),
                   static_cast<int>(n), static_cast<int>(k), 1.f, b, static_cast<int>(ldb),
                   packed_);
}

template <typename scalar_t>
StepRhs<scalar_t>::~StepRhs() {
  std::free(packed_);
}

template <typename scalar_t>
void StepRhs<scalar_t>::multiply(int64_t m, const scalar_t* a, int64_t lda, scalar_t beta,
                                 scalar_t* c, int64_t ldc) const {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (panels_.defined()) {
      panel_gemm(m, n_, k_, a, lda, panels_.data_ptr<float>(), beta, nullptr, c, ldc);
      return;
    }
    if (packed_ != nullptr && m == rows_ && fits_int(lda) && fits_int(ldc)) {
      cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, static_cast<int>(m),
                          static_cast<int>(n_), static_cast<int>(k_), a, static_cast<int>(lda),
                          packed_, static_cast<int>(ldb_), beta, c, static_cast<int>(ldc));
      return;
    }
  }
  gemm_rowmajor<scalar_t>(m, n_, k_, a, lda, b_, ldb_, transpose_b_, beta, c, ldc);
}

template class StepRhs<float>;
template class StepRhs<double>;

namespace {
// A step of fewer multiply-adds than this stays on one thread: synchronising the threads at every
// step costs microseconds. (2 EPYC cores, torch 2.14.1, per 64 steps: B 64 H 64, 262 k
// multiply-adds a step, 0.98 ms threaded by MKL, 0.27 ms for half the columns on one thread.)
constexpr int64_t kMinSplitMacs = 1 << 17;
constexpr int64_t kColumnAlign = 16;

// The most column blocks n columns are cut into (blocks of at least kColumnAlign columns).
int64_t max_column_blocks(int64_t n) {
  return std::max<int64_t>(1, (n + kColumnAlign - 1) / kColumnAlign);
}

// Read at every layer call (not cached), so that tests can switch it within one process.
int64_t forced_parts() { return env_count("FUSED_RNN_CPU_PARTS", 0); }
}  // namespace

int64_t step_parts(int64_t rows, int64_t n, int64_t k, int64_t threads) {
  const int64_t max_parts = max_column_blocks(n);
  if (forced_parts() > 0) return std::min(forced_parts(), max_parts);
  if (threads < 2 || rows * n * k < kMinSplitMacs) return 1;
  return std::min(threads, max_parts);
}

int64_t recurrence_threads() {
#ifdef _OPENMP
  return at::in_parallel_region() ? 1 : std::max<int64_t>(1, at::get_num_threads());
#else
  return 1;  // at::parallel_for, inlined here, would run serially
#endif
}

template <typename scalar_t>
SplitRhs<scalar_t>::SplitRhs(const scalar_t* b, int64_t n, int64_t k, int64_t ldb,
                             bool transpose_b, int64_t rows, int64_t steps, int64_t parts) {
  parts = std::max<int64_t>(1, std::min(parts, max_column_blocks(n)));
  // Equal blocks rounded to kColumnAlign columns; the last takes the rest.
  const int64_t per = (n / parts + kColumnAlign - 1) / kColumnAlign * kColumnAlign;
  edges_.push_back(0);
  for (int64_t p = 1; p < parts; ++p) edges_.push_back(std::min(n, p * per));
  edges_.push_back(n);
  for (int64_t p = 0; p < parts; ++p) {
    // Columns [c0, c1) of op(B): rows of B when op(B) = Bᵀ, columns of B otherwise.
    const int64_t c0 = edges_[p];
    const scalar_t* block = transpose_b ? b + c0 * ldb : b + c0;
    blocks_.push_back(std::make_unique<StepRhs<scalar_t>>(block, edges_[p + 1] - c0, k, ldb,
                                                          transpose_b, rows, steps));
  }
}

void run_step_parts(int64_t parts, int64_t steps, const std::function<void(int64_t, int64_t)>& f) {
#ifdef _OPENMP
  // Every thread of the team runs the same step loop and meets the others at each barrier, so the
  // team size (whatever OpenMP grants) cannot deadlock it. An exception stops the work, not the
  // barriers, and is rethrown after the region.
  std::exception_ptr error;
  std::atomic<bool> failed{false};
#pragma omp parallel num_threads(static_cast<int>(std::min<int64_t>(parts, at::get_num_threads())))
  {
    const c10::ParallelGuard guard(true);  // ATen calls in here stay single-threaded
    const int64_t team = omp_get_num_threads(), tid = omp_get_thread_num();
    for (int64_t i = 0; i < steps; ++i) {
      for (int64_t p = tid; p < parts && !failed.load(std::memory_order_relaxed); p += team) {
        try {
          f(i, p);
        } catch (...) {
#pragma omp critical(fused_rnn_step_error)
          if (!failed.exchange(true)) error = std::current_exception();
        }
      }
#pragma omp barrier
    }
  }
  if (error) std::rethrow_exception(error);
#else
  for (int64_t i = 0; i < steps; ++i) {
    for (int64_t p = 0; p < parts; ++p) f(i, p);
  }
#endif
}

template class SplitRhs<float>;
template class SplitRhs<double>;

namespace {

// out = bias + a · b through gemm_rowmajor, for a short sequence's projection: one BLAS call where
// ATen's addmm costs a dispatch, argument checks and a TensorIterator for the bias (at T 1, B 1,
// H 64 that was most of the GEMM's time). Needs a Fortran BLAS (else ATen's mm is as direct), a and
// b contiguous (b possibly as a transpose), out with unit column stride, and one floating dtype;
// returns false, doing nothing, otherwise.
bool small_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                const at::Tensor& bias) {
  const auto dtype = out.scalar_type();
  const bool blas = dtype == at::kFloat    ? blas_available<float>()
                    : dtype == at::kDouble ? blas_available<double>()
                                           : false;
  if (!blas || a.scalar_type() != dtype || b.scalar_type() != dtype ||
      (bias.defined() && bias.scalar_type() != dtype)) {
    return false;
  }
  const int64_t m = a.size(0), k = b.size(0), n = b.size(1);
  // Whether a rows × cols matrix with these strides is row-major and dense (strides of dimensions
  // of size 1 are free).
  const auto dense_rows = [](int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride) {
    return (cols <= 1 || col_stride == 1) && (rows <= 1 || row_stride == cols);
  };
  const bool transpose = !dense_rows(k, n, b.stride(0), b.stride(1));
  if (!a.is_contiguous() || (transpose && !dense_rows(n, k, b.stride(1), b.stride(0))) ||
      (out.stride(1) != 1 && n > 1)) {
    return false;
  }
  // Leading dimensions from the sizes where a stride is free (a dimension of size 1).
  const int64_t lda = std::max<int64_t>(k, 1), ldb = std::max<int64_t>(transpose ? k : n, 1);
  const int64_t ldc = m > 1 ? out.stride(0) : std::max<int64_t>(n, 1);
  const at::Tensor bias_c = bias.defined() ? bias.contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(dtype, "fused_rnn_small_gemm", [&] {
    scalar_t* c = out.data_ptr<scalar_t>();
    if (bias_c.defined() && n > 0) {
      const scalar_t* bp = bias_c.data_ptr<scalar_t>();
      for (int64_t i = 0; i < m; ++i) std::memcpy(c + i * ldc, bp, n * sizeof(scalar_t));
    }
    gemm_rowmajor<scalar_t>(m, n, k, a.data_ptr<scalar_t>(), lda, b.data_ptr<scalar_t>(), ldb,
                            transpose, bias_c.defined() ? scalar_t(1) : scalar_t(0), c, ldc);
  });
  return true;
}

}  // namespace

void sequence_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                   const at::Tensor& bias) {
  const int64_t m = a.size(0), k = b.size(0), n = b.size(1);
  const bool short_rows = m < min_packing_rows();  // too few rows to pay for packing b
  if (short_rows && small_gemm(out, a, b, bias)) return;
  // b is [k × n] row-major (unit column stride) or the transpose of a row-major [n × k].
  const bool fits = !short_rows && panel_gemm_available() && out.scalar_type() == at::kFloat &&
                    a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
                    (b.stride(1) == 1 || b.stride(0) == 1) && (a.stride(1) == 1 || k <= 1) &&
                    (out.stride(1) == 1 || n <= 1);
  if (!fits) {
    fused_rnn::aten_gemm(out, a, b, bias);
    return;
  }
  TORCH_INTERNAL_ASSERT(a.size(1) == k && out.size(0) == m && out.size(1) == n &&
                        (!bias.defined() || bias.numel() == n));
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum (and a, perhaps, no storage to point into)
    at::Tensor o = out;
    if (bias.defined()) {
      o.copy_(bias.expand_as(out));
    } else {
      o.zero_();
    }
    return;
  }
  const bool transpose = b.stride(1) != 1;
  const at::Tensor panels = packed_panels(b.data_ptr<float>(), n, k,
                                          transpose ? b.stride(1) : b.stride(0), transpose);
  const float* packed = panels.data_ptr<float>();
  const at::Tensor bias_c = bias.defined() ? bias.contiguous() : at::Tensor();
  const float* bias_p = bias.defined() ? bias_c.data_ptr<float>() : nullptr;
  const float* a_p = a.data_ptr<float>();
  float* c_p = out.data_ptr<float>();
  const int64_t lda = a.stride(0), ldc = out.stride(0);
  const int64_t tile_rows = panel_tile_rows();
  const int64_t blocks = (m + tile_rows - 1) / tile_rows;
  const int64_t grain =
      std::max<int64_t>(1, kMinThreadMacs / std::max<int64_t>(1, tile_rows * n * k));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t r0 = b0 * tile_rows, r1 = std::min(m, b1 * tile_rows);
    panel_gemm(r1 - r0, n, k, a_p + r0 * lda, lda, packed, 0.f, bias_p, c_p + r0 * ldc, ldc);
  });
}

}  // namespace fused_rnn::cpu
