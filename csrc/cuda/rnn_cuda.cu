// CUDA kernels of fused_rnn::rnn_layer_forward / rnn_layer_backward (math and layout: ../rnn_layer.h).
//
// The input projection and the whole-sequence gradient GEMMs go through ATen (cuBLAS), one call each,
// shared with the CPU code. The recurrence runs on one of two paths (../cuda_plan.h): persistent (one
// cooperative launch, W_hh on-chip, grid barrier per step; both directions in the same grid) or
// per-step (a fused GEMM + epilogue launch per step; the two directions on two streams).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <vector>

#include "../cuda_plan.h"
#include "../rnn_layer.h"
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

// Launches the persistent kernel if every block can be co-resident; returns false (nothing
// launched) if not, so that the caller takes the per-step path.
template <typename T, bool kBackward>
bool launch_persistent(const PersistentArgs<T>& args, const cuda_plan::PersistentConfig& cfg,
                       int device, int64_t sm_count, cudaStream_t stream) {
  int cooperative = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  if (!cooperative) return false;
  const void* kernel = persistent_kernel_for<T, kBackward>(cfg.rows_per_block);
  const int smem = static_cast<int>(cfg.smem_bytes);
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, kernel, static_cast<int>(cfg.threads), smem));
  const int64_t blocks = cfg.blocks_per_direction * cfg.directions;
  if (static_cast<int64_t>(per_sm) * sm_count < blocks) return false;
  PersistentArgs<T> a = args;
  void* params[] = {&a};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(static_cast<unsigned>(blocks)),
                                             dim3(static_cast<unsigned>(cfg.threads)), params,
                                             static_cast<size_t>(smem), stream));
  return true;
}

template <typename T, bool kBackward>
void launch_step(const StepRows<T>& st, const T* w, int64_t H, bool relu, cudaStream_t stream) {
  if (st.rows == 0 || H == 0) return;
  const dim3 grid(static_cast<unsigned>(cuda_plan::step_grid_x(st.rows)),
                  static_cast<unsigned>(cuda_plan::step_grid_y(H)));
  step_recurrence_kernel<T, kBackward><<<grid, kThreads, 0, stream>>>(st, w, H, relu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev_index).stream();
  const cuda_plan::DeviceLimits dev = device_limits(device);
  cuda_plan::PersistentConfig cfg;
  const std::string forced = cuda_plan::forced_path();
  const cuda_plan::Path path =
      cuda_plan::choose_path(H, s.schedule.batch, D, sizeof(T), dev, 0, forced, &cfg);

  if (path == cuda_plan::Path::kPersistent) {
    std::vector<int64_t> sched(s.schedule.bs);
    sched.insert(sched.end(), s.schedule.offset.begin(), s.schedule.offset.end());
    const at::Tensor sched_dev =
        at::tensor(sched, at::TensorOptions().dtype(at::kLong)).to(buf.device());
    PersistentArgs<T> a;
    a.steps = steps;
    a.H = H;
    a.ld = ld;
    a.blocks_per_direction = cfg.blocks_per_direction;
    a.bs = sched_dev.data_ptr<int64_t>();
    a.off = a.bs + steps + 1;
    a.buf = buf.data_ptr<T>();
    a.relu = relu;
    for (int64_t d = 0; d < D; ++d) {
      a.w[d] = whh[d].data_ptr<T>();
      if constexpr (kBackward) {
        a.out = out.data_ptr<T>();
        a.dhn[d] = dhn[d].data_ptr<T>();
      } else {
        a.h0[d] = h0[d].data_ptr<T>();
        a.hn[d] = hn[d].data_ptr<T>();
      }
    }
    if (launch_persistent<T, kBackward>(a, cfg, device, dev.sm_count, stream)) return;
    TORCH_CHECK(forced != "persistent",
                "fused_rnn: the persistent path was forced, but its grid of ",
                cfg.blocks_per_direction * D, " blocks cannot be co-resident on this device");
  }

  // Per-step: direction 0 on the current stream, direction 1 on a pool stream, joined at the end.
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, dev_index);
  cudaEvent_t start = nullptr, done = nullptr;
  if (D == 2) {
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&start, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(start, stream));
    C10_CUDA_CHECK(cudaStreamWaitEvent(side.stream(), start, 0));
  }
  const int64_t* bs = s.schedule.bs.data();
  const int64_t* off = s.schedule.offset.data();
  for (int64_t d = 0; d < D; ++d) {
    const cudaStream_t st_stream = d == 0 ? stream : side.stream();
    T* base = buf.data_ptr<T>() + d * H;
    const T* w = whh[d].data_ptr<T>();
    for (int64_t step = 0; step < steps; ++step) {
      StepRows<T> st;
      if constexpr (kBackward) {
        st = backward_step<T>(step, d == 1, steps, bs, off, base, ld, out.data_ptr<T>() + d * H,
                              dhn[d].data_ptr<T>());
      } else {
        st = forward_step<T>(step, d == 1, steps, bs, off, base, ld, h0[d].data_ptr<T>(),
                             hn[d].data_ptr<T>(), H);
      }
      launch_step<T, kBackward>(st, w, H, relu, st_stream);
    }
  }
  if (D == 2) {
    C10_CUDA_CHECK(cudaEventRecord(done, side.stream()));
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream, done, 0));
    C10_CUDA_CHECK(cudaEventDestroy(start));
    C10_CUDA_CHECK(cudaEventDestroy(done));
  }
}

std::vector<at::Tensor> contiguous_w_hh(at::TensorList weights, const LayerShape& s) {
  std::vector<at::Tensor> out;
  for (int64_t d = 0; d < s.directions; ++d) out.push_back(w_hh(weights, s, d).contiguous());
  return out;
}

void check_cuda(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), op, ": expected CUDA tensors, got input on ", input.device());
}

std::tuple<at::Tensor, at::Tensor> rnn_layer_forward_cuda(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes, bool relu, bool has_biases) {
  const char* op = "fused_rnn::rnn_layer_forward";
  check_cuda(op, input);
  const LayerShape s = check_layer_args(op, input, hx, weights, batch_sizes, has_biases);
  TORCH_CHECK(cuda_plan::step_grid_y(s.hidden) <= cuda_plan::kMaxGridY, op, ": hidden_size ",
              s.hidden, " is larger than the CUDA kernels support (",
              cuda_plan::kMaxGridY * cuda_plan::kStepTile, ")");
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
  std::vector<int64_t> first(s.batch);
  for (int64_t b = 0; b < s.batch; ++b) first[b] = b;  // forward: step 0, rows [0, B)
  if (reverse) {
    // Reverse: row b starts at its last step t_b, the t with bs[t + 1] ≤ b < bs[t].
    for (int64_t t = 0; t < s.steps; ++t) {
      for (int64_t b = s.bs[t + 1]; b < s.bs[t]; ++b) first[b] = s.offset[t] + b;
    }
  }
  const at::Tensor idx =
      at::tensor(first, at::TensorOptions().dtype(at::kLong)).to(dA_d.device());
  return at::mm(dA_d.index_select(0, idx), whh);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> rnn_layer_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& hx, at::TensorList weights, const at::Tensor& output,
    const std::optional<at::Tensor>& batch_sizes, bool relu, bool has_biases,
    std::array<bool, 3> output_mask) {
  const char* op = "fused_rnn::rnn_layer_backward";
  check_cuda(op, input);
  const LayerShape s = check_layer_backward_args(op, grad_output, grad_h_n, input, hx, weights,
                                                 output, batch_sizes, has_biases);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t H = s.hidden, D = s.directions, ld = D * H, N = s.schedule.rows;
  at::Tensor dA = grad_output.reshape({N, ld}).clone(at::MemoryFormat::Contiguous);
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

}  // namespace
}  // namespace fused_rnn::cuda

TORCH_LIBRARY_IMPL(fused_rnn, CUDA, m) {
  m.impl("rnn_layer_forward", &fused_rnn::cuda::rnn_layer_forward_cuda);
  m.impl("rnn_layer_backward", &fused_rnn::cuda::rnn_layer_backward_cuda);
}
