// The per-step path: one launch per step and direction. A 64 × 64 tile of the step's (rows × H)
// result per block, 256 threads each computing 4 × 4 of it, K in chunks of 16 through shared memory;
// the epilogue (../recurrence_common.cuh) adds P_t or dH_t and applies act or act' in place.
//
//   forward:  C[m][n] = act(C[m][n] + Σ_k A[m][k] · W_hh[n][k])
//   backward: C[m][n] = (C[m][n] + Σ_k A[m][k] · W_hh[k][n] (+ dh_n)) ⊙ act'(h_t[m][n])
#pragma once

#include "recurrence_common.cuh"

namespace fused_rnn::cuda {

constexpr int kTile = 64;
constexpr int kChunk = 16;
constexpr int kThreads = 256;
constexpr int kPer = 4;  // outputs per thread along each of m and n

template <typename T, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    step_recurrence_kernel(StepRows<T> st, const T* __restrict__ w, int64_t H, bool relu) {
  using A = acc_t<T>;
  __shared__ A a_tile[kChunk][kTile + 1];
  __shared__ A w_tile[kChunk][kTile + 1];
  const int tid = threadIdx.x;
  const int tx = tid % (kTile / kPer);  // n direction
  const int ty = tid / (kTile / kPer);  // m direction
  // Row tiles on x (up to 2^31 − 1 blocks: any batch), column tiles on y (H ≤ 65535 · 64).
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTile;

  A acc[kPer][kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) acc[i][j] = A(0);
  }

  for (int64_t k0 = 0; k0 < H; k0 += kChunk) {
    // A tile: kTile rows × kChunk columns, k fastest (coalesced along a row).
    for (int idx = tid; idx < kTile * kChunk; idx += kThreads) {
      const int mm = idx / kChunk, kk = idx % kChunk;
      const int64_t m = m0 + mm, k = k0 + kk;
      A v = A(0);
      if (m < st.rows && k < H) {
        const T* row = step_input_row(st, m);
        if (row != nullptr) v = static_cast<A>(row[k]);
      }
      a_tile[kk][mm] = v;
    }
    // W tile: the kChunk × kTile block of op(W), loaded along W's contiguous dimension.
    for (int idx = tid; idx < kTile * kChunk; idx += kThreads) {
      int nn, kk;
      if constexpr (kBackward) {
        nn = idx % kTile;  // W[k][n]: n contiguous
        kk = idx / kTile;
      } else {
        kk = idx % kChunk;  // W[n][k]: k contiguous
        nn = idx / kChunk;
      }
      const int64_t n = n0 + nn, k = k0 + kk;
      A v = A(0);
      if (n < H && k < H) v = static_cast<A>(kBackward ? w[k * H + n] : w[n * H + k]);
      w_tile[kk][nn] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kChunk; ++kk) {
      A a[kPer], b[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) a[i] = a_tile[kk][ty * kPer + i];
#pragma unroll
      for (int j = 0; j < kPer; ++j) b[j] = w_tile[kk][tx * kPer + j];
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
#pragma unroll
        for (int j = 0; j < kPer; ++j) acc[i][j] += a[i] * b[j];
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t m = m0 + ty * kPer + i;
    const bool gemm = step_has_gemm_term(st, m);  // else the tile multiplied zeros: drop the sum
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t n = n0 + tx * kPer + j;
      if (m < st.rows && n < H) {
        step_epilogue<T, kBackward>(st, m, n, H, gemm ? acc[i][j] : A(0), relu);
      }
    }
  }
}

// The per_step_cublas path's second launch: the step's epilogue over rows × H, with the GEMM term
// that cuBLAS left in ws (rows × H, accumulation type) for rows m < gemm_rows and none after.
// Columns on x, rows on y, both grid-strided (no 64-bit division per element).
template <typename T, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    step_epilogue_kernel(StepRows<T> st, const acc_t<T>* __restrict__ ws, int64_t gemm_rows,
                         int64_t H, bool relu) {
  const int64_t n_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // Not unrolled: each loop usually runs once per thread, and unrolled copies spill registers.
#pragma unroll 1
  for (int64_t m = blockIdx.y; m < st.rows; m += gridDim.y) {
    const acc_t<T>* ws_row = ws + m * H;
    const bool has_gemm = m < gemm_rows;
#pragma unroll 1
    for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < H;
         n += n_stride) {
      step_epilogue<T, kBackward>(st, m, n, H, has_gemm ? ws_row[n] : acc_t<T>(0), relu);
    }
  }
}

}  // namespace fused_rnn::cuda
