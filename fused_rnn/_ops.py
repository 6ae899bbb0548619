"""The fused_rnn ops: loading the native kernels, the pure-PyTorch fallback, fake kernels, autograd.

Two ops (schemas below, math in csrc/rnn_layer.h):
  fused_rnn::rnn_layer_forward   one layer, one or two directions, padded or packed input
  fused_rnn::rnn_layer_backward  its BPTT

The native extension (fused_rnn._C) defines them and registers C++ (and CUDA) kernels. Where it is
missing, the same schemas are defined here. Either way, every device without a native kernel gets the
pure-PyTorch kernels of _reference.py, so the ops always run. Autograd: the forward's backward calls
rnn_layer_backward (the fused BPTT); the backward op's own backward differentiates the reference
backward, which is what second-order gradients run.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, List, Optional, Sequence

import torch
from torch import Tensor

from . import _reference

FORWARD_SCHEMA = (
    "rnn_layer_forward(Tensor input, Tensor hx, Tensor[] weights, Tensor? batch_sizes, "
    "bool relu, bool has_biases) -> (Tensor output, Tensor h_n)"
)
BACKWARD_SCHEMA = (
    "rnn_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor hx, "
    "Tensor[] weights, Tensor output, Tensor? batch_sizes, bool relu, bool has_biases, "
    "bool[3] output_mask) -> (Tensor grad_input, Tensor grad_hx, Tensor[] grad_weights)"
)
FORWARD = "fused_rnn::rnn_layer_forward"
BACKWARD = "fused_rnn::rnn_layer_backward"

try:
    from . import _C  # noqa: F401  (loading it registers the ops and their native kernels)

    LOAD_ERROR: Optional[BaseException] = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = exc
    warnings.warn(
        f"fused_rnn: the native extension could not be loaded ({exc}); using the pure-PyTorch "
        "implementation, which is correct but not fast. Rebuild with `pip install "
        "--no-build-isolation .` against the installed torch.",
        RuntimeWarning,
        stacklevel=2,
    )
    _def_lib = torch.library.Library("fused_rnn", "DEF")
    _def_lib.define(FORWARD_SCHEMA)
    _def_lib.define(BACKWARD_SCHEMA)


def _reference_forward(input, hx, weights, batch_sizes, relu, has_biases):
    with torch.no_grad():
        return _reference.rnn_layer_forward(input, hx, weights, batch_sizes, relu, has_biases)


def _reference_backward(grad_output, grad_h_n, input, hx, weights, output, batch_sizes, relu,
                        has_biases, output_mask):
    with torch.no_grad():
        return _reference.rnn_layer_backward(grad_output, grad_h_n, input, hx, weights, output,
                                             batch_sizes, relu, has_biases, output_mask)


# Devices with no native kernel (CUDA when the build had no nvcc, everything when _C is missing) get
# the reference kernels. Backend-specific kernels from _C take precedence over these.
_impl_lib = torch.library.Library("fused_rnn", "IMPL")
_impl_lib.impl("rnn_layer_forward", _reference_forward, "CompositeExplicitAutograd")
_impl_lib.impl("rnn_layer_backward", _reference_backward, "CompositeExplicitAutograd")


def has_native_kernel(device_type: str) -> bool:
    """Whether the ops have a native (C++/CUDA) kernel for this device type ("cpu", "cuda", ...)."""
    if _C is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(FORWARD, key)


CUDA_PATHS = ("auto", "persistent", "per_step", "per_step_cublas")


def set_cuda_path(path: str) -> None:
    """Force the CUDA recurrence path for the whole process: "auto" (the heuristic), "persistent"
    (one cooperative launch, W_hh on-chip), "per_step" (one fused GEMM + activation launch per
    step) or "per_step_cublas" (cuBLAS GEMM + fused pointwise epilogue per step). For tests and
    benchmarks; "persistent" raises where it cannot run."""
    if path not in CUDA_PATHS:
        raise ValueError(f"CUDA path must be one of {CUDA_PATHS}, got {path!r}")
    if _C is not None:
        _C.set_cuda_path(path)


def get_cuda_path() -> str:
    return _C.get_cuda_path() if _C is not None else "auto"


@contextlib.contextmanager
def cuda_path(path: str) -> Iterator[None]:
    """Context manager form of set_cuda_path, restoring the previous setting."""
    previous = get_cuda_path()
    set_cuda_path(path)
    try:
        yield
    finally:
        set_cuda_path(previous)


def plan_cuda_path(hidden: int, batch: int, directions: int, dtype: torch.dtype,
                   props: dict, forced: str = "auto") -> dict:
    """The CUDA path the extension picks for a layer, from device properties given as a dict with
    sm_count, smem_per_sm, smem_per_block_optin, max_threads_per_sm, regs_per_sm, and optionally
    regs_per_thread of the persistent kernel (an int, or a dict by rows per block 8/16/32), real or
    made up: no GPU is needed. Returns path, rows_per_block, blocks_per_direction, threads,
    smem_bytes."""
    if _C is None:
        raise RuntimeError("fused_rnn: the native extension is not loaded")
    elem = torch.empty(0, dtype=dtype).element_size()
    regs = props.get("regs_per_thread", 0)
    if isinstance(regs, int):
        regs = {8: regs, 16: regs, 32: regs}
    path, rows, blocks, threads, smem = _C.plan_cuda_path(
        hidden, batch, directions, elem, props["sm_count"], props["smem_per_sm"],
        props["smem_per_block_optin"], props["max_threads_per_sm"], props["regs_per_sm"],
        regs.get(8, 0), regs.get(16, 0), regs.get(32, 0), forced)
    return {"path": path, "rows_per_block": rows, "blocks_per_direction": blocks,
            "threads": threads, "smem_bytes": smem}


# ----------------------------------------------------------------------------------------------
# Fake kernels: shapes only, for FakeTensor, torch.compile and torch.export.


@torch.library.register_fake(FORWARD)
def _forward_fake(input, hx, weights, batch_sizes, relu, has_biases):
    torch._check(hx.dim() == 3, lambda: f"hx must be 3-D, got {hx.dim()}-D")
    torch._check(input.dim() == (2 if batch_sizes is not None else 3),
                 lambda: f"input of rank {input.dim()} does not match batch_sizes")
    directions, _, hidden = hx.shape
    per = 4 if has_biases else 2
    torch._check(len(weights) == directions * per,
                 lambda: f"expected {directions * per} weights, got {len(weights)}")
    output = input.new_empty((*input.shape[:-1], directions * hidden))
    return output, hx.new_empty(hx.shape)


@torch.library.register_fake(BACKWARD)
def _backward_fake(grad_output, grad_h_n, input, hx, weights, output, batch_sizes, relu,
                   has_biases, output_mask):
    need_input, need_hx, need_weights = output_mask
    # The kernels return contiguous tensors whatever the layout of their arguments.
    grad_input = input.new_empty(input.shape) if need_input else input.new_empty(0)
    grad_hx = hx.new_empty(hx.shape) if need_hx else hx.new_empty(0)
    grad_weights = [w.new_empty(w.shape) for w in weights] if need_weights else []
    return grad_input, grad_hx, grad_weights


# ----------------------------------------------------------------------------------------------
# Autograd.


def _forward_setup_context(ctx, inputs, output):
    input, hx, weights, batch_sizes, relu, has_biases = inputs
    ctx.save_for_backward(input, hx, output[0], *weights)
    ctx.batch_sizes = batch_sizes
    ctx.relu = relu
    ctx.has_biases = has_biases
    ctx.mask = [input.requires_grad, hx.requires_grad, any(w.requires_grad for w in weights)]


def _forward_backward(ctx, grad_output, grad_h_n):
    input, hx, output, *weights = ctx.saved_tensors
    if grad_output is None:
        grad_output = torch.zeros_like(output)
    if grad_h_n is None:
        grad_h_n = torch.zeros_like(hx)
    grad_input, grad_hx, grad_weights = torch.ops.fused_rnn.rnn_layer_backward(
        grad_output, grad_h_n, input, hx, weights, output, ctx.batch_sizes, ctx.relu,
        ctx.has_biases, ctx.mask)
    need_input, need_hx, need_weights = ctx.mask
    return (
        grad_input if need_input else None,
        grad_hx if need_hx else None,
        list(grad_weights) if need_weights else [None] * len(weights),
        None,
        None,
        None,
    )


torch.library.register_autograd(FORWARD, _forward_backward, setup_context=_forward_setup_context)


def _backward_setup_context(ctx, inputs, output):
    (grad_output, grad_h_n, input, hx, weights, out, batch_sizes, relu, has_biases,
     output_mask) = inputs
    ctx.save_for_backward(grad_output, grad_h_n, input, hx, out, *weights)
    ctx.args = (batch_sizes, relu, has_biases, list(output_mask))


def _backward_backward(ctx, gg_input, gg_hx, gg_weights):
    """Second order: the vector-Jacobian product of the reference backward (differentiable).

    The partial derivatives are taken with respect to detached copies of the saved tensors: autograd
    itself chains them through the graph (output, for one, depends on input through the forward).
    """
    if torch.is_grad_enabled():
        raise NotImplementedError(
            "fused_rnn: third and higher order gradients are not supported (second order is)")
    saved = ctx.saved_tensors
    batch_sizes, relu, has_biases, output_mask = ctx.args
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in saved]
        grad_output, grad_h_n, input, hx, out, *weights = leaves
        grad_input, grad_hx, grad_weights = _reference.rnn_layer_backward(
            grad_output, grad_h_n, input, hx, weights, out, batch_sizes, relu, has_biases,
            output_mask)
        results: List[Tensor] = []
        cotangents: List[Tensor] = []
        for used, value, cot in ((output_mask[0], grad_input, gg_input),
                                 (output_mask[1], grad_hx, gg_hx)):
            if used and cot is not None:
                results.append(value)
                cotangents.append(cot)
        if output_mask[2] and gg_weights is not None:
            for value, cot in zip(grad_weights, gg_weights):
                if cot is not None:
                    results.append(value)
                    cotangents.append(cot)
        if not results:
            grads: Sequence[Optional[Tensor]] = [None] * len(leaves)
        else:
            grads = torch.autograd.grad(results, leaves, cotangents, allow_unused=True)
    g_out, g_hn, g_in, g_hx, g_output, *g_w = grads
    return g_out, g_hn, g_in, g_hx, list(g_w), g_output, None, None, None, None


torch.library.register_autograd(BACKWARD, _backward_backward,
                                setup_context=_backward_setup_context)


def rnn_layer(input: Tensor, hx: Tensor, weights: List[Tensor], batch_sizes: Optional[Tensor],
              relu: bool, has_biases: bool):
    """One layer (one or two directions) through the fused op: (output, h_n)."""
    return torch.ops.fused_rnn.rnn_layer_forward(input, hx, weights, batch_sizes, relu,
                                                 has_biases)
