// Argument checks, the step schedule and the whole-sequence GEMMs: the parts of the op contract that
// do not depend on the device.
#include "rnn_layer.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace fused_rnn {
namespace {

void check_same_device_dtype(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& input) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(),
              " but input is on ", input.device(), "; all tensors must be on one device");
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but input has dtype ", input.scalar_type(),
              "; all tensors must have one dtype");
}

void check_sizes(const char* op, const char* name, const at::Tensor& t,
                 c10::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": expected ", name, " of size ", expected, ", got ",
              t.sizes());
}

StepSchedule padded_schedule(int64_t steps, int64_t batch) {
  StepSchedule s;
  s.steps = steps;
  s.batch = batch;
  s.rows = steps * batch;
  s.bs.assign(steps + 1, batch);
  s.bs[steps] = 0;
  s.offset.resize(steps + 1);
  for (int64_t t = 0; t <= steps; ++t) s.offset[t] = t * batch;
  return s;
}

StepSchedule packed_schedule(const char* op, const at::Tensor& batch_sizes, int64_t rows,
                             int64_t batch) {
  TORCH_CHECK(batch_sizes.device().is_cpu(), op, ": batch_sizes must be a CPU tensor, got one on ",
              batch_sizes.device());
  TORCH_CHECK(batch_sizes.scalar_type() == at::kLong, op,
              ": batch_sizes must have dtype int64, got ", batch_sizes.scalar_type());
  TORCH_CHECK(batch_sizes.dim() == 1, op, ": batch_sizes must be 1-D, got ", batch_sizes.dim(),
              "-D");
  const at::Tensor bs_c = batch_sizes.contiguous();
  const int64_t* bs = bs_c.data_ptr<int64_t>();
  StepSchedule s;
  s.packed = true;
  s.steps = bs_c.numel();
  s.batch = batch;
  s.bs.resize(s.steps + 1);
  s.offset.resize(s.steps + 1);
  int64_t total = 0;
  for (int64_t t = 0; t < s.steps; ++t) {
    TORCH_CHECK(bs[t] > 0, op, ": batch_sizes must be positive, got ", bs[t], " at step ", t);
    TORCH_CHECK(t == 0 || bs[t] <= bs[t - 1], op,
                ": batch_sizes must be non-increasing (sequences sorted by decreasing length), got ",
                bs[t], " after ", bs[t - 1], " at step ", t);
    s.bs[t] = bs[t];
    s.offset[t] = total;
    total += bs[t];
  }
  s.bs[s.steps] = 0;
  s.offset[s.steps] = total;
  s.rows = total;
  TORCH_CHECK(s.steps == 0 || s.bs[0] == batch, op, ": batch_sizes[0] (", s.steps ? s.bs[0] : 0,
              ") must equal the hidden state's batch size hx.size(1) (", batch, ")");
  TORCH_CHECK(total == rows, op, ": batch_sizes sum to ", total, " but input has ", rows, " rows");
  return s;
}

}  // namespace

LayerShape check_layer_args(const char* op, const at::Tensor& input, const at::Tensor& hx,
                            at::TensorList weights, const std::optional<at::Tensor>& batch_sizes,
                            bool has_biases) {
  TORCH_CHECK(input.defined(), op, ": input is undefined");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op,
              ": input must have a floating point dtype, got ", input.scalar_type());
  const bool packed = batch_sizes.has_value() && batch_sizes->defined();
  const int64_t want_dim = packed ? 2 : 3;
  TORCH_CHECK(input.dim() == want_dim, op, ": input must be ", want_dim, "-D (",
              packed ? "packed rows (N, input_size)" : "padded (seq_len, batch, input_size)",
              "), got ", input.dim(), "-D");
  check_same_device_dtype(op, "hx", hx, input);
  TORCH_CHECK(hx.dim() == 3, op, ": hx must be 3-D (directions, batch, hidden_size), got ",
              hx.dim(), "-D");
  LayerShape s;
  s.directions = hx.size(0);
  TORCH_CHECK(s.directions == 1 || s.directions == 2, op,
              ": hx.size(0) is the number of directions and must be 1 or 2, got ", s.directions);
  s.hidden = hx.size(2);
  s.input_size = input.size(-1);
  s.per_direction = has_biases ? 4 : 2;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == s.directions * s.per_direction, op,
              ": expected ", s.directions * s.per_direction, " weights (", s.directions,
              " direction(s) × ", has_biases ? "w_ih, w_hh, b_ih, b_hh" : "w_ih, w_hh",
              "), got ", weights.size());
  for (int64_t d = 0; d < s.directions; ++d) {
    const std::string sfx = "[" + std::to_string(d * s.per_direction);
    const at::Tensor* w = &weights[d * s.per_direction];
    check_same_device_dtype(op, ("w_ih (weights" + sfx + "])").c_str(), w[0], input);
    check_sizes(op, "w_ih", w[0], {s.hidden, s.input_size});
    check_same_device_dtype(op, "w_hh", w[1], input);
    check_sizes(op, "w_hh", w[1], {s.hidden, s.hidden});
    if (has_biases) {
      check_same_device_dtype(op, "b_ih", w[2], input);
      check_sizes(op, "b_ih", w[2], {s.hidden});
      check_same_device_dtype(op, "b_hh", w[3], input);
      check_sizes(op, "b_hh", w[3], {s.hidden});
    }
  }
  if (packed) {
    s.schedule = packed_schedule(op, *batch_sizes, input.size(0), hx.size(1));
  } else {
    TORCH_CHECK(hx.size(1) == input.size(1), op, ": hx.size(1) (", hx.size(1),
                ") must equal the input's batch size input.size(1) (", input.size(1), ")");
    s.schedule = padded_schedule(input.size(0), input.size(1));
  }
  return s;
}

LayerShape check_layer_backward_args(const char* op, const at::Tensor& grad_output,
                                     const at::Tensor& grad_h_n, const at::Tensor& input,
                                     const at::Tensor& hx, at::TensorList weights,
                                     const at::Tensor& output,
                                     const std::optional<at::Tensor>& batch_sizes,
                                     bool has_biases) {
  LayerShape s = check_layer_args(op, input, hx, weights, batch_sizes, has_biases);
  std::vector<int64_t> out_sizes = input.sizes().vec();
  out_sizes.back() = s.directions * s.hidden;
  check_same_device_dtype(op, "output", output, input);
  check_sizes(op, "output", output, out_sizes);
  check_same_device_dtype(op, "grad_output", grad_output, input);
  check_sizes(op, "grad_output", grad_output, out_sizes);
  check_same_device_dtype(op, "grad_h_n", grad_h_n, input);
  check_sizes(op, "grad_h_n", grad_h_n, hx.sizes());
  return s;
}

std::vector<at::Tensor> contiguous_w_hh(at::TensorList weights, const LayerShape& s) {
  std::vector<at::Tensor> out;
  for (int64_t d = 0; d < s.directions; ++d) out.push_back(w_hh(weights, s, d).contiguous());
  return out;
}

void aten_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
               const at::Tensor& bias) {
  at::Tensor o = out;  // the *_out functions take a mutable reference; o shares out's storage
  if (bias.defined()) {
    at::addmm_out(o, bias, a, b);
  } else {
    at::mm_out(o, a, b);
  }
}

at::Tensor input_projection(const at::Tensor& input_rows, at::TensorList weights,
                            const LayerShape& s, SequenceGemm gemm) {
  const int64_t dh = s.directions * s.hidden;
  at::Tensor out = at::empty({s.schedule.rows, dh}, input_rows.options());
  // One GEMM per direction straight into its columns (row stride D·H): no stacked copy of W_ih.
  for (int64_t d = 0; d < s.directions; ++d) {
    const at::Tensor bias =
        s.per_direction == 4 ? weights[d * 4 + 2] + weights[d * 4 + 3] : at::Tensor();
    gemm(out.narrow(1, d * s.hidden, s.hidden), input_rows, w_ih(weights, s, d).t(), bias);
  }
  return out;
}

// dW_hh of one direction, Σ_t dA_tᵀ · h_{t-1}, as one GEMM over the sequence. Padded: h_{t-1} is the
// output shifted by one step (plus hx at the sequence start), a view. Packed: the rows are gathered.
at::Tensor grad_w_hh(const at::Tensor& dA_d, const at::Tensor& out_d, const at::Tensor& h0,
                     const StepSchedule& s, bool reverse) {
  const int64_t B = s.batch, N = s.rows;
  if (N == 0) return at::zeros({out_d.size(1), out_d.size(1)}, out_d.options());
  if (!s.packed) {
    const int64_t lo = reverse ? 0 : B;  // rows of dA whose h_{t-1} is an output row
    const int64_t first = reverse ? N - B : 0;  // rows of dA whose h_{t-1} is h0
    at::Tensor g = at::mm(dA_d.narrow(0, first, B).t(), h0);
    if (N > B) g.addmm_(dA_d.narrow(0, lo, N - B).t(), out_d.narrow(0, reverse ? B : 0, N - B));
    return g;
  }
  at::Tensor prev = at::empty({N, out_d.size(1)}, out_d.options());
  for (int64_t t = 0; t < s.steps; ++t) {
    at::Tensor rows = prev.narrow(0, s.offset[t], s.bs[t]);
    if (!reverse) {
      rows.copy_(t == 0 ? h0 : out_d.narrow(0, s.offset[t - 1], s.bs[t]));
    } else {
      const int64_t cont = s.bs[t + 1];
      if (cont > 0) rows.narrow(0, 0, cont).copy_(out_d.narrow(0, s.offset[t + 1], cont));
      rows.narrow(0, cont, s.bs[t] - cont).copy_(h0.narrow(0, cont, s.bs[t] - cont));
    }
  }
  return at::mm(dA_d.t(), prev);
}

namespace {

// dX rows r0 .. r0+n: Σ_d dA_d · W_ih_d, into out (n × I).
void grad_input_rows(const at::Tensor& dA, int64_t r0, int64_t n, at::TensorList weights,
                     const LayerShape& s, at::Tensor& out) {
  for (int64_t d = 0; d < s.directions; ++d) {
    const at::Tensor a = dA.narrow(0, r0, n).narrow(1, d * s.hidden, s.hidden);
    if (d == 0) {
      at::mm_out(out, a, w_ih(weights, s, d));
    } else {
      out.addmm_(a, w_ih(weights, s, d));
    }
  }
}

// dX = dA · W_ih written over dA's own storage, a block of rows at a time: row block i of dX needs
// only row block i of dA, and a dX row (I values) is no longer than a dA row (D·H values), so each
// block lands on storage already read. Saves the N × I allocation that dominates BPTT's peak memory.
at::Tensor grad_input_in_place(at::Tensor& dA, at::TensorList weights, const LayerShape& s) {
  const int64_t rows = dA.size(0), width = dA.size(1), isize = s.input_size;
  at::Tensor flat = dA.view({-1});
  // Blocks of about 1/64 of the rows (the scratch is then small next to dA), but at least
  // kMinBlockRows rows and kMinBlockElements elements where that is at most a quarter of the rows:
  // each block is a GEMM, and thin or small ones run far below the GEMM rate (float32 on 2 cores:
  // T = 64, B = 32, H = 256, 64 blocks of 32 rows took 3.8 ms where one GEMM takes 1.35 ms; B = 64,
  // H = 64, 16 blocks of 256 rows 0.42 ms where one GEMM takes 0.18 ms). The scratch stays under
  // kMaxBlockElements elements. Never under kMinGemmRows rows (or all of them): each block re-reads
  // W_ih, and a quarter of a few rows made GEMMs of 2 rows (T 1, B 8, H 512: four 78 µs GEMMs where
  // one takes about 100 µs). Blocks of up to kWideGemmRows rows where D·H ≥ kWideGemmRows · 8, so
  // that their scratch stays within an eighth of dW_ih's D·H × I, which the backward allocates
  // anyway: short sequences' dX in 16-row blocks took 1.7–2.1x one GEMM's time (H 512–1024, 64–128
  // rows; T 1, B 64, H 1024: 2.1 ms against 1.15).
  constexpr int64_t kMinBlockRows = 256;
  constexpr int64_t kMinBlockElements = int64_t{1} << 16;
  constexpr int64_t kMaxBlockElements = int64_t{1} << 20;
  constexpr int64_t kMinGemmRows = 16;
  constexpr int64_t kWideGemmRows = 64;
  const int64_t min_rows = std::max(kMinBlockRows, kMinBlockElements / std::max<int64_t>(width, 1));
  const int64_t gemm_rows = width >= kWideGemmRows * 8 ? kWideGemmRows : kMinGemmRows;
  const int64_t wanted = std::max<int64_t>(
      {(rows + 63) / 64, std::min(min_rows, rows / 4), std::min(rows, gemm_rows)});
  const int64_t block = std::max<int64_t>(
      1, std::min<int64_t>(wanted, kMaxBlockElements / std::max<int64_t>(width, 1)));
  at::Tensor tmp = at::empty({std::min(block, rows), isize}, dA.options());
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    const int64_t n = std::min(block, rows - r0);
    at::Tensor part = tmp.narrow(0, 0, n);
    grad_input_rows(dA, r0, n, weights, s, part);
    flat.narrow(0, r0 * isize, n * isize).view({n, isize}).copy_(part);
  }
  at::Tensor result = flat.narrow(0, 0, rows * isize).view({rows, isize});
  dA = at::Tensor();  // its storage now belongs to the result
  return result;
}

}  // namespace

at::Tensor sequence_gradients(at::Tensor& dA, const at::Tensor& input_rows,
                              at::TensorList weights, const LayerShape& s, bool need_input,
                              bool need_weights, std::vector<at::Tensor>& grad_weights) {
  if (need_weights) {
    for (int64_t d = 0; d < s.directions; ++d) {
      const int64_t base = d * s.per_direction;
      const at::Tensor dA_d = dA.narrow(1, d * s.hidden, s.hidden);
      grad_weights[base + 0] = at::mm(dA_d.t(), input_rows);
      if (s.per_direction == 4) {
        // b_ih and b_hh enter the sum identically, so they share a gradient; separate tensors,
        // since op outputs may not alias each other.
        grad_weights[base + 2] = dA_d.sum(0);
        grad_weights[base + 3] = grad_weights[base + 2].clone();
      }
    }
  }
  if (!need_input) return at::Tensor();
  if (s.input_size <= dA.size(1) && dA.is_contiguous() && dA.size(0) > 0) {
    return grad_input_in_place(dA, weights, s);
  }
  at::Tensor grad = at::empty({dA.size(0), s.input_size}, dA.options());
  grad_input_rows(dA, 0, dA.size(0), weights, s, grad);
  return grad;
}

// ----------------------------------------------------------------------------------------------
// Stacks of layers.

namespace {

// The directions per layer, after checking the stack-level arguments; the per-layer checks
// (check_layer_args) do the rest.
int64_t check_stack_args(const char* op, const at::Tensor& hx, at::TensorList weights,
                         bool has_biases, int64_t num_layers) {
  TORCH_CHECK(num_layers >= 1, op, ": num_layers must be at least 1, got ", num_layers);
  TORCH_CHECK(hx.defined() && hx.dim() == 3, op,
              ": hx must be 3-D (num_layers * directions, batch, hidden_size)");
  TORCH_CHECK(hx.size(0) == num_layers || hx.size(0) == 2 * num_layers, op, ": hx.size(0) (",
              hx.size(0), ") must be num_layers (", num_layers, ") times the directions (1 or 2)");
  const int64_t directions = hx.size(0) / num_layers;
  const int64_t per_layer = directions * (has_biases ? 4 : 2);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == num_layers * per_layer, op, ": expected ",
              num_layers * per_layer, " weights (", num_layers, " layer(s) × ", per_layer,
              "), got ", weights.size());
  return directions;
}

}  // namespace

LayerGrads layer_backward(const LayerKernels& kernels, const char* op, const at::Tensor& grad_output,
                          const at::Tensor& grad_h_n, const at::Tensor& input, const at::Tensor& hx,
                          at::TensorList weights, const at::Tensor& output,
                          const std::optional<at::Tensor>& batch_sizes, bool relu, bool has_biases,
                          std::array<bool, 3> output_mask) {
  const LayerShape s = check_layer_backward_args(op, grad_output, grad_h_n, input, hx, weights,
                                                 output, batch_sizes, has_biases);
  at::Tensor dA = grad_output.reshape({s.schedule.rows, s.directions * s.hidden})
                      .clone(at::MemoryFormat::Contiguous);
  return kernels.backward(std::move(dA), s, grad_h_n, input, hx, weights, output, relu,
                          output_mask);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> stack_forward(
    const LayerKernels& kernels, const at::Tensor& input, const at::Tensor& hx,
    at::TensorList weights, const std::optional<at::Tensor>& batch_sizes, bool relu,
    bool has_biases, int64_t num_layers) {
  const char* op = "fused_rnn::rnn_forward";
  const int64_t D = check_stack_args(op, hx, weights, has_biases, num_layers);
  const int64_t per_layer = D * (has_biases ? 4 : 2);
  std::vector<at::Tensor> hidden_outputs, h_n;
  at::Tensor layer_input = input;
  for (int64_t l = 0; l < num_layers; ++l) {
    const at::Tensor hx_l = hx.narrow(0, l * D, D);
    const at::TensorList w = weights.slice(l * per_layer, per_layer);
    // Checked here too, so that a bad argument is reported against this op (microseconds).
    check_layer_args(op, layer_input, hx_l, w, batch_sizes, has_biases);
    auto [out, hn] = kernels.forward(layer_input, hx_l, w, batch_sizes, relu, has_biases);
    h_n.push_back(std::move(hn));
    if (l + 1 < num_layers) hidden_outputs.push_back(out);
    layer_input = std::move(out);
  }
  return {layer_input, num_layers == 1 ? h_n[0] : at::cat(h_n, 0), hidden_outputs};
}

LayerGrads stack_backward(const LayerKernels& kernels, const at::Tensor& grad_output,
                          const at::Tensor& grad_h_n, const at::Tensor& input, const at::Tensor& hx,
                          at::TensorList weights, at::TensorList hidden_outputs,
                          const at::Tensor& output, const std::optional<at::Tensor>& batch_sizes,
                          bool relu, bool has_biases, int64_t num_layers,
                          std::array<bool, 3> output_mask) {
  const char* op = "fused_rnn::rnn_backward";
  const int64_t D = check_stack_args(op, hx, weights, has_biases, num_layers);
  const int64_t per_layer = D * (has_biases ? 4 : 2);
  TORCH_CHECK(static_cast<int64_t>(hidden_outputs.size()) == num_layers - 1, op, ": expected ",
              num_layers - 1, " hidden_outputs (one per layer but the last), got ",
              hidden_outputs.size());
  TORCH_CHECK(grad_h_n.defined() && grad_h_n.sizes() == hx.sizes(), op,
              ": expected grad_h_n of size ", hx.sizes());
  const bool need_hx = output_mask[1], need_w = output_mask[2];
  std::vector<at::Tensor> grad_weights(need_w ? weights.size() : 0);
  std::vector<at::Tensor> grad_hx(num_layers);
  at::Tensor grad = grad_output;  // the gradient of layer l's output
  for (int64_t l = num_layers - 1; l >= 0; --l) {
    const at::Tensor& layer_input = l == 0 ? input : hidden_outputs[l - 1];
    const at::Tensor& layer_output = l == num_layers - 1 ? output : hidden_outputs[l];
    const at::TensorList w = weights.slice(l * per_layer, per_layer);
    const at::Tensor hx_l = hx.narrow(0, l * D, D), dhn_l = grad_h_n.narrow(0, l * D, D);
    const LayerShape s = check_layer_backward_args(op, grad, dhn_l, layer_input, hx_l, w,
                                                   layer_output, batch_sizes, has_biases);
    const int64_t N = s.schedule.rows, ld = s.directions * s.hidden;
    // The top layer copies the caller's gradient; below it, grad is the layer above's dX, which
    // this function alone holds: it becomes dA as it is.
    at::Tensor dA = l == num_layers - 1
                        ? grad.reshape({N, ld}).clone(at::MemoryFormat::Contiguous)
                        : grad.reshape({N, ld});
    grad = at::Tensor();
    const std::array<bool, 3> mask = {l > 0 || output_mask[0], need_hx, need_w};
    LayerGrads g = kernels.backward(std::move(dA), s, dhn_l, layer_input, hx_l, w, layer_output,
                                    relu, mask);
    grad = std::move(std::get<0>(g));
    grad_hx[l] = std::move(std::get<1>(g));
    for (size_t i = 0; need_w && i < std::get<2>(g).size(); ++i) {
      grad_weights[l * per_layer + i] = std::move(std::get<2>(g)[i]);
    }
  }
  at::Tensor grad_input = output_mask[0] ? grad : at::empty({0}, input.options());
  at::Tensor grad_hx_all = need_hx ? at::cat(grad_hx, 0) : at::empty({0}, hx.options());
  return {grad_input, grad_hx_all, grad_weights};
}

}  // namespace fused_rnn
