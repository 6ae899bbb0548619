// Autograd of the two forward ops (fused_rnn::rnn_layer_forward and rnn_forward), in C++ for every
// device: TORCH_LIBRARY_IMPL(fused_rnn, Autograd, m).
//
// Why here and not torch.library.register_autograd: that Python wrapper boxed every call out to
// Python and back, with or without grad. CPU, B 1, H 64, T 1, torch 2.14: the op took 57 µs through
// it under no_grad against 30 µs below it, and 197 µs when a gradient was needed. The backward ops'
// own autograd (second order, rare) stays in Python (fused_rnn/_ops.py), and so does everything
// when this extension is missing.
//
// Each backward calls the backward op below autograd, except under create_graph, when the backward
// op's own autograd must record it (double backward).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace fused_rnn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Grads = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>;

// Typed handles on the ops, looked up once.
const auto& layer_forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_rnn::rnn_layer_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    at::TensorList,
                                                    const std::optional<at::Tensor>&, bool,
                                                    bool)>();
  return op;
}

const auto& layer_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_rnn::rnn_layer_backward", "")
          .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       at::TensorList, const at::Tensor&, const std::optional<at::Tensor>&, bool,
                       bool, std::array<bool, 3>)>();
  return op;
}

const auto& stack_forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_rnn::rnn_forward", "")
          .typed<Grads(const at::Tensor&, const at::Tensor&, at::TensorList,
                       const std::optional<at::Tensor>&, bool, bool, int64_t)>();
  return op;
}

const auto& stack_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_rnn::rnn_backward", "")
          .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       at::TensorList, at::TensorList, const at::Tensor&,
                       const std::optional<at::Tensor>&, bool, bool, int64_t,
                       std::array<bool, 3>)>();
  return op;
}

bool any_requires_grad(at::TensorList weights) {
  for (const auto& w : weights) {
    if (w.requires_grad()) return true;
  }
  return false;
}

// Which gradients the backward computes: input, hx, weights (all of them or none).
std::array<bool, 3> grad_mask(const at::Tensor& input, const at::Tensor& hx,
                              at::TensorList weights) {
  return {input.requires_grad(), hx.requires_grad(), any_requires_grad(weights)};
}

bool needs_grad(const at::Tensor& input, const at::Tensor& hx, at::TensorList weights) {
  if (!at::GradMode::is_enabled()) return false;
  const auto mask = grad_mask(input, hx, weights);
  return mask[0] || mask[1] || mask[2];
}

void save_args(AutogradContext* ctx, const std::optional<at::Tensor>& batch_sizes, bool relu,
               bool has_biases, std::array<bool, 3> mask) {
  ctx->saved_data["batch_sizes"] = batch_sizes;
  ctx->saved_data["relu"] = relu;
  ctx->saved_data["has_biases"] = has_biases;
  ctx->saved_data["mask"] = std::vector<bool>(mask.begin(), mask.end());
}

std::array<bool, 3> saved_mask(AutogradContext* ctx) {
  const auto mask = ctx->saved_data["mask"].toBoolList();
  return {mask[0], mask[1], mask[2]};
}

std::optional<at::Tensor> saved_batch_sizes(AutogradContext* ctx) {
  return ctx->saved_data["batch_sizes"].toOptional<at::Tensor>();
}

// Inside a backward: the backward ops are called below autograd unless the backward is itself being
// recorded (create_graph), since their own autograd is the Python one and a plain backward has no
// use for the trip through it.
struct BelowAutogradUnlessRecording {
  BelowAutogradUnlessRecording() {
    if (!at::GradMode::is_enabled()) guard.emplace();
  }
  std::optional<at::AutoDispatchBelowADInplaceOrView> guard;
};

at::Tensor or_zeros_like(const at::Tensor& grad, const at::Tensor& like) {
  return grad.defined() ? grad : at::zeros_like(like);
}

// A forward op's backward result: one entry per forward argument, the weights counting one each
// (input, hx, weights..., then undefined for batch_sizes and the non-tensor arguments).
variable_list input_grads(std::array<bool, 3> mask, Grads grads, size_t n_weights,
                          size_t other_args) {
  auto& [grad_input, grad_hx, grad_weights] = grads;
  variable_list out;
  out.reserve(2 + n_weights + other_args);
  out.push_back(mask[0] ? grad_input : at::Tensor());
  out.push_back(mask[1] ? grad_hx : at::Tensor());
  for (size_t i = 0; i < n_weights; ++i) {
    out.push_back(mask[2] ? grad_weights[i] : at::Tensor());
  }
  out.resize(out.size() + other_args);
  return out;
}

struct LayerForward : public torch::autograd::Function<LayerForward> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& hx,
                               at::TensorList weights,
                               const std::optional<at::Tensor>& batch_sizes, bool relu,
                               bool has_biases) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [output, h_n] = layer_forward_op().call(input, hx, weights, batch_sizes, relu, has_biases);
    ctx->set_materialize_grads(false);
    variable_list saved{input, hx, output};
    saved.insert(saved.end(), weights.begin(), weights.end());
    ctx->save_for_backward(saved);
    save_args(ctx, batch_sizes, relu, has_biases, grad_mask(input, hx, weights));
    return {output, h_n};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &hx = saved[1], &output = saved[2];
    const at::TensorList weights = at::TensorList(saved).slice(3);
    const auto mask = saved_mask(ctx);
    BelowAutogradUnlessRecording below;
    Grads result = layer_backward_op().call(
        or_zeros_like(grads[0], output), or_zeros_like(grads[1], hx), input, hx, weights, output,
        saved_batch_sizes(ctx), ctx->saved_data["relu"].toBool(),
        ctx->saved_data["has_biases"].toBool(), mask);
    return input_grads(mask, std::move(result), weights.size(), /*other_args=*/3);
  }
};

// The stack's backward when the layers' own outputs got gradients too (second-order passes send
// them): layer by layer from the top through the one-layer backward op, each layer's gradient being
// the one from the layer above plus its own.
Grads stack_backward_by_layer(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                              const at::Tensor& input, const at::Tensor& hx,
                              at::TensorList weights, at::TensorList hidden_outputs,
                              const variable_list& grad_hidden, const at::Tensor& output,
                              const std::optional<at::Tensor>& batch_sizes, bool relu,
                              bool has_biases, int64_t num_layers, std::array<bool, 3> mask) {
  const int64_t D = hx.size(0) / num_layers;
  const int64_t per_layer = D * (has_biases ? 4 : 2);
  std::vector<at::Tensor> grad_hx(num_layers), grad_weights(mask[2] ? weights.size() : 0);
  at::Tensor grad = grad_output;
  for (int64_t l = num_layers - 1; l >= 0; --l) {
    if (l < num_layers - 1 && grad_hidden[l].defined()) grad = grad + grad_hidden[l];
    auto [grad_in, grad_hx_l, grad_w] = layer_backward_op().call(
        grad, grad_h_n.narrow(0, l * D, D), l == 0 ? input : hidden_outputs[l - 1],
        hx.narrow(0, l * D, D), weights.slice(l * per_layer, per_layer),
        l == num_layers - 1 ? output : hidden_outputs[l], batch_sizes, relu, has_biases,
        {l > 0 || mask[0], mask[1], mask[2]});
    grad = std::move(grad_in);
    grad_hx[l] = std::move(grad_hx_l);
    for (size_t i = 0; mask[2] && i < grad_w.size(); ++i) {
      grad_weights[l * per_layer + i] = grad_w[i];
    }
  }
  return {mask[0] ? grad : at::Tensor(), mask[1] ? at::cat(grad_hx, 0) : at::Tensor(),
          grad_weights};
}

struct StackForward : public torch::autograd::Function<StackForward> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& hx,
                               at::TensorList weights,
                               const std::optional<at::Tensor>& batch_sizes, bool relu,
                               bool has_biases, int64_t num_layers) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [output, h_n, hidden_outputs] =
        stack_forward_op().call(input, hx, weights, batch_sizes, relu, has_biases, num_layers);
    // No zeros are made for outputs without a gradient: the layers' outputs rarely get one and can
    // be most of the memory.
    ctx->set_materialize_grads(false);
    variable_list saved{input, hx, output};
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.insert(saved.end(), hidden_outputs.begin(), hidden_outputs.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["n_weights"] = static_cast<int64_t>(weights.size());
    ctx->saved_data["num_layers"] = num_layers;
    save_args(ctx, batch_sizes, relu, has_biases, grad_mask(input, hx, weights));
    variable_list out{output, h_n};
    out.insert(out.end(), hidden_outputs.begin(), hidden_outputs.end());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &hx = saved[1], &output = saved[2];
    const int64_t n_weights = ctx->saved_data["n_weights"].toInt();
    const at::TensorList weights = at::TensorList(saved).slice(3, n_weights);
    const at::TensorList hidden_outputs = at::TensorList(saved).slice(3 + n_weights);
    const int64_t num_layers = ctx->saved_data["num_layers"].toInt();
    const auto batch_sizes = saved_batch_sizes(ctx);
    const bool relu = ctx->saved_data["relu"].toBool();
    const bool has_biases = ctx->saved_data["has_biases"].toBool();
    const auto mask = saved_mask(ctx);
    const at::Tensor grad_output = or_zeros_like(grads[0], output);
    const at::Tensor grad_h_n = or_zeros_like(grads[1], hx);
    const variable_list grad_hidden(grads.begin() + 2, grads.end());
    bool hidden_grads = false;
    for (const auto& g : grad_hidden) hidden_grads = hidden_grads || g.defined();
    BelowAutogradUnlessRecording below;
    Grads result =
        hidden_grads
            ? stack_backward_by_layer(grad_output, grad_h_n, input, hx, weights, hidden_outputs,
                                      grad_hidden, output, batch_sizes, relu, has_biases,
                                      num_layers, mask)
            : stack_backward_op().call(grad_output, grad_h_n, input, hx, weights, hidden_outputs,
                                       output, batch_sizes, relu, has_biases, num_layers, mask);
    return input_grads(mask, std::move(result), weights.size(), /*other_args=*/4);
  }
};

// The ops have no forward-mode derivative. Dual tensors that do not require grad would otherwise
// lose their tangents without a word; fused_rnn.RNN and fused_rnn.rnn never send them (they run the
// reference ops under forward AD and torch.func transforms).
void refuse_dual_tensors(const char* op, const at::Tensor& input, const at::Tensor& hx,
                         at::TensorList weights) {
  const auto dual = [](const at::Tensor& t) {
    return t.defined() && t._fw_grad(/*level=*/0).defined();
  };
  bool any = dual(input) || dual(hx);
  for (const auto& w : weights) any = any || dual(w);
  TORCH_CHECK(!any, op,
              ": forward-mode AD is not supported by the fused op (no forward derivative); "
              "fused_rnn.RNN and fused_rnn.rnn run their reference ops under "
              "torch.autograd.forward_ad and torch.func transforms");
}

std::tuple<at::Tensor, at::Tensor> layer_forward_autograd(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes, bool relu, bool has_biases) {
  refuse_dual_tensors("fused_rnn::rnn_layer_forward", input, hx, weights);
  if (!needs_grad(input, hx, weights)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return layer_forward_op().call(input, hx, weights, batch_sizes, relu, has_biases);
  }
  auto out = LayerForward::apply(input, hx, weights, batch_sizes, relu, has_biases);
  return {out[0], out[1]};
}

Grads stack_forward_autograd(const at::Tensor& input, const at::Tensor& hx,
                             at::TensorList weights, const std::optional<at::Tensor>& batch_sizes,
                             bool relu, bool has_biases, int64_t num_layers) {
  refuse_dual_tensors("fused_rnn::rnn_forward", input, hx, weights);
  if (!needs_grad(input, hx, weights)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return stack_forward_op().call(input, hx, weights, batch_sizes, relu, has_biases, num_layers);
  }
  auto out = StackForward::apply(input, hx, weights, batch_sizes, relu, has_biases, num_layers);
  return {out[0], out[1], std::vector<at::Tensor>(out.begin() + 2, out.end())};
}

}  // namespace
}  // namespace fused_rnn

TORCH_LIBRARY_IMPL(fused_rnn, Autograd, m) {
  m.impl("rnn_layer_forward", &fused_rnn::layer_forward_autograd);
  m.impl("rnn_forward", &fused_rnn::stack_forward_autograd);
}
