#include "pointwise.h"

#include <cmath>
#include <cstring>

// Each loop is compiled for AVX-512, AVX2+FMA and baseline x86-64, picked at load time, so one
// binary vectorises as wide as the machine allows.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSED_RNN_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FUSED_RNN_MULTIVERSION
#endif

namespace fused_rnn::cpu {
namespace {

// exp(y) for y in [-88, 88]: y = k·ln2 + r with |r| ≤ ln2/2, exp(r) by its Taylor polynomial to r⁷
// (relative error < 2e-8 there), 2^k built in the exponent bits. No calls and no branches, so
// loops over it vectorise.
inline float exp_float(float y) {
  // Round to nearest by adding and removing 1.5·2^23 (exact for |y·log2 e| < 2^22).
  const float k = (y * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (y - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// tanh in float: below |x| = 0.8, x + x³·R(x²) with R the minimax polynomial of tools/fit_tanh.py
// (relative error 3.8e-9); from there 1 − 2/(e^{2|x|}+1), which no longer cancels (2/(e^{2x}+1) <
// tanh x from 0.55 on); ±1 beyond |x| = 10 (float tanh is 1 from 9.02); ±0 and NaN as they come.
// Over every float it is within 1.04 ulp of the exact value with FMA contraction, 1.14 without
// (tools/tanh_error.py). The switch at 0.2 with a Taylor polynomial it replaced was 6.3 ulp off
// just past 0.2, where the exp form cancels; this one costs two more FMAs (0.80 ns an element
// against 0.76 on one Zen 3 core, AVX2).
inline float tanh_float(float x) {
  const float a = std::fabs(x);
  const float e = exp_float(2.f * a < 20.f ? 2.f * a : 20.f);
  const float far = 1.f - 2.f / (e + 1.f);
  const float x2 = x * x;
  float p = 0.00158857530073f;
  p = p * x2 - 0.00741721348588f;
  p = p * x2 + 0.021308784355f;
  p = p * x2 - 0.0538543638078f;
  p = p * x2 + 0.133322531656f;
  p = p * x2 - 0.333332991043f;
  const float near = x + x * x2 * p;
  // near has the sign of x, but for x = -0 it is -0 + +0 = +0: hence the copysign.
  const float r = std::copysign(a < 0.8f ? near : far, x);
  return x != x ? x : r;
}

FUSED_RNN_MULTIVERSION
void tanh_rows_float(float* c, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    float* r = c + i * ld;
    for (int64_t j = 0; j < cols; ++j) r[j] = tanh_float(r[j]);
  }
}

void tanh_rows(float* c, int64_t rows, int64_t cols, int64_t ld) {
  tanh_rows_float(c, rows, cols, ld);
}

void tanh_rows(double* c, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    double* r = c + i * ld;
    for (int64_t j = 0; j < cols; ++j) r[j] = std::tanh(r[j]);
  }
}

template <typename scalar_t>
FUSED_RNN_MULTIVERSION void relu_rows(scalar_t* c, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* r = c + i * ld;
    // x < 0 ? 0 : x keeps NaN, as torch.relu does.
    for (int64_t j = 0; j < cols; ++j) r[j] = r[j] < scalar_t(0) ? scalar_t(0) : r[j];
  }
}

template <typename scalar_t>
FUSED_RNN_MULTIVERSION void times_tanh_grad(scalar_t* da, const scalar_t* h, int64_t rows,
                                            int64_t cols, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* g = da + i * ld;
    const scalar_t* y = h + i * ld;
    for (int64_t j = 0; j < cols; ++j) g[j] = g[j] * (scalar_t(1) - y[j] * y[j]);
  }
}

template <typename scalar_t>
FUSED_RNN_MULTIVERSION void times_relu_grad(scalar_t* da, const scalar_t* h, int64_t rows,
                                            int64_t cols, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* g = da + i * ld;
    const scalar_t* y = h + i * ld;
    for (int64_t j = 0; j < cols; ++j) g[j] = y[j] <= scalar_t(0) ? scalar_t(0) : g[j];
  }
}

}  // namespace

template <typename scalar_t>
void activate_rows(scalar_t* c, int64_t rows, int64_t cols, int64_t ld, bool relu) {
  if (relu) {
    relu_rows(c, rows, cols, ld);
  } else {
    tanh_rows(c, rows, cols, ld);
  }
}

template <typename scalar_t>
void times_activation_grad(scalar_t* da, const scalar_t* h, int64_t rows, int64_t cols,
                           int64_t ld, bool relu) {
  if (relu) {
    times_relu_grad(da, h, rows, cols, ld);
  } else {
    times_tanh_grad(da, h, rows, cols, ld);
  }
}

template void activate_rows<float>(float*, int64_t, int64_t, int64_t, bool);
template void activate_rows<double>(double*, int64_t, int64_t, int64_t, bool);
template void times_activation_grad<float>(float*, const float*, int64_t, int64_t, int64_t, bool);
template void times_activation_grad<double>(double*, const double*, int64_t, int64_t, int64_t,
                                            bool);

}  // namespace fused_rnn::cpu
