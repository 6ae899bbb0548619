// A host emulator of the CUDA features our kernels use, so that the kernel sources themselves
// (csrc/cuda/*.cuh) run on the CPU, in the CPU test suite, long before a GPU runs them.
//
// Each CUDA thread is a fiber with its own stack. A block's fibers run on one OS thread, switching
// only where CUDA threads wait for each other: __syncthreads (the block), __shfl_xor_sync (the
// warp: 32 lanes exchange values) and grid.sync() (every block of a cooperative launch: each block
// runs on its own OS thread, and the blocks meet at an OS barrier). __shared__ storage is
// thread_local, so each block sees its own. What it checks: results, barrier discipline (a block
// waiting on a barrier that some of its threads never reach is reported, not hung) and shuffles
// with all 32 lanes present. What it cannot check: timing, memory ordering between SMs (__ldcg),
// races that only a real schedule shows (compute-sanitizer does those on a GPU).
//
// Include this before any kernel header; build with the shim folder (cooperative_groups.h) first on
// the include path.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ thread_local
#define __align__(n) __attribute__((aligned(n)))

namespace cuda_emu {

struct Dim {
  unsigned x = 1, y = 1, z = 1;
};

const Dim& thread_idx();
const Dim& block_idx();
const Dim& block_dim();
const Dim& grid_dim();

void syncthreads();
void grid_sync();
// Lane `lane ^ offset`'s `bits` (every lane of the warp takes part; mask must be all 32 lanes).
uint64_t shfl_xor_bits(unsigned mask, uint64_t bits, int offset);

// Dynamic shared memory (extern __shared__) of the current block, at most this many bytes.
constexpr size_t kMaxDynamicSmem = 232448;  // an H100's opt-in limit per block

// Runs `kernel` on a grid × block launch and returns when every thread has finished. Cooperative
// launches run all blocks at once (grid.sync() allowed); others run blocks one after another.
// `block_start` runs on each block's OS thread before its threads start (to poison its shared
// memory, say). Throws std::runtime_error on a barrier a thread never reaches, a shuffle with
// missing lanes, an exception inside the kernel, or a launch no GPU would accept.
void launch(Dim grid, Dim block, size_t dynamic_smem, bool cooperative,
            const std::function<void()>& kernel, const std::function<void()>& block_start);

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())

inline void __syncthreads() { cuda_emu::syncthreads(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int offset) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = cuda_emu::shfl_xor_bits(mask, bits, offset);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

template <typename T>
T __ldcg(const T* p) {
  return *p;
}
