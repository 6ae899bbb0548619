"""Multi-layer orchestration above the one-layer op: layers, directions, dropout, dtypes.

Everything here works on time-major data: padded (T, B, I) or packed rows (N, I) with batch_sizes.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _ops, _reference

# Dtypes the fused kernels compute in; others take the differentiable reference path on the CPU,
# which gives nn.RNN's behaviour (same ops) for them.
_FUSED_CPU_DTYPES = (torch.float32, torch.float64)


def _fused(input: Tensor) -> bool:
    """Whether the fused ops run this call (else the differentiable reference does)."""
    return (not input.is_cpu or input.dtype in _FUSED_CPU_DTYPES) and not _under_transform()


# Private torch APIs (present from torch 2.0 to at least 2.14), looked up once; should a later torch
# drop one, the transforms would reach the fused ops again and tests/test_ecosystem.py fails.
_peek_functorch = getattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)


def _under_transform() -> bool:
    """Inside a torch.func transform (grad, vmap, jvp, jacrev, ...) or a forward-mode AD level
    (torch.autograd.forward_ad.dual_level). The fused ops have no batching rule and no forward
    derivative: vmap and func.grad refused them, and func.jvp returned zero tangents without a
    word. The reference path is ATen ops, which every transform understands, as nn.RNN's are."""
    if torch.compiler.is_compiling():
        return False
    return (_peek_functorch() is not None
            or getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0)


def _needs_grad(input: Tensor, hx: Tensor, weights: Sequence[Tensor]) -> bool:
    return torch.is_grad_enabled() and (
        input.requires_grad or hx.requires_grad or any(w.requires_grad for w in weights))


def _layer(input: Tensor, hx: Tensor, weights: List[Tensor], batch_sizes: Optional[Tensor],
           relu: bool, has_biases: bool, fused: bool) -> Tuple[Tensor, Tensor]:
    if not fused:
        return _reference.rnn_layer_forward(input, hx, weights, batch_sizes, relu, has_biases)
    return _ops.rnn_layer(input, hx, weights, batch_sizes, relu, has_biases)


# Without autograd the per-layer ops hold less than the stack op: each layer's output is freed once
# the next layer has read it, where the stack op returns every layer's. The difference, layers
# 0 .. L − 3 kept to the end (none for one or two layers), is allowed up to this many elements
# (1 MiB in float32; a decoder's one-step calls stay far below it).
_STACK_EXTRA_ELEMENTS = 1 << 18


def _stack_memory_is_small(input: Tensor, hx: Tensor, num_layers: int) -> bool:
    if num_layers <= 2:
        return True
    rows = input.numel() // max(input.size(-1), 1)
    per_layer = rows * (hx.size(0) // num_layers) * hx.size(-1)
    return (num_layers - 2) * per_layer <= _STACK_EXTRA_ELEMENTS


def rnn(input: Tensor, hx: Tensor, weights: Sequence[Sequence[Tensor]],
        batch_sizes: Optional[Tensor], relu: bool, has_biases: bool, num_layers: int,
        dropout: float, train: bool, bidirectional: bool) -> Tuple[Tensor, Tensor]:
    """A stack of Elman RNN layers.

    Args:
        input: padded (T, B, I) or, with batch_sizes, packed rows (N, I).
        hx: (num_layers · D, B, H) initial hidden state.
        weights: per layer and direction, [w_ih, w_hh] or [w_ih, w_hh, b_ih, b_hh]
            (nn.RNN's ``all_weights`` order).
        batch_sizes: PackedSequence.batch_sizes, or None for padded input.
        relu: ReLU instead of tanh.
        dropout, train: dropout on each layer's output but the last, in training (as nn.RNN).

    Returns:
        (output, h_n): output (T, B, D·H) or (N, D·H); h_n like hx.
    """
    return _rnn_flat(input, hx, [w for ws in weights for w in ws], batch_sizes, relu, has_biases,
                    num_layers, dropout, train, bidirectional)


def _rnn_flat(input: Tensor, hx: Tensor, weights: List[Tensor], batch_sizes: Optional[Tensor],
              relu: bool, has_biases: bool, num_layers: int, dropout: float, train: bool,
              bidirectional: bool) -> Tuple[Tensor, Tensor]:
    """rnn() with the weights as one flat list, layer by layer and direction by direction (nn.RNN's
    ``_flat_weights``): what the module holds and the stack op takes, so a call builds no lists."""
    dropout_active = dropout != 0 and train and num_layers > 1
    fused = _fused(input)
    if not dropout_active and fused and (
            _stack_memory_is_small(input, hx, num_layers) or _needs_grad(input, hx, weights)):
        # One op for the whole stack: its backward passes the gradient between layers in place, and
        # it is one call (a decoder's one-step calls are mostly per-call overhead).
        return _ops.rnn_stack(input, hx, weights, batch_sizes, relu, has_biases, num_layers)
    directions = 2 if bidirectional else 1
    per_layer = directions * (4 if has_biases else 2)
    layer_input = input
    h_n = []
    for layer in range(num_layers):
        hx_layer = hx[layer * directions:(layer + 1) * directions]
        layer_weights = weights[layer * per_layer:(layer + 1) * per_layer]
        output, hn = _layer(layer_input, hx_layer, layer_weights, batch_sizes, relu, has_biases,
                            fused)
        h_n.append(hn)
        if dropout != 0 and train and layer < num_layers - 1:
            # Where and how nn.RNN applies it (at::dropout on the layer's output), so the same seed
            # draws the same mask.
            output = torch.dropout(output, dropout, True)
        layer_input = output
    return layer_input, torch.cat(h_n, 0)
