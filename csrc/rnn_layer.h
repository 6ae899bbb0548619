// The op contract shared by every backend: argument checks and the step schedule.
//
// One op call runs one layer of an Elman RNN, one or two directions (D = hx.size(0)):
//
//   P   = X · W_ihᵀ + (b_ih + b_hh)          one GEMM for all steps and both directions
//   h_t = act(P_t + h_{t-1} · W_hhᵀ)         the recurrence, per direction
//
// Backward, with a_t the pre-activation and act' read off h_t (tanh: 1 − h², relu: h > 0):
//
//   dA_t  = (dH_t + dA_{t+1} · W_hh) ⊙ act'(h_t)    sequential, in the opposite order to the forward
//   dW_hh = Σ_t dA_tᵀ · h_{t-1},  dW_ih = dAᵀ · X,  dX = dA · W_ih,  db = Σ dA,  dh0 = dA_first · W_hh
//
// Layout. Padded input is (T, B, I); packed input is (N, I) with batch_sizes (T,) on the CPU, rows of
// step t at offset[t] .. offset[t] + batch_sizes[t], batch sizes non-increasing (PackedSequence's
// layout). Both are the same thing to the kernels: N rows in T blocks; padded is the case bs[t] = B.
// Output rows have D·H columns, direction d in columns [d·H, (d+1)·H), as nn.RNN concatenates them.
// weights holds, per direction, w_ih (H, I), w_hh (H, H) and, with biases, b_ih (H), b_hh (H).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <cstdint>
#include <tuple>
#include <vector>

namespace fused_rnn {

// Where each step's rows live. bs has T + 1 entries, the last one 0, so that the rows of step t that
// have no step t + 1 (their sequence ends at t) are [bs[t + 1], bs[t]) for every t.
struct StepSchedule {
  int64_t steps = 0;          // T
  int64_t batch = 0;          // B = bs[0] (the hidden state's batch)
  int64_t rows = 0;           // N = Σ bs[t]
  bool packed = false;
  std::vector<int64_t> bs;      // T + 1 entries
  std::vector<int64_t> offset;  // T + 1 entries, offset[T] = N
};

// The sizes every backend reads off the arguments once they have been checked.
struct LayerShape {
  int64_t directions;   // D
  int64_t hidden;       // H
  int64_t input_size;   // I
  int64_t per_direction;  // 4 with biases, 2 without
  StepSchedule schedule;
};

// Checks input, hx, weights and batch_sizes against each other (device, dtype, rank, sizes, layout of
// batch_sizes) and returns the shape. `op` names the op in messages.
LayerShape check_layer_args(const char* op, const at::Tensor& input, const at::Tensor& hx,
                            at::TensorList weights, const std::optional<at::Tensor>& batch_sizes,
                            bool has_biases);

// Checks a backward call: the forward's arguments, plus grad_output/output shaped like the forward's
// output and grad_h_n like h_n.
LayerShape check_layer_backward_args(const char* op, const at::Tensor& grad_output,
                                     const at::Tensor& grad_h_n, const at::Tensor& input,
                                     const at::Tensor& hx, at::TensorList weights,
                                     const at::Tensor& output,
                                     const std::optional<at::Tensor>& batch_sizes, bool has_biases);

inline const at::Tensor& w_ih(at::TensorList weights, const LayerShape& s, int64_t d) {
  return weights[d * s.per_direction + 0];
}
inline const at::Tensor& w_hh(at::TensorList weights, const LayerShape& s, int64_t d) {
  return weights[d * s.per_direction + 1];
}

// Each direction's W_hh, contiguous.
std::vector<at::Tensor> contiguous_w_hh(at::TensorList weights, const LayerShape& s);

// out = a · b (+ the row vector bias when defined), for 2-D a and b (b may be a transposed view) and
// an out whose rows may be strided (a column slice): the input projection's GEMM, which a backend
// may run on its own kernel; aten_gemm is ATen's mm / addmm.
using SequenceGemm = void (*)(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                              const at::Tensor& bias);
void aten_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
               const at::Tensor& bias);

// The input projection for all steps and directions, P = X · W_ih_dᵀ + (b_ih + b_hh) per direction, written
// into a new (N, D·H) tensor that the recurrence then updates in place. Device-generic.
at::Tensor input_projection(const at::Tensor& input_rows, at::TensorList weights,
                            const LayerShape& s, SequenceGemm gemm = aten_gemm);

// dW_hh of one direction, Σ_t dA_tᵀ · h_{t-1}, as one GEMM over the sequence (dA_d and out_d are the
// direction's (N, H) column views, h0 its (B, H) initial state). Device-generic (ATen GEMM).
at::Tensor grad_w_hh(const at::Tensor& dA_d, const at::Tensor& out_d, const at::Tensor& h0,
                     const StepSchedule& s, bool reverse);

// The gradients that are one GEMM or one reduction over the whole sequence, from dA (N, D·H):
// dW_ih = dAᵀ · X and db = Σ dA (when need_weights), then dX = dA · W_ih (when need_input), which
// consumes dA (it may be computed in dA's storage; dA is left undefined then). Fills grad_weights'
// w_ih and bias slots; the w_hh slots are the caller's, to fill before calling this.
at::Tensor sequence_gradients(at::Tensor& dA, const at::Tensor& input_rows,
                              at::TensorList weights, const LayerShape& s, bool need_input,
                              bool need_weights, std::vector<at::Tensor>& grad_weights);

// ----------------------------------------------------------------------------------------------
// A stack of layers in one op (fused_rnn::rnn_forward / rnn_backward), as cuDNN runs nn.RNN: the
// backward owns the gradient flowing between layers, so layer l's dX, written over layer l's own dA
// storage, becomes layer l − 1's dA without a copy (the one-layer op must copy its immutable
// grad_output first). Device-generic; each backend passes its one-layer kernels.

using LayerGrads = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>;

struct LayerKernels {
  // The one-layer forward op's kernel (checks its arguments itself).
  std::tuple<at::Tensor, at::Tensor> (*forward)(const at::Tensor& input, const at::Tensor& hx,
                                                at::TensorList weights,
                                                const std::optional<at::Tensor>& batch_sizes,
                                                bool relu, bool has_biases);
  // The one-layer backward from an owned dA: the gradient of the layer's output as contiguous
  // (N, D·H) rows, turned into the pre-activation gradient in place; dX may be written over it.
  // Arguments already checked (s is their shape).
  LayerGrads (*backward)(at::Tensor dA, const LayerShape& s, const at::Tensor& grad_h_n,
                         const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
                         const at::Tensor& output, bool relu, std::array<bool, 3> output_mask);
};

// The one-layer backward op: checks, copies grad_output into a fresh dA, runs kernels.backward.
LayerGrads layer_backward(const LayerKernels& kernels, const char* op, const at::Tensor& grad_output,
                          const at::Tensor& grad_h_n, const at::Tensor& input, const at::Tensor& hx,
                          at::TensorList weights, const at::Tensor& output,
                          const std::optional<at::Tensor>& batch_sizes, bool relu, bool has_biases,
                          std::array<bool, 3> output_mask);

// num_layers layers; hx and h_n are (num_layers·D, B, H); weights are every layer's, in nn.RNN's
// order. Returns (output, h_n, hidden_outputs): the outputs of layers 0 .. num_layers − 2, which the
// backward reads.
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> stack_forward(
    const LayerKernels& kernels, const at::Tensor& input, const at::Tensor& hx,
    at::TensorList weights, const std::optional<at::Tensor>& batch_sizes, bool relu,
    bool has_biases, int64_t num_layers);

LayerGrads stack_backward(const LayerKernels& kernels, const at::Tensor& grad_output,
                          const at::Tensor& grad_h_n, const at::Tensor& input, const at::Tensor& hx,
                          at::TensorList weights, at::TensorList hidden_outputs,
                          const at::Tensor& output, const std::optional<at::Tensor>& batch_sizes,
                          bool relu, bool has_biases, int64_t num_layers,
                          std::array<bool, 3> output_mask);

}  // namespace fused_rnn
