#include "panel_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FUSED_RNN_PANEL_KERNEL 1
#include <immintrin.h>
#endif

namespace fused_rnn::cpu {

namespace {

// The kernel this process runs, decided once: AVX-512F where the CPU has it, else AVX2 with FMA;
// FUSED_RNN_CPU_GEMM=panel_avx2 asks for the AVX2 one (tests cover it on AVX-512 machines too), any
// other value but "panel" for none (tests cover the BLAS and ATen paths that way).
PanelIsa choose_isa() {
#ifdef FUSED_RNN_PANEL_KERNEL
  const char* v = std::getenv("FUSED_RNN_CPU_GEMM");
  const bool unset = v == nullptr || *v == '\0' || std::strcmp(v, "panel") == 0;
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (unset && __builtin_cpu_supports("avx512f")) return PanelIsa::kAvx512;
  if ((unset || std::strcmp(v, "panel_avx2") == 0) && avx2) return PanelIsa::kAvx2;
#endif
  return PanelIsa::kNone;
}

}  // namespace

PanelIsa panel_isa() {
  static const PanelIsa isa = choose_isa();
  return isa;
}

const char* panel_isa_name() {
  switch (panel_isa()) {
    case PanelIsa::kAvx512:
      return "avx512";
    case PanelIsa::kAvx2:
      return "avx2";
    case PanelIsa::kNone:
      break;
  }
  return "";
}

int64_t panel_tile_rows() { return panel_isa() == PanelIsa::kAvx2 ? kTileRowsAvx2 : kTileRows; }

int64_t panel_floats(int64_t n, int64_t k) {
  return panel_count(n) * kPanelWidth * k;
}

void pack_panels(const float* b, int64_t n, int64_t k, int64_t ldb, bool transpose_b, float* dst) {
  const int64_t count = panel_count(n);
  for (int64_t p = 0; p < count; ++p) {
    const int64_t j0 = p * kPanelWidth, width = std::min(kPanelWidth, n - j0);
    float* panel = dst + p * k * kPanelWidth;
    if (width < kPanelWidth) std::fill(panel, panel + k * kPanelWidth, 0.f);
    if (!transpose_b) {
      for (int64_t i = 0; i < k; ++i) {
        std::copy(b + i * ldb + j0, b + i * ldb + j0 + width, panel + i * kPanelWidth);
      }
      continue;
    }
    // Column j of the panel is row j0 + j of B, transposed 16 × 16 at a time (2.4x faster than
    // gathering each panel row from 16 rows of B, at n = k = 1024).
    for (int64_t i0 = 0; i0 < k; i0 += kPanelWidth) {
      const int64_t depth = std::min(kPanelWidth, k - i0);
      for (int64_t j = 0; j < width; ++j) {
        const float* src = b + (j0 + j) * ldb + i0;
        for (int64_t i = 0; i < depth; ++i) panel[(i0 + i) * kPanelWidth + j] = src[i];
      }
    }
  }
}

#ifdef FUSED_RNN_PANEL_KERNEL
namespace {

#define FUSED_RNN_AVX512 __attribute__((target("avx512f")))

// The epilogue of a tile: what is added to A · op(B) before the store.
struct Addend {
  float beta;
  const float* bias;  // a row vector, in place of beta · C when not null

  // The addend of the columns from j on.
  Addend shifted(int64_t j) const { return {beta, bias != nullptr ? bias + j : nullptr}; }
};

// One tile: rows [0, MR) × panels [0, NV) of C, summed over k in registers (panel v starts at
// b + v · ldp). Every vector of the tile but the last is whole; the last stores the columns in `last`
// (the matrix's final panel may be partial; its padding is read, never stored). (Masked loads in the
// k loop would make GCC keep the accumulators in memory: hence the zero padding.)
template <int MR, int NV>
FUSED_RNN_AVX512 inline void tile(int64_t k, const float* a, int64_t lda, const float* b,
                                  int64_t ldp, Addend add, float* c, int64_t ldc, __mmask16 last) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < k; ++i) {
    __m512 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + v * ldp + i * kPanelWidth);
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * lda + i]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(x, bv[v], acc[r][v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const __mmask16 mask = v == NV - 1 ? last : __mmask16(0xFFFF);
    const __m512 bias = add.bias != nullptr
                            ? _mm512_maskz_loadu_ps(mask, add.bias + v * kPanelWidth)
                            : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) {
      float* out = c + r * ldc + v * kPanelWidth;
      __m512 sum = acc[r][v];
      if (add.bias != nullptr) {
        sum = _mm512_add_ps(sum, bias);
      } else if (add.beta != 0.f) {
        sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, out));
      }
      _mm512_mask_storeu_ps(out, mask, sum);
    }
  }
}

// MR rows of C, all n columns: tiles NV panels wide, narrower at the end.
template <int MR, int NV>
FUSED_RNN_AVX512 void row_block(int64_t n, int64_t k, const float* a, int64_t lda,
                                const float* panels, int64_t ldp, Addend add, float* c,
                                int64_t ldc) {
  const int64_t count = panel_count(n);
  const int64_t tail = n % kPanelWidth;
  const __mmask16 tail_mask = tail == 0 ? __mmask16(0xFFFF) : __mmask16((1u << tail) - 1);
  for (int64_t p = 0; p < count; p += NV) {
    const int64_t width = std::min<int64_t>(NV, count - p);
    const __mmask16 last = p + width == count ? tail_mask : __mmask16(0xFFFF);
    const float* src = panels + p * ldp;
    const Addend at = add.shifted(p * kPanelWidth);
    float* dst = c + p * kPanelWidth;
    if (width == NV) {
      tile<MR, NV>(k, a, lda, src, ldp, at, dst, ldc, last);
    } else if (width == 1) {
      tile<MR, 1>(k, a, lda, src, ldp, at, dst, ldc, last);
    } else if (width == 2) {
      tile<MR, 2>(k, a, lda, src, ldp, at, dst, ldc, last);
    } else {
      tile<MR, 3>(k, a, lda, src, ldp, at, dst, ldc, last);
    }
  }
}

// 8 rows × 2 panels: 16 accumulators. Fewer rows: 4 panels, so that at least 4 independent sums
// cover the FMA latency (as many as the registers allow: MR · NV + NV ≤ 32).
// Not blocked (kDepth 0): one tile row at a time over all of k, the order in which it met the CPU
// targets on the AVX-512 machine; none has been at hand since to measure another order on.
struct Avx512 {
  static constexpr int kTall = kTileRows;
  static constexpr int64_t kChunkRows = kTileRows, kDepth = 0;
  template <int MR>
  static void rows(int64_t n, int64_t k, const float* a, int64_t lda, const float* panels,
                   int64_t ldp, Addend add, float* c, int64_t ldc) {
    constexpr int kPanels = MR >= 6 ? 2 : 4;
    row_block<MR, kPanels>(n, k, a, lda, panels, ldp, add, c, ldc);
  }
};

#define FUSED_RNN_AVX2 __attribute__((target("avx2,fma")))

// The AVX2 kernel: the same panels, each two 8-float vectors; 16 vector registers, so tiles of up to
// 6 rows × 1 panel (12 accumulators, as in BLIS's Haswell kernel), fewer rows over more panels.

// Lanes [0, count) of a vector set, for a masked load or store.
FUSED_RNN_AVX2 inline __m256i lanes_below(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// One tile: rows [0, MR) × vectors [0, NV) (NV / 2 panels, panel q at b + q · ldp) of C, summed
// over k in registers; the columns [0, cols) of the tile are stored.
template <int MR, int NV>
FUSED_RNN_AVX2 inline void tile_avx2(int64_t k, const float* a, int64_t lda, const float* b,
                                     int64_t ldp, Addend add, float* c, int64_t ldc,
                                     int64_t cols) {
  static_assert(NV % 2 == 0, "whole panels");
  __m256 acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  }
  for (int64_t i = 0; i < k; ++i) {
    __m256 bv[NV];
    for (int v = 0; v < NV; ++v) {
      bv[v] = _mm256_loadu_ps(b + (v / 2) * ldp + i * kPanelWidth + (v % 2) * 8);
    }
    for (int r = 0; r < MR; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r * lda + i);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(x, bv[v], acc[r][v]);
    }
  }
  // Unrolled whole, so that acc is only ever indexed by constants: otherwise GCC keeps it in
  // memory too and stores it at every i of the loop above (half the kernel's speed).
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const int64_t count = std::min<int64_t>(8, cols - v * 8);  // <= 0: an empty mask
    const __m256i mask = lanes_below(count);
    const bool whole = count == 8;
    __m256 bias = _mm256_setzero_ps();
    if (add.bias != nullptr) {
      bias = whole ? _mm256_loadu_ps(add.bias + v * 8) : _mm256_maskload_ps(add.bias + v * 8, mask);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      float* out = c + r * ldc + v * 8;
      __m256 sum = acc[r][v];
      if (add.bias != nullptr) {
        sum = _mm256_add_ps(sum, bias);
      } else if (add.beta != 0.f) {
        sum = _mm256_add_ps(sum, whole ? _mm256_loadu_ps(out) : _mm256_maskload_ps(out, mask));
      }
      if (whole) {
        _mm256_storeu_ps(out, sum);
      } else {
        _mm256_maskstore_ps(out, mask, sum);
      }
    }
  }
}

// MR rows of C, all n columns: tiles NV / 2 panels wide, narrower at the end.
template <int MR, int NV>
FUSED_RNN_AVX2 void row_block_avx2(int64_t n, int64_t k, const float* a, int64_t lda,
                                   const float* panels, int64_t ldp, Addend add, float* c,
                                   int64_t ldc) {
  constexpr int64_t kPanels = NV / 2;
  const int64_t count = panel_count(n);
  for (int64_t p = 0; p < count; p += kPanels) {
    const int64_t width = std::min<int64_t>(kPanels, count - p);
    const int64_t cols = n - p * kPanelWidth;  // the tile stores min(cols, its width)
    const float* src = panels + p * ldp;
    const Addend at = add.shifted(p * kPanelWidth);
    float* dst = c + p * kPanelWidth;
    if (width == kPanels) {
      tile_avx2<MR, NV>(k, a, lda, src, ldp, at, dst, ldc, cols);
    } else if constexpr (kPanels > 1) {  // (only the narrower tiles that can occur are built)
      if (width == 1) {
        tile_avx2<MR, 2>(k, a, lda, src, ldp, at, dst, ldc, cols);
      } else if constexpr (kPanels > 2) {
        if (width == 2) {
          tile_avx2<MR, 4>(k, a, lda, src, ldp, at, dst, ldc, cols);
        } else {
          tile_avx2<MR, 6>(k, a, lda, src, ldp, at, dst, ldc, cols);
        }
      }
    }
  }
}

// 4 to 6 rows × 1 panel: 8 to 12 accumulators; 2 or 3 rows × 2 panels; 1 row × 4 panels (its B
// vectors, each used once, are read by the FMAs themselves): at least 8 independent sums each.
struct Avx2 {
  static constexpr int kTall = kTileRowsAvx2;
  static constexpr int64_t kChunkRows = kChunkRowsAvx2, kDepth = kDepthAvx2;
  template <int MR>
  static void rows(int64_t n, int64_t k, const float* a, int64_t lda, const float* panels,
                   int64_t ldp, Addend add, float* c, int64_t ldc) {
    constexpr int kVectors = MR >= 4 ? 2 : (MR >= 2 ? 4 : 8);
    row_block_avx2<MR, kVectors>(n, k, a, lda, panels, ldp, add, c, ldc);
  }
};

// Rows [0, m) of C on a kernel: blocks of its tallest tile, then one block of the rows left.
template <typename Kernel>
void by_rows(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* panels,
             int64_t ldp, Addend add, float* c, int64_t ldc) {
  constexpr int kTall = Kernel::kTall;
  static_assert(kTall <= 8, "the remainder's cases below");
  int64_t i = 0;
  for (; i + kTall <= m; i += kTall) {
    Kernel::template rows<kTall>(n, k, a + i * lda, lda, panels, ldp, add, c + i * ldc, ldc);
  }
  a += i * lda;
  c += i * ldc;
  switch (m - i) {
    case 1: Kernel::template rows<1>(n, k, a, lda, panels, ldp, add, c, ldc); break;
    case 2: Kernel::template rows<2>(n, k, a, lda, panels, ldp, add, c, ldc); break;
    case 3: Kernel::template rows<3>(n, k, a, lda, panels, ldp, add, c, ldc); break;
    case 4: Kernel::template rows<4>(n, k, a, lda, panels, ldp, add, c, ldc); break;
    case 5: Kernel::template rows<5>(n, k, a, lda, panels, ldp, add, c, ldc); break;
    case 6:
      if constexpr (kTall > 6) Kernel::template rows<6>(n, k, a, lda, panels, ldp, add, c, ldc);
      break;
    case 7:
      if constexpr (kTall > 7) Kernel::template rows<7>(n, k, a, lda, panels, ldp, add, c, ldc);
      break;
    default: break;
  }
}

// C on a kernel. Where k is deeper than Kernel::kDepth (never, for kDepth 0), blocked for the
// caches: chunks of Kernel::kChunkRows rows; in each, the inner dimension in slices of kDepth; in
// each slice, the columns in groups of kGroupColumns, each group swept by all the chunk's row tiles
// before the next. A tile row's slice of A (6 × 1024 floats: 24 KiB) then stays in L1 over its
// group's panels, a group's slice of op(B) in L2 over the chunk's tile rows, and op(B) comes from L3
// once per chunk rather than once per tile row. The first slice adds `add`, the later ones the
// partial sums already in C. Otherwise, one tile row at a time over all of k and all the columns:
// at k ≤ 1024 that was as fast or faster (AVX2, 2 threads: 4096 × 512 · 512 × 1024, median 140
// GFLOP/s against 135 blocked, 8 runs each; the steps alike within noise).
template <typename Kernel>
void blocked(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* panels,
             Addend add, float* c, int64_t ldc) {
  const int64_t ldp = k * kPanelWidth;
  const bool blocking = Kernel::kDepth > 0 && k > Kernel::kDepth;
  const int64_t chunk = blocking ? Kernel::kChunkRows : Kernel::kTall;
  const int64_t depth = blocking ? Kernel::kDepth : std::max<int64_t>(k, 1);
  const int64_t group = blocking ? kGroupColumns : n;
  for (int64_t r0 = 0; r0 < m; r0 += chunk) {
    const int64_t rows = std::min(chunk, m - r0);
    for (int64_t k0 = 0; k0 == 0 || k0 < k; k0 += depth) {  // k = 0 still stores the addend
      const int64_t kk = std::min(depth, k - k0);
      const Addend at = k0 == 0 ? add : Addend{1.f, nullptr};
      for (int64_t j0 = 0; j0 < n; j0 += group) {
        by_rows<Kernel>(rows, std::min(group, n - j0), kk, a + r0 * lda + k0, lda,
                        panels + j0 / kPanelWidth * ldp + k0 * kPanelWidth, ldp, at.shifted(j0),
                        c + r0 * ldc + j0, ldc);
      }
    }
  }
}

}  // namespace
#endif

void panel_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* panels,
                float beta, const float* bias, float* c, int64_t ldc) {
#ifdef FUSED_RNN_PANEL_KERNEL
  if (m <= 0 || n <= 0) return;
  const Addend add{beta, bias};
  if (panel_isa() == PanelIsa::kAvx2) {
    blocked<Avx2>(m, n, k, a, lda, panels, add, c, ldc);
  } else {
    blocked<Avx512>(m, n, k, a, lda, panels, add, c, ldc);
  }
#else
  (void)m, (void)n, (void)k, (void)a, (void)lda, (void)panels, (void)beta, (void)bias, (void)c,
      (void)ldc;
#endif
}

}  // namespace fused_rnn::cpu
