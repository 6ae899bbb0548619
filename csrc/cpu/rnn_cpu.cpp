// CPU kernels of fused_rnn::rnn_layer_forward / rnn_layer_backward (math and layout: rnn_layer.h).
//
// Forward: P for every step and direction is one GEMM written straight into the output; each step
// then adds h_{t-1} · W_hhᵀ into its own rows of that output and applies the activation in place.
// Nothing is allocated per step, and a packed batch only touches the rows it has.
// Backward: dA starts as a copy of grad_output (the one-layer op) or, inside a stack, as the layer
// above's dX itself; one reverse loop per direction turns it into the pre-activation gradient in
// place; the rest is whole-sequence GEMMs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <memory>

#include "../rnn_layer.h"
#include "cpu_gemm.h"
#include "pointwise.h"

namespace fused_rnn::cpu {
namespace {

template <typename scalar_t>
void copy_rows(scalar_t* dst, int64_t ldd, const scalar_t* src, int64_t lds, int64_t rows,
               int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) std::memcpy(dst + i * ldd, src + i * lds, cols * sizeof(scalar_t));
}

template <typename scalar_t>
void add_rows(scalar_t* dst, int64_t ldd, const scalar_t* src, int64_t lds, int64_t rows,
              int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) dst[i * ldd + j] += src[i * lds + j];
  }
}

// One direction's recurrence as work for run_directions: step(i, p) for every step i and column
// block p of w (all blocks of step i before any of step i + 1), then finish(). Block p of step t
// needs all of step t − 1 (the GEMM's left side) but only its own columns of step t, so the one
// synchronisation is the barrier at the end of each step.
template <typename scalar_t>
struct DirectionSteps {
  std::unique_ptr<SplitRhs<scalar_t>> w;
  std::function<void(int64_t, int64_t)> step;
  std::function<void()> finish;
};

// One direction of the forward over out (rows of stride ld, already holding P). h0 and hn are
// (B, H) contiguous; hn is written from h0 here, the rest as the steps end.
template <typename scalar_t>
DirectionSteps<scalar_t> forward_steps(scalar_t* out, int64_t ld, const scalar_t* h0,
                                       const scalar_t* whh, const StepSchedule& s, int64_t H,
                                       bool reverse, bool relu, scalar_t* hn, int64_t parts) {
  const int64_t* bs = s.bs.data();
  const int64_t* off = s.offset.data();
  const int64_t steps = s.steps;
  copy_rows(hn, H, h0, H, s.batch, H);
  DirectionSteps<scalar_t> d;
  d.w = std::make_unique<SplitRhs<scalar_t>>(whh, H, H, H, /*transpose_b=*/true, s.batch, s.steps,
                                             parts);  // · W_hhᵀ
  const SplitRhs<scalar_t>* w = d.w.get();
  if (!reverse) {
    d.step = [=](int64_t t, int64_t p) {
      scalar_t* cur = out + off[t] * ld;
      const scalar_t* prev = t == 0 ? h0 : out + off[t - 1] * ld;
      const int64_t c0 = w->col0(p), n = w->cols(p);
      w->multiply(p, bs[t], prev, t == 0 ? H : ld, 1, cur, ld);
      activate_rows(cur + c0, bs[t], n, ld, relu);
      // Rows [bs[t+1], bs[t]) end here: their state is final.
      copy_rows(hn + bs[t + 1] * H + c0, H, cur + bs[t + 1] * ld + c0, ld, bs[t] - bs[t + 1],
                n);
    };
    d.finish = [] {};
  } else {
    d.step = [=](int64_t i, int64_t p) {
      const int64_t t = steps - 1 - i;
      scalar_t* cur = out + off[t] * ld;
      const int64_t cont = bs[t + 1];  // rows that came from step t + 1; the rest start from h0
      w->multiply(p, cont, out + off[t + 1] * ld, ld, 1, cur, ld);
      w->multiply(p, bs[t] - cont, h0 + cont * H, H, 1, cur + cont * ld, ld);
      activate_rows(cur + w->col0(p), bs[t], w->cols(p), ld, relu);
    };
    d.finish = [=] {
      if (steps > 0) copy_rows(hn, H, out + off[0] * ld, ld, bs[0], H);
    };
  }
  return d;
}

// One direction of BPTT: turns dA (holding dH, rows of stride ld) into the pre-activation gradient in
// place and, unless dh0 is null, writes dh0 (B, H) in finish() (a step's GEMM: the whole cost of a
// one-step backward's recurrence). dhn and dh0 are (B, H) contiguous; out holds h_t.
template <typename scalar_t>
DirectionSteps<scalar_t> backward_steps(scalar_t* dA, int64_t ld, const scalar_t* out,
                                        const scalar_t* dhn, const scalar_t* whh,
                                        const StepSchedule& s, int64_t H, bool reverse, bool relu,
                                        scalar_t* dh0, int64_t parts) {
  const int64_t* bs = s.bs.data();
  const int64_t* off = s.offset.data();
  const int64_t steps = s.steps, batch = s.batch;
  DirectionSteps<scalar_t> d;
  d.w = std::make_unique<SplitRhs<scalar_t>>(whh, H, H, H, /*transpose_b=*/false, s.batch, s.steps,
                                             parts);  // · W_hh
  const SplitRhs<scalar_t>* w = d.w.get();
  if (steps == 0) {  // nothing to run: the gradient of h0 is that of h_n
    d.step = [](int64_t, int64_t) {};
    d.finish = [=] {
      if (dh0 != nullptr) copy_rows(dh0, H, dhn, H, batch, H);
    };
    return d;
  }
  if (!reverse) {
    d.step = [=](int64_t i, int64_t p) {
      const int64_t t = steps - 1 - i;
      scalar_t* cur = dA + off[t] * ld;
      const int64_t cont = bs[t + 1];
      const int64_t c0 = w->col0(p), n = w->cols(p);
      add_rows(cur + cont * ld + c0, ld, dhn + cont * H + c0, H, bs[t] - cont, n);
      w->multiply(p, cont, dA + off[t + 1] * ld, ld, 1, cur, ld);
      times_activation_grad(cur + c0, out + off[t] * ld + c0, bs[t], n, ld, relu);
    };
    d.finish = [=] {
      if (dh0 == nullptr) return;
      w->for_each_part([=](int64_t p) { w->multiply(p, bs[0], dA + off[0] * ld, ld, 0, dh0, H); });
    };
  } else {
    d.step = [=](int64_t t, int64_t p) {
      scalar_t* cur = dA + off[t] * ld;
      const int64_t c0 = w->col0(p), n = w->cols(p);
      if (t == 0) {
        add_rows(cur + c0, ld, dhn + c0, H, bs[0], n);
      } else {
        w->multiply(p, bs[t], dA + off[t - 1] * ld, ld, 1, cur, ld);
      }
      times_activation_grad(cur + c0, out + off[t] * ld + c0, bs[t], n, ld, relu);
    };
    // Rows [bs[t + 1], bs[t]) of step t started from h0 there (they are final once written).
    d.finish = [=] {
      if (dh0 == nullptr) return;
      w->for_each_part([=](int64_t p) {
        for (int64_t t = 0; t < steps; ++t) {
          const int64_t cont = bs[t + 1];
          w->multiply(p, bs[t] - cont, dA + (off[t] + cont) * ld, ld, 0, dh0 + cont * H, H);
        }
      });
    };
  }
  return d;
}

// Runs the recurrence of every direction, make(d, parts) giving direction d's DirectionSteps cut
// into that many column blocks. One direction: its steps cut into a block per thread where a step
// is big enough (step_parts). Two directions, where a step is big enough to split: on four threads
// or more, both in one parallel region, each cut into blocks for half the threads (step_parts
// again), one barrier per step for all (their step counts are equal); else one thread each,
// single-threaded, with no synchronisation per step.
template <typename scalar_t, typename Make>
void run_directions(int64_t D, const StepSchedule& s, int64_t H, const Make& make) {
  const int64_t threads = recurrence_threads();
  const int64_t parts = step_parts(s.batch, H, H, threads);
  const auto run_alone = [&](int64_t d, int64_t p) {
    DirectionSteps<scalar_t> work = make(d, p);
    work.w->for_each_step_part(s.steps, work.step);
    work.finish();
  };
  if (D == 2 && threads >= 2 && parts > 1) {
    const int64_t each = threads >= 4 ? step_parts(s.batch, H, H, threads / 2) : 1;
    if (each <= 1) {
      at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
        for (int64_t d = begin; d < end; ++d) run_alone(d, int64_t{1});
      });
      return;
    }
    DirectionSteps<scalar_t> first = make(0, each), second = make(1, each);
    const int64_t split = first.w->parts();
    run_step_parts(split + second.w->parts(), s.steps, [&](int64_t i, int64_t p) {
      if (p < split) {
        first.step(i, p);
      } else {
        second.step(i, p - split);
      }
    });
    first.finish();
    second.finish();
    return;
  }
  for (int64_t d = 0; d < D; ++d) run_alone(d, parts);
}

std::tuple<at::Tensor, at::Tensor> rnn_layer_forward_cpu(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes, bool relu, bool has_biases) {
  const LayerShape s = check_layer_args("fused_rnn::rnn_layer_forward", input, hx, weights,
                                        batch_sizes, has_biases);
  const int64_t H = s.hidden, D = s.directions, ld = D * H;
  const at::Tensor rows = input.reshape({s.schedule.rows, s.input_size}).contiguous();
  at::Tensor out = input_projection(rows, weights, s, &sequence_gemm);
  const at::Tensor h0 = hx.contiguous();
  at::Tensor hn = at::empty_like(h0);
  const std::vector<at::Tensor> whh = contiguous_w_hh(weights, s);
  const int64_t state = s.schedule.batch * H;  // elements of one direction's h0 and hn
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_layer_forward_cpu", [&] {
    run_directions<scalar_t>(D, s.schedule, H, [&](int64_t d, int64_t parts) {
      return forward_steps<scalar_t>(out.data_ptr<scalar_t>() + d * H, ld,
                                     h0.data_ptr<scalar_t>() + d * state,
                                     whh[d].data_ptr<scalar_t>(), s.schedule, H, d == 1, relu,
                                     hn.data_ptr<scalar_t>() + d * state, parts);
    });
  });
  std::vector<int64_t> out_sizes = input.sizes().vec();
  out_sizes.back() = ld;
  return {out.view(out_sizes), hn};
}

// The layer's BPTT from an owned dA (LayerKernels::backward).
LayerGrads layer_backward_cpu(at::Tensor dA, const LayerShape& s, const at::Tensor& grad_h_n,
                              const at::Tensor& input, const at::Tensor& hx,
                              at::TensorList weights, const at::Tensor& output, bool relu,
                              std::array<bool, 3> output_mask) {
  const int64_t H = s.hidden, D = s.directions, ld = D * H, N = s.schedule.rows;
  const at::Tensor out = output.reshape({N, ld}).contiguous();
  const at::Tensor h0 = hx.contiguous();
  // Only the recurrence reads it; released after it (a copy where grad_h_n is an expanded one,
  // as sum()'s backward makes, alive while the weight gradients are allocated).
  at::Tensor dhn = grad_h_n.contiguous();
  const bool need_input = output_mask[0], need_hx = output_mask[1], need_w = output_mask[2];
  at::Tensor dh0 = need_hx ? at::empty_like(h0) : at::empty({0}, hx.options());
  const std::vector<at::Tensor> whh = contiguous_w_hh(weights, s);
  const int64_t state = s.schedule.batch * H;  // elements of one direction's dhn and dh0
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_layer_backward_cpu", [&] {
    run_directions<scalar_t>(D, s.schedule, H, [&](int64_t d, int64_t parts) {
      return backward_steps<scalar_t>(dA.data_ptr<scalar_t>() + d * H, ld,
                                      out.data_ptr<scalar_t>() + d * H,
                                      dhn.data_ptr<scalar_t>() + d * state,
                                      whh[d].data_ptr<scalar_t>(), s.schedule, H, d == 1, relu,
                                      need_hx ? dh0.data_ptr<scalar_t>() + d * state : nullptr,
                                      parts);
    });
  });
  dhn = at::Tensor();
  std::vector<at::Tensor> grad_weights(need_w ? weights.size() : 0);
  const at::Tensor rows = input.reshape({N, s.input_size}).contiguous();
  if (need_w) {
    for (int64_t d = 0; d < D; ++d) {
      grad_weights[d * s.per_direction + 1] =
          grad_w_hh(dA.narrow(1, d * H, H), out.narrow(1, d * H, H), h0[d], s.schedule, d == 1);
    }
  }
  // dX stays on ATen's GEMM: the panel kernel's packed copies of W_ih (one per direction, alive for
  // the whole product) raised the backward's peak memory above nn.RNN's (T 64, B 8, H 512, two
  // bidirectional layers: 19.3 MB against 18.0) for about 10 % on one of the six GEMMs.
  at::Tensor grad_rows = sequence_gradients(dA, rows, weights, s, need_input, need_w, grad_weights);
  at::Tensor grad_input = need_input ? grad_rows.view(input.sizes()) : at::empty({0}, input.options());
  return {grad_input, dh0, grad_weights};
}

constexpr LayerKernels kCpuKernels{&rnn_layer_forward_cpu, &layer_backward_cpu};

LayerGrads rnn_layer_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                  const at::Tensor& input, const at::Tensor& hx,
                                  at::TensorList weights, const at::Tensor& output,
                                  const std::optional<at::Tensor>& batch_sizes, bool relu,
                                  bool has_biases, std::array<bool, 3> output_mask) {
  return layer_backward(kCpuKernels, "fused_rnn::rnn_layer_backward", grad_output, grad_h_n,
                        input, hx, weights, output, batch_sizes, relu, has_biases, output_mask);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> rnn_forward_cpu(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes, bool relu, bool has_biases,
    int64_t num_layers) {
  return stack_forward(kCpuKernels, input, hx, weights, batch_sizes, relu, has_biases,
                       num_layers);
}

LayerGrads rnn_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                            const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
                            at::TensorList hidden_outputs, const at::Tensor& output,
                            const std::optional<at::Tensor>& batch_sizes, bool relu,
                            bool has_biases, int64_t num_layers,
                            std::array<bool, 3> output_mask) {
  return stack_backward(kCpuKernels, grad_output, grad_h_n, input, hx, weights, hidden_outputs,
                        output, batch_sizes, relu, has_biases, num_layers, output_mask);
}

}  // namespace

}  // namespace fused_rnn::cpu

TORCH_LIBRARY_IMPL(fused_rnn, CPU, m) {
  m.impl("rnn_layer_forward", &fused_rnn::cpu::rnn_layer_forward_cpu);
  m.impl("rnn_layer_backward", &fused_rnn::cpu::rnn_layer_backward_cpu);
  m.impl("rnn_forward", &fused_rnn::cpu::rnn_forward_cpu);
  m.impl("rnn_backward", &fused_rnn::cpu::rnn_backward_cpu);
}
