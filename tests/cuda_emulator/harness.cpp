// Runs our CUDA recurrence kernels (csrc/cuda/*.cuh, unchanged) on the host emulator, launched as
// csrc/cuda/rnn_cuda.cu launches them: the same step descriptors (layer_step), the same GEMM split
// of the cuBLAS path (step_gemms; a host GEMM stands in for cuBLAS) and the same grid geometry
// (cuda_plan.h). A C interface for ctypes (tests/test_cuda_emulated.py).
#include "emulator.h"  // first: the CUDA builtins the kernel headers use

#include <link.h>

namespace fused_rnn::cuda {
// The persistent kernel's `extern __shared__` buffer: one per OS thread, i.e. per emulated block.
// (The kernel's block-scope `extern thread_local` declaration would call a TLS init hook, which a
// plain array does not have: build with -fno-extern-tls-init.)
thread_local __align__(16) unsigned char smem_raw[cuda_emu::kMaxDynamicSmem];
}  // namespace fused_rnn::cuda

#include <algorithm>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/persistent_kernel.cuh"
#include "cuda/step_kernel.cuh"
#include "cuda_plan.h"

namespace {

using namespace fused_rnn::cuda;
namespace plan = fused_rnn::cuda_plan;

enum PathCode { kPersistent = 0, kPerStep = 1, kPerStepCublas = 2 };

// Fills this module's thread-local storage on the calling thread with 0xff bytes (NaN in every
// floating type): the kernels' static and dynamic shared memory (and the emulator's own
// thread-locals, which launch() sets after this). A block then sees undefined shared memory as
// NaN, as a GPU may leave it, not as the zeros (or the previous block's values) a plain
// thread_local would hold.
void poison_shared_memory() {
  smem_raw[0] = 0;  // this thread's instance exists from here on
  struct Query {
    uintptr_t inside;
    unsigned char* data = nullptr;
    size_t size = 0;
  };
  static const char anchor = 0;
  Query q{reinterpret_cast<uintptr_t>(&anchor)};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* arg) -> int {
        auto* q = static_cast<Query*>(arg);
        bool ours = false;
        size_t tls_size = 0;
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const ElfW(Phdr)& ph = info->dlpi_phdr[i];
          const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
          if (ph.p_type == PT_LOAD && q->inside >= lo && q->inside < lo + ph.p_memsz) ours = true;
          if (ph.p_type == PT_TLS) tls_size = ph.p_memsz;
        }
        if (!ours) return 0;
        q->data = static_cast<unsigned char*>(info->dlpi_tls_data);
        q->size = tls_size;
        return 1;
      },
      &q);
  if (q.data == nullptr || q.size < sizeof(smem_raw)) {
    throw std::runtime_error("cuda_emu harness: cannot find this module's thread-local storage");
  }
  std::memset(q.data, 0xff, q.size);
}

struct Problem {
  int path;
  int rows_per_block;
  int64_t steps, batch;
  const int64_t* bs;   // null: padded
  const int64_t* off;
  int64_t H, D;
  void* buf;
  const void* out;
  void* const* w;
  void* const* h0;
  void* const* hn;
  void* const* dhn;
  bool relu;
};

// What cuBLAS computes in rnn_cuda.cu's blas_step_gemm: ws (rows × H) = A · op(W), in acc_t<T>.
template <typename T, bool kBackward>
void host_step_gemm(const T* w, const T* a, int64_t lda, int64_t rows, int64_t H, acc_t<T>* ws) {
  using A = acc_t<T>;
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t n = 0; n < H; ++n) {
      A sum(0);
      for (int64_t k = 0; k < H; ++k) {
        sum += static_cast<A>(a[m * lda + k]) * static_cast<A>(kBackward ? w[k * H + n] : w[n * H + k]);
      }
      ws[m * H + n] = sum;
    }
  }
}

template <typename T, int ROWS, bool kBackward>
void persistent_variant(const PersistentArgs<T>& a) {
  persistent_recurrence_kernel<T, ROWS, kBackward>(a);
}

template <typename T, bool kBackward>
void run(const Problem& p) {
  const int64_t H = p.H, D = p.D, ld = D * H;
  StepTable tab;
  tab.bs = p.bs;
  tab.off = p.off;
  tab.batch = p.batch;
  tab.steps = p.steps;
  DirectionPtrs<T> dirs[2];
  for (int64_t d = 0; d < D; ++d) {
    dirs[d].buf = static_cast<T*>(p.buf) + d * H;
    dirs[d].w = static_cast<const T*>(p.w[d]);
    if constexpr (kBackward) {
      dirs[d].out = static_cast<const T*>(p.out) + d * H;
      dirs[d].dhn = static_cast<const T*>(p.dhn[d]);
    } else {
      dirs[d].h0 = static_cast<const T*>(p.h0[d]);
      dirs[d].hn = static_cast<T*>(p.hn[d]);
    }
  }
  const std::function<void()> poison = poison_shared_memory;
  const cuda_emu::Dim threads{static_cast<unsigned>(kThreads), 1, 1};

  if (p.path == kPersistent) {
    const int64_t rows = p.rows_per_block;
    const PersistentArgs<T> a = persistent_args(H, D, (H + rows - 1) / rows, tab, dirs, p.relu);
    const size_t smem = static_cast<size_t>(rows * H) * sizeof(T);
    std::function<void()> kernel;
    if (rows == 8) kernel = [&a] { persistent_variant<T, 8, kBackward>(a); };
    if (rows == 16) kernel = [&a] { persistent_variant<T, 16, kBackward>(a); };
    if constexpr (!std::is_same_v<T, double>) {
      if (rows == 32) kernel = [&a] { persistent_variant<T, 32, kBackward>(a); };
    }
    if (!kernel) throw std::runtime_error("no persistent kernel for " + std::to_string(rows) + " rows");
    cuda_emu::launch({static_cast<unsigned>(a.blocks_per_direction * D), 1, 1},
                     {static_cast<unsigned>(plan::kPersistentThreads), 1, 1}, smem,
                     /*cooperative=*/true, kernel, poison);
    return;
  }

  std::vector<acc_t<T>> ws(static_cast<size_t>(p.batch * H));
  for (int64_t step = 0; step < p.steps; ++step) {
    for (int64_t d = 0; d < D; ++d) {
      const StepRows<T> st = layer_step<T, kBackward>(step, d == 1, tab, dirs[d], ld, H);
      if (st.rows == 0 || H == 0) continue;
      const T* w = dirs[d].w;
      if (p.path == kPerStep) {
        cuda_emu::launch({static_cast<unsigned>(plan::step_grid_x(st.rows)),
                          static_cast<unsigned>(plan::step_grid_y(H)), 1},
                         threads, 0, false,
                         [&] { step_recurrence_kernel<T, kBackward>(st, w, H, p.relu); }, poison);
      } else {
        // Rows the GEMMs do not reach hold NaN: the epilogue must not read them.
        std::fill(ws.begin(), ws.end(), std::numeric_limits<acc_t<T>>::quiet_NaN());
        const int64_t gemm_rows =
            step_gemms(st, H, ws.data(), [&](const T* a, int64_t lda, int64_t rows, acc_t<T>* out) {
              host_step_gemm<T, kBackward>(w, a, lda, rows, H, out);
            });
        const acc_t<T>* ws_ptr = ws.data();
        cuda_emu::launch({static_cast<unsigned>(plan::epilogue_grid_x(H)),
                          static_cast<unsigned>(plan::epilogue_grid_y(st.rows)), 1},
                         threads, 0, false,
                         [&] { step_epilogue_kernel<T, kBackward>(st, ws_ptr, gemm_rows, H, p.relu); },
                         poison);
      }
    }
  }
}

template <typename T>
void run_direction(const Problem& p, bool backward) {
  if (backward) {
    run<T, true>(p);
  } else {
    run<T, false>(p);
  }
}

int report(char* err, int64_t errlen, const std::string& message) {
  if (errlen > 0) {
    std::strncpy(err, message.c_str(), static_cast<size_t>(errlen - 1));
    err[errlen - 1] = '\0';
  }
  return 1;
}

// Small kernels that check the emulator itself.
void selftest(int which, int64_t* result) {
  const std::function<void()> nothing;
  switch (which) {
    case 0: {  // butterfly sum of the lane ids in each warp: every lane ends with 0 + ... + 31
      cuda_emu::launch({2, 1, 1}, {64, 1, 1}, 0, false, [&] {
        int v = static_cast<int>(threadIdx.x % 32);
        for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
        result[blockIdx.x * 64 + threadIdx.x] = v;
      }, nothing);
      return;
    }
    case 1: {  // grid.sync orders the blocks' writes: each reads its neighbour's after the barrier
      cuda_emu::launch({4, 1, 1}, {32, 1, 1}, 0, true, [&] {
        const unsigned b = blockIdx.x;
        if (threadIdx.x == 0) result[b] = b + 1;
        cooperative_groups::this_grid().sync();
        if (threadIdx.x == 0) result[4 + b] = result[(b + 1) % 4];
      }, nothing);
      return;
    }
    case 2: {  // __syncthreads orders shared memory: thread i reads what thread 255 − i wrote
      cuda_emu::launch({1, 1, 1}, {256, 1, 1}, 0, false, [&] {
        __shared__ int64_t s[256];
        s[threadIdx.x] = threadIdx.x * 3;
        __syncthreads();
        result[threadIdx.x] = s[255 - threadIdx.x];
      }, nothing);
      return;
    }
    case 3:  // a barrier that thread 0 skips: reported, not hung
      cuda_emu::launch({1, 1, 1}, {64, 1, 1}, 0, false, [&] {
        if (threadIdx.x != 0) __syncthreads();
      }, nothing);
      return;
    case 4:  // a block that leaves while the others wait at grid.sync: reported, not hung
      cuda_emu::launch({3, 1, 1}, {32, 1, 1}, 0, true, [&] {
        if (blockIdx.x != 1) cooperative_groups::this_grid().sync();
      }, nothing);
      return;
    case 5:  // a shuffle some lanes never reach: reported, not hung
      cuda_emu::launch({1, 1, 1}, {32, 1, 1}, 0, false, [&] {
        if (threadIdx.x < 16) result[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
      }, nothing);
      return;
    case 6:  // threads meeting at two different __syncthreads calls: reported
      cuda_emu::launch({1, 1, 1}, {64, 1, 1}, 0, false, [&] {
        if (threadIdx.x % 2 == 0) {
          __syncthreads();
        } else {
          __syncthreads();
        }
      }, nothing);
      return;
    case 7: {  // shared memory starts as NaN in every block (block_start poisons it)
      const std::function<void()> poison = poison_shared_memory;
      cuda_emu::launch({2, 1, 1}, {32, 1, 1}, 0, false, [&] {
        __shared__ double s[32];
        const double seen = s[threadIdx.x];
        __syncthreads();
        s[threadIdx.x] = 1.0;  // what the next block would see if nothing poisoned it
        std::memcpy(&result[blockIdx.x * 32 + threadIdx.x], &seen, sizeof(seen));
      }, poison);
      return;
    }
    default:
      throw std::runtime_error("no such self-test");
  }
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16. path: 0 persistent (rows_per_block 8, 16 or
// 32), 1 per_step, 2 per_step_cublas. bs/off: packed tables (steps + 1 entries each) or null for
// padded. w, h0, hn, dhn: one pointer per direction (h0/hn forward, dhn backward). buf holds P
// (forward) or dH (backward) and receives h_t or dA_t; out: the forward's output (backward only).
// Returns 0, or 1 with the reason in err.
int emu_recurrence(int dtype, int backward, int path, int rows_per_block, int64_t steps,
                   int64_t batch, const int64_t* bs, const int64_t* off, int64_t H, int64_t D,
                   void* buf, const void* out, void* const* w, void* const* h0, void* const* hn,
                   void* const* dhn, int relu, char* err, int64_t errlen) {
  if (errlen > 0) err[0] = '\0';
  const Problem p{path, rows_per_block, steps, batch, bs, off, H, D, buf, out, w, h0, hn, dhn,
                  relu != 0};
  try {
    switch (dtype) {
      case 0:
        run_direction<float>(p, backward != 0);
        break;
      case 1:
        run_direction<double>(p, backward != 0);
        break;
      case 2:
        run_direction<c10::Half>(p, backward != 0);
        break;
      case 3:
        run_direction<c10::BFloat16>(p, backward != 0);
        break;
      default:
        return report(err, errlen, "unknown dtype code");
    }
  } catch (const std::exception& e) {
    return report(err, errlen, e.what());
  }
  return 0;
}

int emu_selftest(int which, int64_t* result, char* err, int64_t errlen) {
  if (errlen > 0) err[0] = '\0';
  try {
    selftest(which, result);
  } catch (const std::exception& e) {
    return report(err, errlen, e.what());
  }
  return 0;
}

}  // extern "C"
