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
  return (n + kPanelWidth - 1) / kPanelWidth * kPanelWidth * k;
}

void pack_panels(const float* b, int64_t n, int64_t k, int64_t ldb, bool transpose_b,
                 float* panels) {
  const int64_t count = (n + kPanelWidth - 1) / kPanelWidth;
  for (int64_t p = 0; p < count; ++p) {
    const int64_t j0 = p * kPanelWidth, width = std::min(kPanelWidth, n - j0);
    float* dst = panels + p * k * kPanelWidth;
    for (int64_t i = 0; i < k; ++i) {
      float* row = dst + i * kPanelWidth;
      for (int64_t j = 0; j < width; ++j) {
        row[j] = transpose_b ? b[(j0 + j) * ldb + i] : b[i * ldb + j0 + j];
      }
      std::fill(row + width, row + kPanelWidth, 0.f);
    }
  }
}

#ifdef FUSED_RNN_PANEL_KERNEL
namespace {

#define FUSED_RNN_AVX512 __attribute__((target("avx512f")))

// One tile: rows [0, MR) × panels [0, NV) of C, summed over all of k in registers. Every vector of
// the tile but the last is whole; the last stores the columns in `last` (the matrix's final panel).
template <int MR, int NV>
FUSED_RNN_AVX512 inline void tile(int64_t k, const float* a, int64_t lda, const float* panels,
                                  float beta, float* c, int64_t ldc, __mmask16 last) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < k; ++i) {
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(panels + (v * k + i) * kPanelWidth);
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * lda + i]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(x, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mask = v == NV - 1 ? last : __mmask16(0xFFFF);
      float* out = c + r * ldc + v * kPanelWidth;
      __m512 sum = acc[r][v];
      if (beta != 0.f) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, out));
      _mm512_mask_storeu_ps(out, mask, sum);
    }
  }
}

// MR rows of C, all n columns: tiles NV panels wide, fewer at the end.
template <int MR, int NV>
FUSED_RNN_AVX512 void row_block(int64_t n, int64_t k, const float* a, int64_t lda,
                                const float* panels, float beta, float* c, int64_t ldc) {
  const int64_t count = (n + kPanelWidth - 1) / kPanelWidth;
  const int64_t tail = n % kPanelWidth;
  const __mmask16 tail_mask = tail == 0 ? __mmask16(0xFFFF) : __mmask16((1u << tail) - 1);
  for (int64_t p = 0; p < count; p += NV) {
    const int64_t width = std::min<int64_t>(NV, count - p);
    const __mmask16 last = p + width == count ? tail_mask : __mmask16(0xFFFF);
    const float* src = panels + p * k * kPanelWidth;
    float* dst = c + p * kPanelWidth;
    if (width == NV) {
      tile<MR, NV>(k, a, lda, src, beta, dst, ldc, last);
    } else if (width == 1) {
      tile<MR, 1>(k, a, lda, src, beta, dst, ldc, last);
    } else if (width == 2) {
      tile<MR, 2>(k, a, lda, src, beta, dst, ldc, last);
    } else {
      tile<MR, 3>(k, a, lda, src, beta, dst, ldc, last);
    }
  }
}

// 8 rows × 2 panels: 16 accumulators. Fewer rows: 4 panels, so that at least 4 independent sums
// cover the FMA latency (as many as the registers allow: MR · NV + NV ≤ 32).
template <int MR>
void rows(int64_t n, int64_t k, const float* a, int64_t lda, const float* panels, float beta,
          float* c, int64_t ldc) {
  constexpr int kPanels = MR >= 6 ? 2 : 4;
  row_block<MR, kPanels>(n, k, a, lda, panels, beta, c, ldc);
}

}  // namespace
#endif

void panel_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* panels,
                float beta, float* c, int64_t ldc) {
#ifdef FUSED_RNN_PANEL_KERNEL
  if (m <= 0 || n <= 0) return;
  int64_t i = 0;
  for (; i + 8 <= m; i += 8) rows<8>(n, k, a + i * lda, lda, panels, beta, c + i * ldc, ldc);
  const float* ar = a + i * lda;
  float* cr = c + i * ldc;
  switch (m - i) {
    case 1: rows<1>(n, k, ar, lda, panels, beta, cr, ldc); break;
    case 2: rows<2>(n, k, ar, lda, panels, beta, cr, ldc); break;
    case 3: rows<3>(n, k, ar, lda, panels, beta, cr, ldc); break;
    case 4: rows<4>(n, k, ar, lda, panels, beta, cr, ldc); break;
    case 5: rows<5>(n, k, ar, lda, panels, beta, cr, ldc); break;
    case 6: rows<6>(n, k, ar, lda, panels, beta, cr, ldc); break;
    case 7: rows<7>(n, k, ar, lda, panels, beta, cr, ldc); break;
    default: break;
  }
#else
  (void)m, (void)n, (void)k, (void)a, (void)lda, (void)panels, (void)beta, (void)c, (void)ldc;
#endif
}

}  // namespace fused_rnn::cpu
