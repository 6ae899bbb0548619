// The per-step GEMM of the CPU recurrence, on raw row-major pointers.
//
// A step's GEMM is small (bs × H · H × H) and runs T times, so the cost of reaching BLAS matters as
// much as BLAS itself. When the process has a Fortran BLAS (sgemm_/dgemm_, which torch's own CPU
// library exports on x86 builds), we call it directly: no tensor, no dispatcher. Otherwise, or when a
// dimension does not fit BLAS's 32-bit integers, we fall back to ATen's addmm on views of the same
// memory. FUSED_RNN_CPU_GEMM=aten forces the fallback (tests use it to cover that path).
#pragma once

#include <cstdint>

namespace fused_rnn::cpu {

// C[m × n] (row stride ldc) = beta · C + A[m × k] (row stride lda) · op(B), where op(B) = Bᵀ for B
// stored as [n × k] (transpose_b) or B for B stored as [k × n]. beta is 0 or 1.
template <typename scalar_t>
void gemm_rowmajor(int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda,
                   const scalar_t* b, int64_t ldb, bool transpose_b, scalar_t beta, scalar_t* c,
                   int64_t ldc);

// Which path gemm_rowmajor takes in this process: "blas" or "aten".
const char* gemm_path();

// The right-hand side of a step GEMM that every step reuses (W_hhᵀ forward, W_hh in BPTT), packed
// once into BLAS's internal panel format when the BLAS offers that (MKL's sgemm_pack/compute, float
// only), so that the T steps do not each re-pack it. multiply() is gemm_rowmajor with this B; row
// counts other than the one packed for (the ends of packed sequences) take the plain path.
//
// Below kMinPackedRows rows the packed kernel loses to the plain one (a GEMV-like product: measured
// with torch 2.14.1's MKL on 2 EPYC cores, T = 64, H = 1024 forward: batch 1 8.1 ms packed vs 6.0 ms
// plain, batch 2 12.4 vs 11.3, batch 4 16.0 vs 22.5), so it is not packed.
constexpr int64_t kMinPackedRows = 4;

template <typename scalar_t>
class StepRhs {
 public:
  StepRhs(const scalar_t* b, int64_t n, int64_t k, int64_t ldb, bool transpose_b, int64_t rows);
  ~StepRhs();
  StepRhs(const StepRhs&) = delete;
  StepRhs& operator=(const StepRhs&) = delete;

  void multiply(int64_t m, const scalar_t* a, int64_t lda, scalar_t beta, scalar_t* c,
                int64_t ldc) const;

 private:
  const scalar_t* b_;
  int64_t n_, k_, ldb_, rows_;
  bool transpose_b_;
  scalar_t* packed_ = nullptr;
};

}  // namespace fused_rnn::cpu
