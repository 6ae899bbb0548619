#include "panel_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FUSED_RNN_PANEL_KERNEL 1
#include <immintrin.h>
#endif

namespace fused_rnn::cpu {

bool panel_gemm_available() {
  static const bool ok = [] {
#ifdef FUSED_RNN_PANEL_KERNEL
    const char* v = std::getenv("FUSED_RNN_CPU_GEMM");
    const bool other_path = v != nullptr && *v != '\0' && std::strcmp(v, "panel") != 0;
    return !other_path && __builtin_cpu_supports("avx512f");
#else
    return false;
#endif
  }();
  return ok;
}

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
};

// One tile: rows [0, MR) × panels [0, NV) of C, summed over all of k in registers. Every vector of
// the tile but the last is whole; the last stores the columns in `last` (the matrix's final panel
// may be partial; its padding is read, never stored). (Masked loads in the k loop would make GCC
// keep the accumulators in memory: hence the zero padding.)
template <int MR, int NV>
FUSED_RNN_AVX512 inline void tile(int64_t k, const float* a, int64_t lda, const float* b,
                                  Addend add, float* c, int64_t ldc, __mmask16 last) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < k; ++i) {
    __m512 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + (v * k + i) * kPanelWidth);
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
                                const float* panels, Addend add, float* c, int64_t ldc) {
  const int64_t count = panel_count(n);
  const int64_t tail = n % kPanelWidth;
  const __mmask16 tail_mask = tail == 0 ? __mmask16(0xFFFF) : __mmask16((1u << tail) - 1);
  for (int64_t p = 0; p < count; p += NV) {
    const int64_t width = std::min<int64_t>(NV, count - p);
    const __mmask16 last = p + width == count ? tail_mask : __mmask16(0xFFFF);
    const float* src = panels + p * k * kPanelWidth;
    const Addend at{add.beta, add.bias != nullptr ? add.bias + p * kPanelWidth : nullptr};
    float* dst = c + p * kPanelWidth;
    if (width == NV) {
      tile<MR, NV>(k, a, lda, src, at, dst, ldc, last);
    } else if (width == 1) {
      tile<MR, 1>(k, a, lda, src, at, dst, ldc, last);
    } else if (width == 2) {
      tile<MR, 2>(k, a, lda, src, at, dst, ldc, last);
    } else {
      tile<MR, 3>(k, a, lda, src, at, dst, ldc, last);
    }
  }
}

// 8 rows × 2 panels: 16 accumulators. Fewer rows: 4 panels, so that at least 4 independent sums
// cover the FMA latency (as many as the registers allow: MR · NV + NV ≤ 32).
template <int MR>
void rows(int64_t n, int64_t k, const float* a, int64_t lda, const float* panels, Addend add,
          float* c, int64_t ldc) {
  constexpr int kPanels = MR >= 6 ? 2 : 4;
  row_block<MR, kPanels>(n, k, a, lda, panels, add, c, ldc);
}

}  // namespace
#endif

void panel_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* panels,
                float beta, const float* bias, float* c, int64_t ldc) {
#ifdef FUSED_RNN_PANEL_KERNEL
  if (m <= 0 || n <= 0) return;
  const Addend add{beta, bias};
  int64_t i = 0;
  for (; i + kTileRows <= m; i += kTileRows) {
    rows<kTileRows>(n, k, a + i * lda, lda, panels, add, c + i * ldc, ldc);
  }
  const float* ar = a + i * lda;
  float* cr = c + i * ldc;
  switch (m - i) {
    case 1: rows<1>(n, k, ar, lda, panels, add, cr, ldc); break;
    case 2: rows<2>(n, k, ar, lda, panels, add, cr, ldc); break;
    case 3: rows<3>(n, k, ar, lda, panels, add, cr, ldc); break;
    case 4: rows<4>(n, k, ar, lda, panels, add, cr, ldc); break;
    case 5: rows<5>(n, k, ar, lda, panels, add, cr, ldc); break;
    case 6: rows<6>(n, k, ar, lda, panels, add, cr, ldc); break;
    case 7: rows<7>(n, k, ar, lda, panels, add, cr, ldc); break;
    default: break;
  }
#else
  (void)m, (void)n, (void)k, (void)a, (void)lda, (void)panels, (void)beta, (void)bias, (void)c,
      (void)ldc;
#endif
}

}  // namespace fused_rnn::cpu
