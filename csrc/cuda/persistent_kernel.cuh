// The persistent path: one cooperative launch runs every step of every direction of a layer.
//
// Block b of direction d owns R = ROWS output columns [j0, j0 + R) and keeps the matching R rows of
// W_hh (forward: W_hh[j][:], so that h_t[j] = act(P_t[j] + h_{t-1} · W_hh[j][:]); BPTT: W_hh[:][j],
// the rows of W_hhᵀ) in shared memory for the whole sequence. Per step each warp takes batch rows
// m = warp, warp + 8, ...: its lanes stride over k, every lane accumulating all R dot products, then a
// butterfly reduction; lane r finishes column j0 + r with the epilogue. A grid-wide barrier separates
// steps: step t reads rows that other blocks wrote at the step before, so those loads bypass L1.
#pragma once

#include <cooperative_groups.h>

#include "recurrence_common.cuh"

namespace fused_rnn::cuda {

template <typename T>
struct PersistentArgs {
  int64_t H = 0;
  int64_t ld = 0;  // row stride of buf and out: D·H
  int64_t blocks_per_direction = 0;
  StepTable tab;                 // packed: its tables on the device; padded: none
  T* buf = nullptr;              // forward: the output (holding P); backward: dA (holding dH)
  const T* out = nullptr;        // backward: h_t
  const T* w[2] = {nullptr, nullptr};
  const T* h0[2] = {nullptr, nullptr};  // forward
  T* hn[2] = {nullptr, nullptr};        // forward
  const T* dhn[2] = {nullptr, nullptr};  // backward
  bool relu = false;
};

// The kernel's arguments for a layer's directions dirs[0 .. D), whose columns are H apart in buffers
// of row stride D·H (dirs[d].buf = dirs[0].buf + d·H, and so for out).
template <typename T>
PersistentArgs<T> persistent_args(int64_t H, int64_t D, int64_t blocks_per_direction,
                                  const StepTable& tab, const DirectionPtrs<T>* dirs, bool relu) {
  PersistentArgs<T> a;
  a.H = H;
  a.ld = D * H;
  a.blocks_per_direction = blocks_per_direction;
  a.tab = tab;
  a.buf = dirs[0].buf;
  a.out = dirs[0].out;
  a.relu = relu;
  for (int64_t d = 0; d < D; ++d) {
    a.w[d] = dirs[d].w;
    a.h0[d] = dirs[d].h0;
    a.hn[d] = dirs[d].hn;
    a.dhn[d] = dirs[d].dhn;
  }
  return a;
}

// A load that reads L2 (where other SMs' stores of the previous step are), not a stale L1 line.
__device__ inline float load_cg(const float* p) { return __ldcg(p); }
__device__ inline double load_cg(const double* p) { return __ldcg(p); }
__device__ inline float load_cg(const c10::Half* p) {
  return static_cast<float>(
      c10::Half(__ldcg(reinterpret_cast<const unsigned short*>(p)), c10::Half::from_bits()));
}
__device__ inline float load_cg(const c10::BFloat16* p) {
  return static_cast<float>(c10::BFloat16(__ldcg(reinterpret_cast<const unsigned short*>(p)),
                                          c10::BFloat16::from_bits()));
}

template <typename T, int ROWS, bool kBackward>
__global__ void __launch_bounds__(256) persistent_recurrence_kernel(PersistentArgs<T> p) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* ws = reinterpret_cast<T*>(smem_raw);  // [ROWS][H]
  const int64_t H = p.H;
  const int d = static_cast<int>(blockIdx.x / p.blocks_per_direction);
  const int64_t j0 = (blockIdx.x % p.blocks_per_direction) * ROWS;
  const int64_t nrows = H - j0 < ROWS ? H - j0 : ROWS;
  const T* w = p.w[d];
  for (int64_t idx = threadIdx.x; idx < ROWS * H; idx += blockDim.x) {
    const int64_t r = idx / H, k = idx % H;
    T v = T(0);
    if (r < nrows) v = kBackward ? w[k * H + j0 + r] : w[(j0 + r) * H + k];
    ws[idx] = v;
  }
  __syncthreads();

  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  T* buf = p.buf + d * H;
  for (int64_t s = 0; s < p.tab.steps; ++s) {
    const StepRows<T> st =
        kBackward ? backward_step<T>(s, d == 1, p.tab, buf, p.ld, p.out + d * H, p.dhn[d])
                  : forward_step<T>(s, d == 1, p.tab, buf, p.ld, p.h0[d], p.hn[d], H);
    for (int64_t m = warp; m < st.rows; m += warps) {
      const T* row = step_input_row(st, m);
      A acc[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) acc[r] = A(0);
      if (row != nullptr) {
        for (int64_t k = lane; k < H; k += 32) {
          const A a = static_cast<A>(load_cg(row + k));
#pragma unroll
          for (int r = 0; r < ROWS; ++r) acc[r] += a * static_cast<A>(ws[r * H + k]);
        }
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) {
          acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], offset);
        }
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (lane == r && r < nrows) step_epilogue<T, kBackward>(st, m, j0 + r, H, acc[r], p.relu);
      }
    }
    grid.sync();
  }
}

}  // namespace fused_rnn::cuda
