// CUDA kernels of fused_rnn::rnn_layer_forward / rnn_layer_backward (math and layout: ../rnn_layer.h).
//
// The input projection and the whole-sequence gradient GEMMs go through ATen (cuBLAS), one call each,
// shared with the CPU code. The recurrence runs on one of two paths (../cuda_plan.h): persistent (one
// cooperative launch, W_hh on-chip, grid barrier per step; both directions in the same grid) or
// per-step (a fused GEMM + epilogue launch per step, or a cuBLAS GEMM + epilogue launch per step for
// big GEMMs and half types; the two directions on two streams).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

#include "../cuda_plan.h"
#include "../rnn_layer.h"
#include "device_plan.h"
#include "persistent_kernel.cuh"
#include "step_kernel.cuh"

namespace fused_rnn::cuda {
namespace {

cuda_plan::DeviceLimits device_limits(int device) {
  cuda_plan::DeviceLimits d{};
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  d.sm_count = v;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  d.smem_per_sm = v;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  d.smem_per_block_optin = v;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  d.max_threads_per_sm = v;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxRegistersPerMultiprocessor, device));
  d.regs_per_sm = v;
  return d;
}

template <typename T, int ROWS, bool kBackward>
const void* persistent_kernel_ptr() {
  return reinterpret_cast<const void*>(&persistent_recurrence_kernel<T, ROWS, kBackward>);
}

template <typename T, bool kBackward>
const void* persistent_kernel_for(int64_t rows) {
  switch (rows) {
    case 8:
      return persistent_kernel_ptr<T, 8, kBackward>();
    case 16:
      return persistent_kernel_ptr<T, 16, kBackward>();
    case 32:
      if constexpr (!std::is_same_v<T, double>) return persistent_kernel_ptr<T, 32, kBackward>();
      [[fallthrough]];
    default:
      TORCH_CHECK(false, "fused_rnn: no persistent kernel for ", rows, " rows per block");
  }
}

// Registers per thread of each built persistent kernel, for the planner.
template <typename T, bool kBackward>
cuda_plan::KernelRegs persistent_kernel_regs() {
  auto regs = [](int64_t rows) -> int64_t {
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, persistent_kernel_for<T, kBackward>(rows)));
    return attr.numRegs;
  };
  cuda_plan::KernelRegs r;
  r.rows8 = regs(8);
  r.rows16 = regs(16);
  if constexpr (!std::is_same_v<T, double>) r.rows32 = regs(32);
  return r;
}

// The path and persistent geometry for a layer on `device` (limits `dev`), from the built kernels'
// registers and whether the device has cooperative launches at all (the runtime's co-residency
// check at launch has the last word).
template <typename T, bool kBackward>
cuda_plan::Path plan(int64_t hidden, int64_t batch, int64_t directions, int device,
                     const cuda_plan::DeviceLimits& dev, const std::string& forced,
                     cuda_plan::PersistentConfig* cfg) {
  const cuda_plan::Path path = cuda_plan::choose_path(
      hidden, batch, directions, sizeof(T), dev, persistent_kernel_regs<T, kBackward>(), forced,
      cfg, cuda_plan::forced_rows());
  if (path != cuda_plan::Path::kPersistent) return path;
  int cooperative = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  if (cooperative) return path;
  TORCH_CHECK(forced != "persistent",
              "fused_rnn: the persistent path was forced, but this device does not support "
              "cooperative launches");
  *cfg = cuda_plan::PersistentConfig{};
  return cuda_plan::per_step_path(hidden, batch, sizeof(T));
}

// Launches the persistent kernel if every block can be co-resident; returns false (nothing
// launched) if not, so that the caller takes a per-step path. The runtime has the last word: a
// cooperative launch it refuses as too large (another process's MPS share, a smaller partition)
// also returns false.
template <typename T, bool kBackward>
bool launch_persistent(const PersistentArgs<T>& args, const cuda_plan::PersistentConfig& cfg,
                       int64_t sm_count, cudaStream_t stream) {
  const void* kernel = persistent_kernel_for<T, kBackward>(cfg.rows_per_block);
  const int smem = static_cast<int>(cfg.smem_bytes);
  // The kernel's dynamic shared-memory limit is per kernel and device, not per launch: another host
  // thread setting it lower between our setting and our launch would fail the launch. One lock
  // around set, occupancy query and (asynchronous) launch.
  static std::mutex launch_mutex;
  const std::lock_guard<std::mutex> lock(launch_mutex);
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, kernel, static_cast<int>(cfg.threads), smem));
  const int64_t blocks = cfg.blocks_per_direction * cfg.directions;
  if (static_cast<int64_t>(per_sm) * sm_count < blocks) return false;
  PersistentArgs<T> a = args;
  void* params[] = {&a};
  const cudaError_t err = cudaLaunchCooperativeKernel(
      kernel, dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(cfg.threads)), params,
      static_cast<size_t>(smem), stream);
  if (err == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();  // clear the launch error: nothing ran, the caller falls back
    return false;
  }
  C10_CUDA_CHECK(err);
  return true;
}

// One step of the per_step path on the current stream: the fused GEMM + epilogue kernel.
template <typename T, bool kBackward>
void launch_step(const StepRows<T>& st, const T* w, int64_t H, bool relu) {
  if (st.rows == 0 || H == 0) return;
  const dim3 grid(static_cast<unsigned>(cuda_plan::step_grid_x(st.rows)),
                  static_cast<unsigned>(cuda_plan::step_grid_y(H)));
  step_recurrence_kernel<T, kBackward>
      <<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(st, w, H, relu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// cuBLAS types of the per_step_cublas path: T in, acc_t<T> out, acc_t<T> compute (TF32 for float
// only where torch's matmul flag allows it and no NoTF32Guard is active, as at::mm would).
template <typename T>
constexpr cudaDataType_t blas_type() {
  if constexpr (std::is_same_v<T, double>) return CUDA_R_64F;
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  if constexpr (std::is_same_v<T, c10::Half>) return CUDA_R_16F;
  return CUDA_R_16BF;
}

template <typename T>
cublasComputeType_t blas_compute() {
  if constexpr (std::is_same_v<T, double>) return CUBLAS_COMPUTE_64F;
  if constexpr (std::is_same_v<T, float>) {
    const bool tf32 =
        at::globalContext().allowTF32CuBLAS() && !at::NoTF32Guard::should_disable_tf32();
    return tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  }
  return CUBLAS_COMPUTE_32F;
}

// ws (rows × H, acc_t<T>, row-major) = A · op(W), A rows `lda` apart; op(W) = W_hhᵀ forward, W_hh
// backward (W_hh row-major H × H). cuBLAS is column-major, so it computes wsᵀ = op(W)ᵀ · Aᵀ.
template <typename T, bool kBackward>
void blas_step_gemm(cublasHandle_t handle, const T* w, const T* a, int64_t lda, int64_t rows,
                    int64_t H, acc_t<T>* ws) {
  if (rows == 0) return;
  const acc_t<T> one(1), zero(0);
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      handle, kBackward ? CUBLAS_OP_N : CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(H),
      static_cast<int>(rows), static_cast<int>(H), &one, w, blas_type<T>(), static_cast<int>(H), a,
      blas_type<T>(), static_cast<int>(lda), &zero, ws, blas_type<acc_t<T>>(), static_cast<int>(H),
      blas_compute<T>(), CUBLAS_GEMM_DEFAULT));
}

// One step of the per_step_cublas path on the current stream: the GEMM term of the rows that have
// one (a1 rows, then a2 rows), then the epilogue kernel.
template <typename T, bool kBackward>
void cublas_step(const StepRows<T>& st, const T* w, int64_t H, bool relu, acc_t<T>* ws) {
  if (st.rows == 0 || H == 0) return;
  const cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const int64_t gemm_rows =
      step_gemms(st, H, ws, [&](const T* a, int64_t lda, int64_t rows, acc_t<T>* out) {
        blas_step_gemm<T, kBackward>(handle, w, a, lda, rows, H, out);
      });
  const dim3 grid(static_cast<unsigned>(cuda_plan::epilogue_grid_x(H)),
                  static_cast<unsigned>(cuda_plan::epilogue_grid_y(st.rows)));
  step_epilogue_kernel<T, kBackward>
      <<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(st, ws, gemm_rows, H, relu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A host vector of int64 on the device: a pinned staging copy, copied without blocking the host
// (pageable copies synchronise, and break CUDA graph capture).
at::Tensor to_device(const std::vector<int64_t>& values, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(values.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(values.begin(), values.end(), host.data_ptr<int64_t>());
  return host.to(device, /*non_blocking=*/true);
}

// Forks a side stream off the main one, and joins it back (the main stream waits for everything
// queued on the side) on finish() or, if an exception unwinds first, in the destructor: so that
// buffers freed on the main stream are never reused while side-stream work on them is pending.
class SideStreamJoin {
 public:
  SideStreamJoin(cudaStream_t main, cudaStream_t side) : main_(main), side_(side) {
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&start_, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(start_, main_));
    C10_CUDA_CHECK(cudaStreamWaitEvent(side_, start_, 0));
  }
  void finish() {
    joined_ = true;
    C10_CUDA_CHECK(cudaEventRecord(done_, side_));
    C10_CUDA_CHECK(cudaStreamWaitEvent(main_, done_, 0));
  }
  ~SideStreamJoin() {
    if (!joined_ && cudaEventRecord(done_, side_) == cudaSuccess) {
      (void)cudaStreamWaitEvent(main_, done_, 0);
    }
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(done_);
  }
  SideStreamJoin(const SideStreamJoin&) = delete;
  SideStreamJoin& operator=(const SideStreamJoin&) = delete;

 private:
  cudaStream_t main_, side_;
  cudaEvent_t start_ = nullptr, done_ = nullptr;
  bool joined_ = false;
};

// The per-step path's second direction runs on a side stream: one per device, taken from torch's
// pool on first use and kept. torch keeps a cuBLAS workspace for every (handle, stream) pair it has
// seen, for the life of the process, so a fresh pool stream per call would leave one workspace
// behind on each of the pool's streams.
c10::cuda::CUDAStream side_stream(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::vector<std::optional<c10::cuda::CUDAStream>> streams;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto i = static_cast<size_t>(device);
  if (streams.size() <= i) streams.resize(i + 1);
  if (!streams[i]) streams[i] = c10::cuda::getStreamFromPool(false, device);
  return *streams[i];
}

// The step tables a kernel reads: packed sequences' from `bs`/`off` (host or device copies of the
// schedule's), padded ones' from B alone.
StepTable step_table(const StepSchedule& s, const int64_t* bs, const int64_t* off) {
  StepTable tab;
  tab.batch = s.batch;
  tab.steps = s.steps;
  if (s.packed) {
    tab.bs = bs;
    tab.off = off;
  }
  return tab;
}

// Runs the recurrence of every direction over buf, on the path the plan picks.
//   forward: buf = output holding P; h0/hn per direction.  backward: buf = dA holding dH.
template <typename T, bool kBackward>
void run_recurrence(const LayerShape& s, at::Tensor& buf, const at::Tensor& out,
                    const at::Tensor& h0, at::Tensor& hn, const at::Tensor& dhn,
                    const std::vector<at::Tensor>& whh, bool relu) {
  const int64_t H = s.hidden, D = s.directions, ld = D * H, steps = s.schedule.steps;
  if (steps == 0 || s.schedule.rows == 0) return;
  const int device = buf.get_device();
  const auto dev_index = static_cast<c10::DeviceIndex>(device);
  const c10::cuda::CUDAStream main_stream = c10::cuda::getCurrentCUDAStream(dev_index);
  const cuda_plan::DeviceLimits dev = device_limits(device);
  cuda_plan::PersistentConfig cfg;
  const std::string forced = cuda_plan::forced_path();
  cuda_plan::Path path = plan<T, kBackward>(H, s.schedule.batch, D, device, dev, forced, &cfg);
  std::vector<DirectionPtrs<T>> dirs;
  for (int64_t d = 0; d < D; ++d) {
    DirectionPtrs<T> x;
    x.buf = buf.data_ptr<T>() + d * H;
    x.w = whh[d].data_ptr<T>();
    if constexpr (kBackward) {
      x.out = out.data_ptr<T>() + d * H;
      x.dhn = dhn[d].data_ptr<T>();
    } else {
      x.h0 = h0[d].data_ptr<T>();
      x.hn = hn[d].data_ptr<T>();
    }
    dirs.push_back(x);
  }

  if (path == cuda_plan::Path::kPersistent) {
    // Packed sequences' tables go to the device; padded ones need none (nothing is copied).
    at::Tensor sched_dev;
    if (s.schedule.packed) {
      std::vector<int64_t> sched(s.schedule.bs);
      sched.insert(sched.end(), s.schedule.offset.begin(), s.schedule.offset.end());
      sched_dev = to_device(sched, buf.device());
    }
    const int64_t* bs_dev = sched_dev.defined() ? sched_dev.data_ptr<int64_t>() : nullptr;
    const StepTable tab =
        step_table(s.schedule, bs_dev, bs_dev == nullptr ? nullptr : bs_dev + steps + 1);
    const PersistentArgs<T> a =
        persistent_args(H, D, cfg.blocks_per_direction, tab, dirs.data(), relu);
    if (launch_persistent<T, kBackward>(a, cfg, dev.sm_count, main_stream.stream())) {
      cuda_plan::record_path(kBackward, path, cfg.rows_per_block);
      return;
    }
    TORCH_CHECK(forced != "persistent",
                "fused_rnn: the persistent path was forced, but its grid of ",
                cfg.blocks_per_direction * D, " blocks cannot be co-resident on this device");
    path = cuda_plan::per_step_path(H, s.schedule.batch, sizeof(T));
  }

  cuda_plan::record_path(kBackward, path, cfg.rows_per_block);
  // Per-step: direction 0 on the current stream, direction 1 on a pool stream, joined at the end.
  // The directions' launches alternate, step by step, so that both streams have work queued from
  // the start (all of one direction first could fill the launch queue before the other begins).
  const bool use_blas = path == cuda_plan::Path::kPerStepCublas;
  at::Tensor ws;  // per direction: the GEMM term of a step (B × H, accumulation type)
  if (use_blas) {
    const auto acc = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
    ws = at::empty({D, s.schedule.batch, H}, buf.options().dtype(acc));
  }
  std::optional<c10::cuda::CUDAStream> side;
  std::optional<SideStreamJoin> join;
  if (D == 2) {
    side = side_stream(dev_index);
    join.emplace(main_stream.stream(), side->stream());
  }
  const StepTable tab = step_table(s.schedule, s.schedule.bs.data(), s.schedule.offset.data());
  for (int64_t step = 0; step < steps; ++step) {
    for (int64_t d = 0; d < D; ++d) {
      // The guard makes this direction's stream current: both step functions launch on it, and
      // cuBLAS's handle is bound to it.
      const c10::cuda::CUDAStreamGuard stream_guard(d == 0 ? main_stream : *side);
      const StepRows<T> st = layer_step<T, kBackward>(step, d == 1, tab, dirs[d], ld, H);
      if (use_blas) {
        cublas_step<T, kBackward>(st, dirs[d].w, H, relu,
                                  ws.data_ptr<acc_t<T>>() + d * s.schedule.batch * H);
      } else {
        launch_step<T, kBackward>(st, dirs[d].w, H, relu);
      }
    }
  }
  if (join) join->finish();
}

// The CUDA entry checks before the shared argument checks, and the sizes the kernels support after.
void check_cuda(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), op, ": expected CUDA tensors, got input on ", input.device());
}

void check_cuda_limits(const char* op, const LayerShape& s) {
  TORCH_CHECK(cuda_plan::step_grid_y(s.hidden) <= cuda_plan::kMaxGridY, op, ": hidden_size ",
              s.hidden, " is larger than the CUDA kernels support (",
              cuda_plan::kMaxGridY * cuda_plan::kStepTile, ")");
  TORCH_CHECK(s.schedule.batch <= std::numeric_limits<int>::max(), op, ": batch size ",
              s.schedule.batch, " is larger than the CUDA kernels support (",
              std::numeric_limits<int>::max(), ")");
}

std::tuple<at::Tensor, at::Tensor> rnn_layer_forward_cuda(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes, bool relu, bool has_biases) {
  const char* op = "fused_rnn::rnn_layer_forward";
  check_cuda(op, input);
  const LayerShape s = check_layer_args(op, input, hx, weights, batch_sizes, has_biases);
  check_cuda_limits(op, s);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor rows = input.reshape({s.schedule.rows, s.input_size}).contiguous();
  at::Tensor out = input_projection(rows, weights, s);
  const at::Tensor h0 = hx.contiguous();
  at::Tensor hn = h0.clone();  // rows no step reaches (only when there are no steps) keep h0
  const std::vector<at::Tensor> whh = contiguous_w_hh(weights, s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "rnn_layer_forward_cuda", [&] {
                                    run_recurrence<scalar_t, false>(s, out, out, h0, hn, hn, whh,
                                                                    relu);
                                  });
  std::vector<int64_t> out_sizes = input.sizes().vec();
  out_sizes.back() = s.directions * s.hidden;
  return {out.view(out_sizes), hn};
}

// dh0 of one direction: each row's gradient at its first processed step, times W_hh.
at::Tensor grad_h0(const at::Tensor& dA_d, const at::Tensor& whh, const StepSchedule& s,
                   bool reverse, const at::Tensor& dhn_d) {
  if (s.steps == 0) return dhn_d.clone();
  // Forward: every row starts at step 0, rows [0, B). Reverse, padded: at step T − 1, the last B.
  if (!reverse) return at::mm(dA_d.narrow(0, 0, s.batch), whh);
  if (!s.packed) return at::mm(dA_d.narrow(0, s.rows - s.batch, s.batch), whh);
  // Reverse, packed: row b starts at its last step t_b, the t with bs[t + 1] ≤ b < bs[t].
  std::vector<int64_t> first(s.batch);
  for (int64_t t = 0; t < s.steps; ++t) {
    for (int64_t b = s.bs[t + 1]; b < s.bs[t]; ++b) first[b] = s.offset[t] + b;
  }
  const at::Tensor idx = to_device(first, dA_d.device());
  return at::mm(dA_d.index_select(0, idx), whh);
}

// The layer's BPTT from an owned dA (LayerKernels::backward); the device guard is the caller's.
LayerGrads layer_backward_cuda(at::Tensor dA, const LayerShape& s, const at::Tensor& grad_h_n,
                               const at::Tensor& input, const at::Tensor& hx,
                               at::TensorList weights, const at::Tensor& output, bool relu,
                               std::array<bool, 3> output_mask) {
  check_cuda_limits("fused_rnn::rnn_layer_backward", s);
  const int64_t H = s.hidden, D = s.directions, ld = D * H, N = s.schedule.rows;
  const at::Tensor out = output.reshape({N, ld}).contiguous();
  const at::Tensor h0 = hx.contiguous();
  const at::Tensor dhn = grad_h_n.contiguous();
  const std::vector<at::Tensor> whh = contiguous_w_hh(weights, s);
  at::Tensor unused;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "rnn_layer_backward_cuda", [&] {
                                    run_recurrence<scalar_t, true>(s, dA, out, h0, unused, dhn,
                                                                   whh, relu);
                                  });
  const bool need_input = output_mask[0], need_hx = output_mask[1], need_w = output_mask[2];
  at::Tensor dh0 = at::empty({0}, hx.options());
  if (need_hx) {
    dh0 = at::empty_like(h0);
    for (int64_t d = 0; d < D; ++d) {
      dh0[d].copy_(grad_h0(dA.narrow(1, d * H, H), whh[d], s.schedule, d == 1, dhn[d]));
    }
  }
  std::vector<at::Tensor> grad_weights(need_w ? weights.size() : 0);
  if (need_w) {
    for (int64_t d = 0; d < D; ++d) {
      grad_weights[d * s.per_direction + 1] =
          grad_w_hh(dA.narrow(1, d * H, H), out.narrow(1, d * H, H), h0[d], s.schedule, d == 1);
    }
  }
  const at::Tensor rows = input.reshape({N, s.input_size}).contiguous();
  at::Tensor grad_rows = sequence_gradients(dA, rows, weights, s, need_input, need_w, grad_weights);
  at::Tensor grad_input =
      need_input ? grad_rows.view(input.sizes()) : at::empty({0}, input.options());
  return {grad_input, dh0, grad_weights};
}

constexpr LayerKernels kCudaKernels{&rnn_layer_forward_cuda, &layer_backward_cuda};

LayerGrads rnn_layer_backward_cuda(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                   const at::Tensor& input, const at::Tensor& hx,
                                   at::TensorList weights, const at::Tensor& output,
                                   const std::optional<at::Tensor>& batch_sizes, bool relu,
                                   bool has_biases, std::array<bool, 3> output_mask) {
  const char* op = "fused_rnn::rnn_layer_backward";
  check_cuda(op, input);
  const c10::cuda::CUDAGuard guard(input.device());
  return layer_backward(kCudaKernels, op, grad_output, grad_h_n, input, hx, weights, output,
                        batch_sizes, relu, has_biases, output_mask);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> rnn_forward_cuda(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes, bool relu, bool has_biases,
    int64_t num_layers) {
  check_cuda("fused_rnn::rnn_forward", input);
  const c10::cuda::CUDAGuard guard(input.device());
  return stack_forward(kCudaKernels, input, hx, weights, batch_sizes, relu, has_biases,
                       num_layers);
}

LayerGrads rnn_backward_cuda(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                             const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
                             at::TensorList hidden_outputs, const at::Tensor& output,
                             const std::optional<at::Tensor>& batch_sizes, bool relu,
                             bool has_biases, int64_t num_layers,
                             std::array<bool, 3> output_mask) {
  check_cuda("fused_rnn::rnn_backward", input);
  const c10::cuda::CUDAGuard guard(input.device());
  return stack_backward(kCudaKernels, grad_output, grad_h_n, input, hx, weights, hidden_outputs,
                        output, batch_sizes, relu, has_biases, num_layers, output_mask);
}

}  // namespace

cuda_plan::Path device_plan(int64_t hidden, int64_t batch, int64_t directions,
                            c10::ScalarType dtype, bool backward, int device,
                            const std::string& forced, cuda_plan::PersistentConfig* cfg) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cuda_plan::DeviceLimits dev = device_limits(device);
  cuda_plan::Path path = cuda_plan::Path::kPerStep;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "device_plan", [&] {
    path = backward ? plan<scalar_t, true>(hidden, batch, directions, device, dev, forced, cfg)
                    : plan<scalar_t, false>(hidden, batch, directions, device, dev, forced, cfg);
  });
  return path;
}

}  // namespace fused_rnn::cuda

TORCH_LIBRARY_IMPL(fused_rnn, CUDA, m) {
  m.impl("rnn_layer_forward", &fused_rnn::cuda::rnn_layer_forward_cuda);
  m.impl("rnn_layer_backward", &fused_rnn::cuda::rnn_layer_backward_cuda);
  m.impl("rnn_forward", &fused_rnn::cuda::rnn_forward_cuda);
  m.impl("rnn_backward", &fused_rnn::cuda::rnn_backward_cuda);
}
