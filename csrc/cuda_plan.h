// How the CUDA recurrence is run: which path, and the persistent kernel's geometry. Plain C++ (no
// CUDA), compiled in every build, so that CPU tests exercise it with made-up device properties.
//
// Paths:
//   persistent  one cooperative launch for all T steps; block b of direction d keeps rows
//               [b·R, (b+1)·R) of W_hh (forward) or of W_hhᵀ (BPTT) in shared memory for the whole
//               sequence; a grid-wide barrier separates steps. Needs every block co-resident.
//   per_step    one launch per step and direction: a tiled GEMM of h_{t-1} (or dA_{t±1}) with W_hh
//               whose epilogue adds P_t (or dH_t) and applies the activation (or act').
//   per_step_cublas
//               two launches per step and direction: cuBLAS computes the step's GEMM term in the
//               accumulation type (tensor cores for half types, TF32 as torch's matmul flag says),
//               then the same epilogue as a pointwise kernel. For GEMMs big enough that cuBLAS's
//               tiles beat ours, and for half types.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace fused_rnn::cuda_plan {

struct DeviceLimits {
  int64_t sm_count;
  int64_t smem_per_sm;            // bytes (cudaDevAttrMaxSharedMemoryPerMultiprocessor)
  int64_t smem_per_block_optin;   // bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin)
  int64_t max_threads_per_sm;
  int64_t regs_per_sm;
};

struct PersistentConfig {
  int64_t rows_per_block = 0;       // R: rows of W_hh a block owns (8, 16 or 32)
  int64_t blocks_per_direction = 0;
  int64_t threads = 0;
  int64_t smem_bytes = 0;           // dynamic shared memory per block: R · H · sizeof(scalar)
                                    // (the kernel adds persistent_static_smem of its own)
  int64_t blocks() const { return blocks_per_direction * directions; }
  int64_t directions = 1;
};

enum class Path { kPersistent, kPerStep, kPerStepCublas };

const char* path_name(Path path);

constexpr int64_t kPersistentThreads = 256;
constexpr int64_t kPersistentWarps = kPersistentThreads / 32;
// The persistent kernel's static shared memory: each warp's R partial sums in the accumulation type
// (double for 8-byte elements, else float), for steps whose rows are split across warps.
constexpr int64_t persistent_static_smem(int64_t rows, int64_t elem_bytes) {
  return kPersistentWarps * rows * (elem_bytes == 8 ? 8 : 4);
}
constexpr int64_t kPersistentRowChoices[] = {8, 16, 32};
// Shared memory the runtime reserves per resident block (1 KiB on sm_80 and sm_90).
constexpr int64_t kReservedSmemPerBlock = 1024;
// Above this batch, or above kPersistentMaxStepElements elements (batch · hidden) per step and
// direction, the per-step path's GEMMs use the chip better than the persistent kernel's
// one-warp-per-row dot products, whose time grows with the batch. Measured on an H200 (torch 2.11,
// T 256, one direction, B 1-256 × H 128-2048, bench/results/gpu-2026-11-30/paths.md): with both
// limits auto's choice is the fastest path, or within 10% of it, in all 120 cases (30 shapes ×
// float32, bfloat16 × forward, forward+backward) but one (bfloat16 B 128 H 512 forward, 14% off);
// with the batch limit alone it was 1.1-3.0x slower than the fastest in 13 of them (3.0x:
// bfloat16 B 128 H 2048 forward).
constexpr int64_t kPersistentMaxBatch = 128;
constexpr int64_t kPersistentMaxStepElements = int64_t{1} << 16;

// Registers per thread of the persistent kernel for R = 8, 16, 32 (cudaFuncGetAttributes; 0 =
// unknown, then only shared memory and threads limit the blocks per SM).
struct KernelRegs {
  int64_t rows8 = 0, rows16 = 0, rows32 = 0;
  int64_t for_rows(int64_t rows) const { return rows == 8 ? rows8 : rows == 16 ? rows16 : rows32; }
};

// The per-step path hands the step's GEMM to cuBLAS at and above this many multiply-adds
// (batch · hidden²) and always for 2-byte types; below it the fused tile kernel's single launch wins.
// A starting point; tune with the benchmark on a GPU.
constexpr int64_t kCublasStepMinMacs = int64_t{1} << 22;

// Per-step kernel geometry: 64 × 64 output tiles, 256 threads.
constexpr int64_t kStepTile = 64;
constexpr int64_t kStepThreads = 256;

// The persistent configuration with the most blocks that fits (shared memory per block and per SM,
// threads and registers per SM, co-residency of the whole grid), or none. `only_rows` (8, 16 or 32;
// 0 = any) restricts the rows per block, for tests of each kernel variant.
std::optional<PersistentConfig> plan_persistent(int64_t hidden, int64_t directions,
                                                int64_t elem_bytes, const DeviceLimits& dev,
                                                const KernelRegs& regs, int64_t only_rows = 0);

// Which per-step variant runs a layer: cuBLAS + epilogue, or the fused tile kernel.
Path per_step_path(int64_t hidden, int64_t batch, int64_t elem_bytes);

// The path for a layer: persistent when it fits and the batch is small enough, else per-step.
// `forced` is "auto", "persistent", "per_step" or "per_step_cublas"; forcing persistent where it
// cannot run throws. `only_rows` as for plan_persistent.
Path choose_path(int64_t hidden, int64_t batch, int64_t directions, int64_t elem_bytes,
                 const DeviceLimits& dev, const KernelRegs& regs, const std::string& forced,
                 PersistentConfig* config, int64_t only_rows = 0);

// Blocks of the per-step kernel for `rows` × `hidden` outputs: row tiles on x (limit 2^31 − 1),
// column tiles on y (limit 65535, so H ≤ 4,194,240).
constexpr int64_t kMaxGridY = 65535;
inline int64_t step_grid_x(int64_t rows) { return (rows + kStepTile - 1) / kStepTile; }
inline int64_t step_grid_y(int64_t hidden) { return (hidden + kStepTile - 1) / kStepTile; }

// Grid of the per_step_cublas epilogue kernel for rows × hidden outputs: column blocks on x, rows
// on y, each capped (the kernel grid-strides over the rest).
constexpr int64_t kEpilogueMaxBlocksX = 1024;
inline int64_t epilogue_grid_x(int64_t hidden) {
  const int64_t blocks = (hidden + kStepThreads - 1) / kStepThreads;
  return blocks < kEpilogueMaxBlocksX ? blocks : kEpilogueMaxBlocksX;
}
inline int64_t epilogue_grid_y(int64_t rows) { return rows < kMaxGridY ? rows : kMaxGridY; }

// The path the latest CUDA recurrence of each kind (forward, backward) ran on, after any fallback,
// and the persistent kernel's rows per block (0 on the per-step paths): the CUDA host code records
// them, benchmarks and tests read them. Empty / 0 until one has run.
void record_path(bool backward, Path path, int64_t rows_per_block);
std::string last_path(bool backward);
int64_t last_rows_per_block(bool backward);

// The process-wide path override ("auto", "persistent", "per_step", "per_step_cublas"), for tests
// and benchmarks.
void set_forced_path(const std::string& path);
std::string forced_path();
// The process-wide restriction of the persistent kernel's rows per block (0 = the planner's
// choice; 8, 16 or 32), for tests that run each kernel variant at small sizes.
void set_forced_rows(int64_t rows);
int64_t forced_rows();

}  // namespace fused_rnn::cuda_plan
