// float32 GEMM written for AVX-512, and for AVX2 with FMA where AVX-512 is missing: the recurrence's
// step products and the layer's whole-sequence products.
//
// A step multiplies few rows (the batch) by the same W_hh at every one of T steps. BLAS is built for
// the opposite case and runs small row counts far below the machine's rate: torch 2.14.1's MKL on
// one AMD EPYC (Zen 4) core, 64 steps of 8 × 1024 · 1024 × 512 took 12.0 ms (45 GFLOP/s) where this
// kernel takes 4.9 ms (110 GFLOP/s); on whole-sequence shapes it is ahead too (2048 × 1024 · 1024 ×
// 1024: 45.2 ms MKL, 38.9 ms here with the packing included).
//
// The kernel: C is cut into tiles of up to 8 rows × 32 columns (or, below 6 rows, × 64), each summed
// in registers over the whole inner dimension k (AVX2, k > 1024: over slices of it, below), then
// added to C (or a bias) and stored. The right side is packed first (once for all T steps, or once
// per whole-sequence product) into contiguous panels of 16 columns (one vector) × k; the left side
// is read in place, one element at a time (broadcast).
//
// Without AVX-512 (AVX2 and FMA: 16 vector registers of 8 floats) the same panels are read as two
// vectors each, in tiles of up to 6 rows × 1 panel. On a 2-core AMD EPYC without AVX-512, torch
// 2.14.1, T = 64 float32 over the benchmark's 64 shapes, it moved fused forward from a median 1.38×
// nn.RNN (MKL's steps) to 1.60×, forward+backward from 2.03× to 2.17–2.31× (two runs). Where k >
// 1024 the AVX2 kernel is blocked for the caches (chunks of rows, slices of k, groups of columns):
// on that machine, 2 threads, 4096 × 2048 · 2048 × 2048 went from a median 97 to 148 GFLOP/s (5
// runs each), and a layer's forward at T = 64, B = 8, H = 2048 (the input projection and 64 steps
// of 8 × 2048 · 2048 × 1024 per thread) from 95 to 123 GFLOP/s (4 runs each).
#pragma once

#include <cstdint>

namespace fused_rnn::cpu {

constexpr int64_t kPanelWidth = 16;
// Rows of each kernel's tallest tile (AVX-512, AVX2).
constexpr int64_t kTileRows = 8;
constexpr int64_t kTileRowsAvx2 = 6;
// The cache blocking of the AVX2 kernel where k > kDepthAvx2 (panel_gemm.cpp's `blocked`): rows of C
// per chunk (a multiple of its 6-row tiles), the slice of the inner dimension summed per pass, and
// the columns per group (4 panels, a multiple of every tile's width). A group's slice of op(B),
// 64 × 1024 floats, is half of the 512 KiB L2 of the Zen 3 core it was measured on.
constexpr int64_t kChunkRowsAvx2 = 96;
constexpr int64_t kDepthAvx2 = 1024;
constexpr int64_t kGroupColumns = 4 * kPanelWidth;

// Panels that n columns take (the last one partial when n is not a multiple of 16).
inline int64_t panel_count(int64_t n) { return (n + kPanelWidth - 1) / kPanelWidth; }

// The panel kernel this process runs: an x86-64 GCC/Clang build on a CPU with AVX-512F runs the
// AVX-512 one, else on one with AVX2 and FMA the AVX2 one, unless FUSED_RNN_CPU_GEMM says otherwise
// ("panel_avx2": the AVX2 one where it can run; another path, "blas" or "aten": none).
enum class PanelIsa { kNone, kAvx2, kAvx512 };
PanelIsa panel_isa();
const char* panel_isa_name();  // "avx512", "avx2" or ""
inline bool panel_gemm_available() { return panel_isa() != PanelIsa::kNone; }

// Rows of the running kernel's tallest tile: callers splitting C across threads cut it in multiples
// of this.
int64_t panel_tile_rows();

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
