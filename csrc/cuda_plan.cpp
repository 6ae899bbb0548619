#include "cuda_plan.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <iterator>
#include <mutex>

namespace fused_rnn::cuda_plan {

std::optional<PersistentConfig> plan_persistent(int64_t hidden, int64_t directions,
                                                int64_t elem_bytes, const DeviceLimits& dev,
                                                const KernelRegs& regs, int64_t only_rows) {
  if (hidden <= 0 || directions <= 0 || dev.sm_count <= 0) return std::nullopt;
  for (const int64_t rows : kPersistentRowChoices) {
    if (only_rows != 0 && rows != only_rows) continue;
    // 32 double accumulators per thread spill registers (ptxas report): not built, not planned.
    if (rows == 32 && elem_bytes == 8) continue;
    PersistentConfig c;
    c.rows_per_block = rows;
    c.directions = directions;
    c.blocks_per_direction = (hidden + rows - 1) / rows;
    c.threads = kPersistentThreads;
    c.smem_bytes = rows * hidden * elem_bytes;
    const int64_t block_smem = c.smem_bytes + persistent_static_smem(rows, elem_bytes);
    if (block_smem > dev.smem_per_block_optin) continue;
    const int64_t by_smem = dev.smem_per_sm / (block_smem + kReservedSmemPerBlock);
    const int64_t by_threads = dev.max_threads_per_sm / c.threads;
    // Registers are allocated per warp in units of 256, i.e. 8 per thread: round up.
    const int64_t regs_per_thread = (regs.for_rows(rows) + 7) / 8 * 8;
    const int64_t by_regs =
        regs_per_thread > 0 ? dev.regs_per_sm / (regs_per_thread * c.threads) : by_threads;
    const int64_t per_sm = std::min({by_smem, by_threads, by_regs});
    if (per_sm >= 1 && c.blocks() <= per_sm * dev.sm_count) return c;
  }
  return std::nullopt;
}

namespace {
bool valid_path_name(const std::string& path) {
  return path == "auto" || path == "persistent" || path == "per_step" || path == "per_step_cublas";
}
constexpr const char* kPathNames = "'auto', 'persistent', 'per_step' or 'per_step_cublas'";
}  // namespace

const char* path_name(Path path) {
  switch (path) {
    case Path::kPersistent:
      return "persistent";
    case Path::kPerStep:
      return "per_step";
    case Path::kPerStepCublas:
      return "per_step_cublas";
  }
  return "?";
}

Path per_step_path(int64_t hidden, int64_t batch, int64_t elem_bytes) {
  if (elem_bytes == 2) return Path::kPerStepCublas;  // tensor cores
  // batch · hidden² without overflow: compare against the threshold stepwise.
  if (hidden > 0 && batch >= (kCublasStepMinMacs + hidden * hidden - 1) / (hidden * hidden)) {
    return Path::kPerStepCublas;
  }
  return Path::kPerStep;
}

Path choose_path(int64_t hidden, int64_t batch, int64_t directions, int64_t elem_bytes,
                 const DeviceLimits& dev, const KernelRegs& regs, const std::string& forced,
                 PersistentConfig* config, int64_t only_rows) {
  TORCH_CHECK(valid_path_name(forced), "fused_rnn: CUDA path must be ", kPathNames, ", got '",
              forced, "'");
  if (forced == "per_step") return Path::kPerStep;
  if (forced == "per_step_cublas") return Path::kPerStepCublas;
  const auto plan = plan_persistent(hidden, directions, elem_bytes, dev, regs, only_rows);
  if (forced == "persistent") {
    TORCH_CHECK(plan.has_value(), "fused_rnn: the persistent path was forced, but W_hh (hidden ",
                hidden, ", ", directions, " direction(s), ", elem_bytes,
                "-byte elements) does not fit on-chip across ", dev.sm_count, " SMs",
                only_rows != 0 ? " with the rows per block forced to " : "",
                only_rows != 0 ? std::to_string(only_rows) : std::string());
    *config = *plan;
    return Path::kPersistent;
  }
  // batch · hidden without overflow: hidden > 0 here whenever a plan exists.
  if (plan.has_value() && batch <= kPersistentMaxBatch &&
      batch <= kPersistentMaxStepElements / hidden) {
    *config = *plan;
    return Path::kPersistent;
  }
  return per_step_path(hidden, batch, elem_bytes);
}

namespace {
// Forward, backward: rows per block · 16 + the Path + 1, in one word so that a reader never pairs
// one run's path with another's rows; 0 = none yet.
std::atomic<int64_t> last_runs[2] = {0, 0};
}  // namespace

void record_path(bool backward, Path path, int64_t rows_per_block) {
  const int64_t rows = path == Path::kPersistent ? rows_per_block : 0;
  last_runs[backward ? 1 : 0].store(rows * 16 + static_cast<int64_t>(path) + 1,
                                    std::memory_order_relaxed);
}

int64_t last_rows_per_block(bool backward) {
  return last_runs[backward ? 1 : 0].load(std::memory_order_relaxed) / 16;
}

std::string last_path(bool backward) {
  const int64_t v = last_runs[backward ? 1 : 0].load(std::memory_order_relaxed);
  return v == 0 ? std::string() : std::string(path_name(static_cast<Path>(v % 16 - 1)));
}

namespace {
std::mutex& path_mutex() {
  static std::mutex m;
  return m;
}
std::string& path_value() {
  static std::string v = "auto";
  return v;
}
}  // namespace

void set_forced_path(const std::string& path) {
  TORCH_CHECK(valid_path_name(path), "fused_rnn: CUDA path must be ", kPathNames, ", got '", path,
              "'");
  std::lock_guard<std::mutex> lock(path_mutex());
  path_value() = path;
}

std::string forced_path() {
  std::lock_guard<std::mutex> lock(path_mutex());
  return path_value();
}

namespace {
std::atomic<int64_t> rows_value{0};
}  // namespace

void set_forced_rows(int64_t rows) {
  const bool built = std::find(std::begin(kPersistentRowChoices), std::end(kPersistentRowChoices),
                               rows) != std::end(kPersistentRowChoices);
  TORCH_CHECK(rows == 0 || built,
              "fused_rnn: persistent rows per block must be 0 (the planner's choice), 8, 16 or 32, "
              "got ", rows);
  rows_value.store(rows, std::memory_order_relaxed);
}

int64_t forced_rows() { return rows_value.load(std::memory_order_relaxed); }

}  // namespace fused_rnn::cuda_plan
