"""Pure-PyTorch versions of the fused_rnn ops, with the same contract as the native kernels.

They serve three purposes: the kernels used when the extension is not built (or has no kernel for a
device), the differentiable path that second-order gradients take, and a readable statement of what
the kernels compute. The math and layout are those of csrc/rnn_layer.h:

    P   = X · W_ihᵀ + (b_ih + b_hh)
    h_t = act(P_t + h_{t-1} · W_hhᵀ)
    dA_t = (dH_t + dA_{t+1} · W_hh) ⊙ act'(h_t)

Every function here is written with differentiable torch operations only (no in-place updates of
tensors that may need gradients), so autograd can differentiate through it.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def schedule(input: Tensor, hx: Tensor, batch_sizes: Optional[Tensor]) -> Tuple[List[int], List[int]]:
    """Rows per step (with a trailing 0) and the offset of each step's rows, as in rnn_layer.h."""
    if batch_sizes is None:
        steps, batch = input.size(0), input.size(1)
        bs = [batch] * steps + [0]
    else:
        bs = [int(b) for b in batch_sizes.tolist()] + [0]
    offsets = [0]
    for b in bs[:-1]:
        offsets.append(offsets[-1] + b)
    return bs, offsets


def _act(x: Tensor, relu: bool) -> Tensor:
    return torch.relu(x) if relu else torch.tanh(x)


def _act_grad(g: Tensor, h: Tensor, relu: bool) -> Tensor:
    """g ⊙ act'(h), with act' read off the output h as autograd does."""
    if relu:
        return torch.where(h <= 0, torch.zeros_like(g), g)
    return g * (1 - h * h)


def _split(weights: Sequence[Tensor], has_biases: bool, directions: int) -> List[List[Tensor]]:
    per = 4 if has_biases else 2
    return [list(weights[d * per:(d + 1) * per]) for d in range(directions)]


def rnn_layer_forward(input: Tensor, hx: Tensor, weights: Sequence[Tensor],
                      batch_sizes: Optional[Tensor], relu: bool,
                      has_biases: bool) -> Tuple[Tensor, Tensor]:
    directions, batch, hidden = hx.shape
    bs, off = schedule(input, hx, batch_sizes)
    steps = len(bs) - 1
    rows = input.reshape(-1, input.size(-1))
    outs, hns = [], []
    for d, w in enumerate(_split(weights, has_biases, directions)):
        # nn.RNN's order of roundings (it matters in reduced precision): P = linear(x, W_ih, b_ih)
        # for the sequence, then act(linear(h, W_hh, b_hh) + P_t) per step.
        b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
        p = F.linear(rows, w[0], b_ih)
        h0 = hx[d]
        step_out: List[Optional[Tensor]] = [None] * steps
        if d == 0:
            h = h0
            for t in range(steps):
                new = _act(F.linear(h[:bs[t]], w[1], b_hh) + p[off[t]:off[t] + bs[t]], relu)
                step_out[t] = new
                h = torch.cat([new, h[bs[t]:]], 0)
            hn = h
        else:
            h = h0
            for t in reversed(range(steps)):
                prev = torch.cat([h[:bs[t + 1]], h0[bs[t + 1]:bs[t]]], 0)
                h = _act(F.linear(prev, w[1], b_hh) + p[off[t]:off[t] + bs[t]], relu)
                step_out[t] = h
            hn = h
        outs.append(torch.cat(step_out, 0) if steps else p[:0])
        hns.append(hn)
    output = torch.cat(outs, 1).reshape(*input.shape[:-1], directions * hidden)
    return output, torch.stack(hns, 0)


def rnn_layer_backward(grad_output: Tensor, grad_h_n: Tensor, input: Tensor, hx: Tensor,
                       weights: Sequence[Tensor], output: Tensor, batch_sizes: Optional[Tensor],
                       relu: bool, has_biases: bool,
                       output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor, List[Tensor]]:
    directions, batch, hidden = hx.shape
    bs, off = schedule(input, hx, batch_sizes)
    steps = len(bs) - 1
    rows = input.reshape(-1, input.size(-1))
    out_rows = output.reshape(-1, directions * hidden)
    grad_rows = grad_output.reshape(-1, directions * hidden)
    ws = _split(weights, has_biases, directions)
    dAs, dh0s, dw_hhs = [], [], []
    for d, w in enumerate(ws):
        cols = slice(d * hidden, (d + 1) * hidden)
        out_d, dH, dhn, h0 = out_rows[:, cols], grad_rows[:, cols], grad_h_n[d], hx[d]
        dA: List[Optional[Tensor]] = [None] * steps
        prev: List[Optional[Tensor]] = [None] * steps
        if d == 0:
            carry = None
            for t in reversed(range(steps)):
                cont = bs[t + 1]
                extra = [dhn[cont:bs[t]]]
                if carry is not None:
                    extra.insert(0, carry @ w[1])
                g = dH[off[t]:off[t] + bs[t]] + torch.cat(extra, 0)
                carry = dA[t] = _act_grad(g, out_d[off[t]:off[t] + bs[t]], relu)
                prev[t] = h0[:bs[t]] if t == 0 else out_d[off[t - 1]:off[t - 1] + bs[t]]
            dh0 = dA[0] @ w[1] if steps else dhn
        else:
            carry = None
            pieces = []
            for t in range(steps):
                g = dH[off[t]:off[t] + bs[t]]
                g = g + (dhn[:bs[t]] if carry is None else carry[:bs[t]] @ w[1])
                carry = dA[t] = _act_grad(g, out_d[off[t]:off[t] + bs[t]], relu)
                cont = bs[t + 1]
                pieces.append(carry[cont:] @ w[1])
                prev[t] = torch.cat([out_d[off[t + 1]:off[t + 1] + cont], h0[cont:bs[t]]], 0)
            dh0 = torch.cat(pieces[::-1], 0) if steps else dhn
        dA_d = torch.cat(dA, 0) if steps else dH
        dAs.append(dA_d)
        dh0s.append(dh0)
        dw_hhs.append(dA_d.t() @ torch.cat(prev, 0) if steps else w[1] * 0)
    dA_all = torch.cat(dAs, 1)
    need_input, need_hx, need_weights = output_mask
    grad_input = (dA_all @ torch.cat([w[0] for w in ws], 0)).reshape(input.shape) \
        if need_input else input.new_empty(0)
    grad_hx = torch.stack(dh0s, 0) if need_hx else hx.new_empty(0)
    grad_weights: List[Tensor] = []
    if need_weights:
        for d, w in enumerate(ws):
            dA_d = dAs[d]
            grad_weights += [dA_d.t() @ rows, dw_hhs[d]]
            if has_biases:
                db = dA_d.sum(0)
                grad_weights += [db, db.clone()]
    return grad_input, grad_hx, grad_weights


def _layer_slices(hx: Tensor, weights: Sequence[Tensor], has_biases: bool, num_layers: int):
    """(hx rows, weights) of each layer of a stack: hx is (num_layers·D, B, H), weights nn.RNN's
    order (layer-major, then direction)."""
    directions = hx.size(0) // num_layers
    per_layer = directions * (4 if has_biases else 2)
    return [(hx[l * directions:(l + 1) * directions],
             list(weights[l * per_layer:(l + 1) * per_layer])) for l in range(num_layers)]


def rnn_forward(input: Tensor, hx: Tensor, weights: Sequence[Tensor],
                batch_sizes: Optional[Tensor], relu: bool, has_biases: bool,
                num_layers: int) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """A stack of layers: (output, h_n, outputs of every layer but the last)."""
    layer_input, hns, hidden = input, [], []
    for hx_l, w_l in _layer_slices(hx, weights, has_biases, num_layers):
        out, hn = rnn_layer_forward(layer_input, hx_l, w_l, batch_sizes, relu, has_biases)
        hns.append(hn)
        hidden.append(out)
        layer_input = out
    return layer_input, torch.cat(hns, 0), hidden[:-1]


def rnn_backward(grad_output: Tensor, grad_h_n: Tensor, input: Tensor, hx: Tensor,
                 weights: Sequence[Tensor], hidden_outputs: Sequence[Tensor], output: Tensor,
                 batch_sizes: Optional[Tensor], relu: bool, has_biases: bool, num_layers: int,
                 output_mask: Sequence[bool],
                 grad_hidden_outputs: Optional[Sequence[Optional[Tensor]]] = None,
                 layer_backward=rnn_layer_backward) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """The backward of rnn_forward, layer by layer from the top, with layer_backward (this
    module's, or the one-layer op). grad_hidden_outputs: gradients of the layers' own outputs, if
    any (second-order passes send them), added to the one coming down from the layer above."""
    layers = _layer_slices(hx, weights, has_biases, num_layers)
    directions = hx.size(0) // num_layers
    outputs = list(hidden_outputs) + [output]
    inputs = [input] + list(hidden_outputs)
    grad, grad_hx, grad_weights = grad_output, [], []
    for l in reversed(range(num_layers)):
        hx_l, w_l = layers[l]
        if grad_hidden_outputs is not None and l < num_layers - 1 \
                and grad_hidden_outputs[l] is not None:
            grad = grad + grad_hidden_outputs[l]
        mask = [l > 0 or output_mask[0], output_mask[1], output_mask[2]]
        grad, ghx, gw = layer_backward(
            grad, grad_h_n[l * directions:(l + 1) * directions], inputs[l], hx_l, w_l,
            outputs[l], batch_sizes, relu, has_biases, mask)
        grad_hx.insert(0, ghx)
        grad_weights[:0] = gw
    return (grad if output_mask[0] else input.new_empty(0),
            torch.cat(grad_hx, 0) if output_mask[1] else hx.new_empty(0), grad_weights)
