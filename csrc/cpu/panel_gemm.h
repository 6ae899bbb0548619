// The float32 GEMM of the recurrence's steps, written for AVX-512.
//
// A step multiplies few rows (the batch) by the same W_hh at every one of T steps. BLAS is built for
// the opposite case, and on small row counts runs far below the machine's rate: torch 2.14.1's MKL,
// one AMD EPYC (Zen 4) core, 64 steps of 8 × 1024 · 1024 × 512 took 12.0 ms plain (45 GFLOP/s) where
// this kernel takes 4.9 ms (110 GFLOP/s); 64 × 1024 · 1024 × 512, 48.8 vs 38.9 ms. So op(B) is packed
// once into panels of 16 columns (one AVX-512 vector wide, k deep, zero-padded past n), and each tile
// of C, up to 8 rows × 2 panels (or 4 rows × 4 panels), is summed in registers over all of k,
// reading A by broadcast and the panels in order.
#pragma once

#include <cstdint>

namespace fused_rnn::cpu {

constexpr int64_t kPanelWidth = 16;

// Whether this process runs the panel kernel: an x86-64 GCC/Clang build on a CPU with AVX-512F, and
// FUSED_RNN_CPU_GEMM not set to "blas" or "aten" (tests use those to cover the other paths).
bool panel_gemm_available();

// Floats that pack_panels writes for an op(B) of n × k.
int64_t panel_floats(int64_t n, int64_t k);

// op(B) (n columns, inner size k) into panels: panels[(p · k + i) · 16 + j] = op(B)[i][16p + j], 0
// past column n. op(B) = Bᵀ for B stored [n × k] (transpose_b), else B stored [k × n]; row stride ldb.
void pack_panels(const float* b, int64_t n, int64_t k, int64_t ldb, bool transpose_b,
                 float* panels);

// C[m × n] (row stride ldc) = beta · C + A[m × k] (row stride lda) · op(B), op(B) as pack_panels
// wrote it. beta is 0 or 1. Only call when panel_gemm_available().
void panel_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* panels,
                float beta, float* c, int64_t ldc);

}  // namespace fused_rnn::cpu
