// float32 GEMM written for AVX-512: the recurrence's step products and the layer's whole-sequence
// products.
//
// A step multiplies few rows (the batch) by the same W_hh at every one of T steps. BLAS is built for
// the opposite case and runs small row counts far below the machine's rate: torch 2.14.1's MKL on
// one AMD EPYC (Zen 4) core, 64 steps of 8 × 1024 · 1024 × 512 took 12.0 ms (45 GFLOP/s) where this
// kernel takes 4.9 ms (110 GFLOP/s); on whole-sequence shapes it is ahead too (2048 × 1024 · 1024 ×
// 1024: 45.2 ms MKL, 38.9 ms here with the packing included).
//
// The kernel: C is cut into tiles of up to 8 rows × 32 columns (or, below 6 rows, × 64), each summed
// in registers over the whole inner dimension k, then added to C (or a bias) and stored once. The right
// side is packed first (once for all T steps, or once per whole-sequence product) into contiguous
// panels of 16 columns (one vector) × k; the left side is read in place, one element at a time
// (broadcast).
#pragma once

#include <cstdint>

namespace fused_rnn::cpu {

constexpr int64_t kPanelWidth = 16;
// Rows of the kernel's tallest tile: callers splitting C across threads cut it in multiples of this.
constexpr int64_t kTileRows = 8;

// Panels that n columns take (the last one partial when n is not a multiple of 16).
inline int64_t panel_count(int64_t n) { return (n + kPanelWidth - 1) / kPanelWidth; }

// Whether this process runs the panel kernel: an x86-64 GCC/Clang build on a CPU with AVX-512F, and
// FUSED_RNN_CPU_GEMM not set to another path ("blas", "aten"; tests use those to cover them).
bool panel_gemm_available();

// Floats that pack_panels writes for an op(B) of n columns, inner size k.
int64_t panel_floats(int64_t n, int64_t k);

// op(B) (n columns, inner size k) into panels: dst[(p · k + i) · 16 + j] = op(B)[i][16p + j], 0 past
// column n. op(B) = Bᵀ for B stored [n × k] (transpose_b), else B stored [k × n]; row stride ldb.
void pack_panels(const float* b, int64_t n, int64_t k, int64_t ldb, bool transpose_b, float* dst);

// Rows [0, m) of C[m × n] (row stride ldc) = A[m × k] (row stride lda) · op(B) + (beta · C, or the
// row vector bias when one is given), op(B) as pack_panels wrote it. beta is 0 or 1.
// Single-threaded; only call when panel_gemm_available().
void panel_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* panels,
                float beta, const float* bias, float* c, int64_t ldc);

}  // namespace fused_rnn::cpu
