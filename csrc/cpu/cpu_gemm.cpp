#include "cpu_gemm.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <limits>

// Weak: resolved from torch's CPU library when it exports them, null otherwise (the extension still
// loads, and the ATen path runs).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
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

}  // namespace fused_rnn::cpu
