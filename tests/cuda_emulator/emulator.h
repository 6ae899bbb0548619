// A host emulator of the CUDA features our kernels use, so that the kernel sources themselves
// (csrc/cuda/*.cuh) run on the CPU, in the CPU test suite, long before a GPU runs them.
//
// Each CUDA thread is a fiber with its own stack (a guard page below it). A block's fibers run on
// one OS thread, switching only where CUDA threads wait for each other: __syncthreads (the block),
// __shfl_xor_sync (the warp: 32 lanes exchange values) and grid.sync() (every block of a cooperative
// launch: each block runs on its own OS thread, and the blocks meet at an OS barrier); other
// launches run their blocks one after another. __shared__ storage is thread_local; `block_start`
// (see launch) runs before each block, and the harness uses it to fill the kernels' thread-local
// storage (static and dynamic shared memory) with NaN bytes, as a GPU leaves shared memory
// undefined. What it checks: results; barrier discipline (a barrier or shuffle that some threads of
// the block or warp never reach, or reach from another call site, is reported, not hung); shuffles
// with all 32 lanes present. What it cannot check: timing, memory ordering between SMs (__ldcg),
// races that only a real schedule shows (compute-sanitizer does those on a GPU), co-residency of a
// cooperative grid (the planner's tests do), a kernel that loops forever.
//
// Include this before any kernel header; build with the shim folder (cooperative_groups.h) first on
// the include path.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
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

// `where`: the call site; every thread meeting at one barrier or shuffle must come from the same.
void syncthreads(const std::source_location& where);
void grid_sync(const std::source_location& where);
// Lane `lane ^ offset`'s `bits` (every lane of the warp takes part; mask must be all 32 lanes).
uint64_t shfl_xor_bits(unsigned mask, uint64_t bits, int offset, const std::source_location& where);

// Dynamic shared memory (extern __shared__) of the current block, at most this many bytes.
constexpr size_t kMaxDynamicSmem = 232448;  // an H100's opt-in limit per block

// Runs `kernel` on a grid × block launch and returns when every thread has finished. Cooperative
// launches run all blocks at once (grid.sync() allowed); others run blocks one after another.
// `block_start` runs on each block's OS thread before its threads start (to poison its shared
// memory); it may overwrite all of this module's thread-local storage. Throws std::runtime_error on
// a barrier a thread never reaches, a shuffle with missing lanes, an exception inside the kernel,
// a block larger than 1024 threads, a grid beyond CUDA's limits or more dynamic shared memory than
// kMaxDynamicSmem.
void launch(Dim grid, Dim block, size_t dynamic_smem, bool cooperative,
            const std::function<void()>& kernel, const std::function<void()>& block_start);

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())

inline void __syncthreads(std::source_location where = std::source_location::current()) {
  cuda_emu::syncthreads(where);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int offset,
                  std::source_location where = std::source_location::current()) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = cuda_emu::shfl_xor_bits(mask, bits, offset, where);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

template <typename T>
T __ldcg(const T* p) {
  return *p;
}
