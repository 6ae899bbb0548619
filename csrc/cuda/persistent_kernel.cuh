// The persistent path: one cooperative launch runs every step of every direction of a layer.
//
// Block b of direction d owns R = ROWS output columns [j0, j0 + R) and keeps the matching R rows of
// W_hh (forward: W_hh[j][:], so that h_t[j] = act(P_t[j] + h_{t-1} · W_hh[j][:]); BPTT: W_hh[:][j],
// the rows of W_hhᵀ) in shared memory for the whole sequence. A grid-wide barrier separates steps:
// step t reads rows that other blocks wrote at the step before, so those loads bypass L1.
//
// Per step, a block's 8 warps share the step's batch rows one of three ways:
//   more than 8 rows (R ≤ 16): each warp takes rows m and m + 8 together, so that every W value
//       loaded from shared memory serves two multiply-adds (one row at a time, the loop issues a
//       shared load per multiply-add);
//   5 to 8 rows (and R = 32 above 4): one row per warp at a time;
//   1 to 4 rows: each row's k range split across 2–8 warps (persistent_k_split), their partial sums
//       combined through shared memory, so that no warp idles while one walks all of h_{t−1} (at
//       small batches a step's time is the latency of those dependent loads).
// A warp's lanes stride over k, each accumulating all R dot products; a reduce-scatter across the
// lanes (warp_reduce_scatter) leaves each column's total with a group of lanes, and one lane per
// column finishes it with the epilogue.
#pragma once

#include <cooperative_groups.h>

#include "../cuda_plan.h"
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

// Warps that share each row of a step of `rows` rows: as many as still give every row its own group
// (8 warps: 1 row → 8, 2 → 4, 3 or 4 → 2, 5 or more → 1). Then a step with split > 1 has at most
// one row per group.
C10_HOST_DEVICE inline int persistent_k_split(int64_t rows, int warps) {
  int split = 1;
  while (split * 2 <= warps && rows * split * 2 <= warps) split *= 2;
  return split;
}

// One level of warp_reduce_scatter, then the next: exchange partner lane ^ OFFSET; HALF values sent
// (0: a plain butterfly level on acc[0]). Compile-time levels, so that acc stays in registers.
template <int OFFSET, int HALF, int ROWS, typename A>
__device__ inline void reduce_scatter_level(A (&acc)[ROWS], int lane) {
  if constexpr (HALF >= 1) {
    const bool upper = (lane & OFFSET) != 0;  // keeps values [HALF, 2·HALF), sends [0, HALF)
#pragma unroll
    for (int i = 0; i < HALF; ++i) {
      const A send = upper ? acc[i] : acc[i + HALF];
      const A keep = upper ? acc[i + HALF] : acc[i];
      acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFFSET);
    }
  } else {
    acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], OFFSET);
  }
  if constexpr (OFFSET > 1) reduce_scatter_level<OFFSET / 2, HALF / 2, ROWS>(acc, lane);
}

// Sums each of the R values in acc over the warp's 32 lanes. The first log2(R) levels halve: a lane
// keeps half of its values, sends its partner the other half and adds what it receives; plain
// butterfly levels finish. Then acc[0] of lane l holds the total of value l / (32 / R) (as do all
// 32 / R lanes of its group): R − 1 + 5 − log2(R) shuffles instead of 5R, in the same 5 levels.
template <int ROWS, typename A>
__device__ inline void warp_reduce_scatter(A (&acc)[ROWS], int lane) {
  static_assert(ROWS >= 1 && ROWS <= 32 && (ROWS & (ROWS - 1)) == 0, "R: a power of 2 up to 32");
  reduce_scatter_level<16, ROWS / 2, ROWS>(acc, lane);
}

template <typename T, int ROWS, bool kBackward>
__global__ void __launch_bounds__(cuda_plan::kPersistentThreads, 2)
    persistent_recurrence_kernel(PersistentArgs<T> p) {
  using A = acc_t<T>;
  constexpr int warps = static_cast<int>(cuda_plan::kPersistentWarps);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* ws = reinterpret_cast<T*>(smem_raw);  // [ROWS][H]
  __shared__ A partial[warps][ROWS];        // steps with split > 1: each warp's R partial sums
  static_assert(sizeof(partial) == cuda_plan::persistent_static_smem(ROWS, sizeof(T)),
                "the planner's count of the kernel's static shared memory");
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
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  // After warp_reduce_scatter: this lane holds column j0 + r_mine; one lane per column writes it.
  constexpr int kLanesPerColumn = 32 / ROWS;
  const int r_mine = lane / kLanesPerColumn;
  const bool column_leader = lane % kLanesPerColumn == 0;
  // Two rows per warp at a time where the step has more rows than warps; not at R = 32, whose 64
  // accumulators would not fit in registers.
  constexpr bool kPairs = ROWS <= 16;
  T* buf = p.buf + d * H;
  for (int64_t s = 0; s < p.tab.steps; ++s) {
    const StepRows<T> st =
        kBackward ? backward_step<T>(s, d == 1, p.tab, buf, p.ld, p.out + d * H, p.dhn[d])
                  : forward_step<T>(s, d == 1, p.tab, buf, p.ld, p.h0[d], p.hn[d], H);
    if (kPairs && st.rows > warps) {
      // More rows than warps: each warp takes rows m0 and m0 + 8 together, so that every value of
      // W read from shared memory serves two multiply-adds (one row at a time, the loop is bound by
      // those loads). No barrier in this branch.
      for (int64_t m0 = warp; m0 < st.rows; m0 += 2 * warps) {
        const int64_t m1 = m0 + warps;
        const T* row0 = step_input_row(st, m0);
        const T* row1 = m1 < st.rows ? step_input_row(st, m1) : nullptr;
        A acc0[ROWS], acc1[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc0[r] = acc1[r] = A(0);
        // Rows without a GEMM term come last in a step (m ≥ cont, and no a2): where row0 has
        // none, neither has row1, and both stay 0.
        if (row0 != nullptr) {
          // Unrolled so that several iterations' loads of h are in flight together (not for
          // double: even 2 copies spill the R = 16 kernel's registers).
#pragma unroll(sizeof(A) == 8 ? 1 : 4)
          for (int64_t k = lane; k < H; k += 32) {
            const A a0 = static_cast<A>(load_cg(row0 + k));
            const A a1 = row1 != nullptr ? static_cast<A>(load_cg(row1 + k)) : A(0);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
              const A wv = static_cast<A>(ws[r * H + k]);
              acc0[r] += a0 * wv;
              acc1[r] += a1 * wv;
            }
          }
        }
        // A row without a GEMM term gets exactly 0, as on the one-row path (step_has_gemm_term).
        // Uniform across the warp, as is every condition before a reduce.
        if (row1 == nullptr) {
#pragma unroll
          for (int r = 0; r < ROWS; ++r) acc1[r] = A(0);
        }
        warp_reduce_scatter(acc0, lane);
        if (m1 < st.rows) warp_reduce_scatter(acc1, lane);
        if (column_leader && r_mine < nrows) {
          step_epilogue<T, kBackward>(st, m0, j0 + r_mine, H, acc0[0], p.relu);
          if (m1 < st.rows) step_epilogue<T, kBackward>(st, m1, j0 + r_mine, H, acc1[0], p.relu);
        }
      }
      grid.sync();
      continue;
    }
    const int split = persistent_k_split(st.rows, warps);
    const int groups = warps / split, group = warp / split, part = warp % split;
    // Every warp makes the same number of passes, so that each reaches the barriers below.
    const int64_t passes = (st.rows + groups - 1) / groups;
    for (int64_t pass = 0; pass < passes; ++pass) {
      const int64_t m = pass * groups + group;
      const bool active = m < st.rows;
      if (!active && split == 1) continue;  // no barrier in this pass
      const T* row = active ? step_input_row(st, m) : nullptr;
      A acc[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) acc[r] = A(0);
      if (row != nullptr) {
        // kLoads loads of h issued before their multiply-adds: the stride is known only at run
        // time, so an unrolled loop would still wait on each load in turn (4 spill the double
        // R = 16 kernel's registers; 2 do not).
        constexpr int kLoads = sizeof(A) == 8 ? 2 : 4;
        const int64_t stride = 32 * split;
        for (int64_t k0 = part * 32 + lane; k0 < H; k0 += kLoads * stride) {
          A a[kLoads];
#pragma unroll
          for (int u = 0; u < kLoads; ++u) {
            const int64_t k = k0 + u * stride;
            a[u] = k < H ? static_cast<A>(load_cg(row + k)) : A(0);
          }
#pragma unroll
          for (int u = 0; u < kLoads; ++u) {
            const int64_t k = k0 + u * stride;
            if (k >= H) break;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) acc[r] += a[u] * static_cast<A>(ws[r * H + k]);
          }
        }
      }
      warp_reduce_scatter(acc, lane);
      if (split > 1) {
        // The group's first warp adds the others' partial sums (in a fixed order: deterministic).
        if (column_leader) partial[warp][r_mine] = acc[0];
        __syncthreads();
        if (part == 0 && column_leader) {
          for (int q = 1; q < split; ++q) acc[0] += partial[warp + q][r_mine];
        }
        // Never taken while a split step has one pass per group (persistent_k_split); keeps partial
        // safe for any split. grid.sync, a block barrier too, ends each step.
        if (pass + 1 < passes) __syncthreads();
      }
      if (active && part == 0 && column_leader && r_mine < nrows) {
        step_epilogue<T, kBackward>(st, m, j0 + r_mine, H, acc[0], p.relu);
      }
    }
    grid.sync();
  }
}

}  // namespace fused_rnn::cuda
