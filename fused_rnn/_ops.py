"""The fused_rnn ops: loading the native kernels, the pure-PyTorch fallback, fake kernels, autograd.

Four ops (schemas below, math in csrc/rnn_layer.h):
  fused_rnn::rnn_layer_forward   one layer, one or two directions, padded or packed input
  fused_rnn::rnn_layer_backward  its BPTT
  fused_rnn::rnn_forward         a stack of layers (what nn.RNN runs when no dropout is active)
  fused_rnn::rnn_backward        its backward, which owns the gradient passed between layers

The native extension (fused_rnn._C) defines them and registers C++ (and CUDA) kernels. Where it is
missing, the same schemas are defined here. Either way, every device without a native kernel gets the
pure-PyTorch kernels of _reference.py, so the ops always run. Autograd: the forward's backward calls
the backward op (the fused BPTT) — registered in C++ by the extension (csrc/autograd.cpp, which keeps
the per-call cost of a one-step call low), here when it is missing; the backward op's own backward
differentiates the reference backward, which is what second-order gradients run.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, ContextManager, Iterator, List, Optional

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
STACK_FORWARD_SCHEMA = (
    "rnn_forward(Tensor input, Tensor hx, Tensor[] weights, Tensor? batch_sizes, bool relu, "
    "bool has_biases, int num_layers) -> (Tensor output, Tensor h_n, Tensor[] hidden_outputs)"
)
STACK_BACKWARD_SCHEMA = (
    "rnn_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor hx, "
    "Tensor[] weights, Tensor[] hidden_outputs, Tensor output, Tensor? batch_sizes, bool relu, "
    "bool has_biases, int num_layers, bool[3] output_mask) -> (Tensor grad_input, "
    "Tensor grad_hx, Tensor[] grad_weights)"
)
FORWARD = "fused_rnn::rnn_layer_forward"
BACKWARD = "fused_rnn::rnn_layer_backward"
STACK_FORWARD = "fused_rnn::rnn_forward"
STACK_BACKWARD = "fused_rnn::rnn_backward"

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
    for _schema in (FORWARD_SCHEMA, BACKWARD_SCHEMA, STACK_FORWARD_SCHEMA, STACK_BACKWARD_SCHEMA):
        _def_lib.define(_schema)


def _reference_forward(input, hx, weights, batch_sizes, relu, has_biases):
    with torch.no_grad():
        return _reference.rnn_layer_forward(input, hx, weights, batch_sizes, relu, has_biases)


def _reference_backward(grad_output, grad_h_n, input, hx, weights, output, batch_sizes, relu,
                        has_biases, output_mask):
    with torch.no_grad():
        return _reference.rnn_layer_backward(grad_output, grad_h_n, input, hx, weights, output,
                                             batch_sizes, relu, has_biases, output_mask)


def _reference_stack_forward(input, hx, weights, batch_sizes, relu, has_biases, num_layers):
    with torch.no_grad():
        return _reference.rnn_forward(input, hx, weights, batch_sizes, relu, has_biases,
                                      num_layers)


def _reference_stack_backward(grad_output, grad_h_n, input, hx, weights, hidden_outputs, output,
                              batch_sizes, relu, has_biases, num_layers, output_mask):
    with torch.no_grad():
        return _reference.rnn_backward(grad_output, grad_h_n, input, hx, weights, hidden_outputs,
                                       output, batch_sizes, relu, has_biases, num_layers,
                                       output_mask)


# Devices with no native kernel (CUDA when the build had no nvcc, everything when _C is missing) get
# the reference kernels. Backend-specific kernels from _C take precedence over these.
_impl_lib = torch.library.Library("fused_rnn", "IMPL")
_impl_lib.impl("rnn_layer_forward", _reference_forward, "CompositeExplicitAutograd")
_impl_lib.impl("rnn_layer_backward", _reference_backward, "CompositeExplicitAutograd")
_impl_lib.impl("rnn_forward", _reference_stack_forward, "CompositeExplicitAutograd")
_impl_lib.impl("rnn_backward", _reference_stack_backward, "CompositeExplicitAutograd")


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
def _temporarily(get: Callable[[], Any], set_: Callable[[Any], None], value: Any) -> Iterator[None]:
    """A process-wide setting at `value` inside the block, restored after it."""
    previous = get()
    set_(value)
    try:
        yield
    finally:
        set_(previous)


def persistent_rows(rows: int) -> ContextManager[None]:
    """Restrict the persistent kernel to `rows` rows of W_hh per block (8, 16 or 32; 0 = the
    planner's choice) inside the block, so that tests run each kernel variant at small sizes.
    Where no block of that size fits, auto takes a per-step path and forced persistent raises."""
    if _C is None:
        return contextlib.nullcontext()
    return _temporarily(_C.get_persistent_rows, _C.set_persistent_rows, rows)


def last_cuda_paths() -> dict:
    """The paths the latest CUDA recurrences ran on, after any fallback: {"forward": ...,
    "backward": ...}, each "" until one has run (benchmarks and tests read it)."""
    if _C is None:
        return {"forward": "", "backward": ""}
    forward, backward, _, _ = _C.last_cuda_paths()
    return {"forward": forward, "backward": backward}


def last_cuda_rows_per_block() -> dict:
    """The persistent kernel's rows per block in the latest CUDA recurrences: {"forward": R,
    "backward": R}, 0 where a per-step path ran (or none has run)."""
    if _C is None:
        return {"forward": 0, "backward": 0}
    _, _, forward, backward = _C.last_cuda_paths()
    return {"forward": forward, "backward": backward}


_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}


def device_cuda_plan(hidden: int, batch: int, directions: int, dtype: torch.dtype,
                     backward: bool = False, device: "int | str | torch.device | None" = None,
                     forced: str = "auto") -> dict:
    """The plan the CUDA kernels make for a layer on a real GPU (its limits, the built kernels'
    registers): the same dict as plan_cuda_path. The runtime's co-residency check at launch still
    has the last word; last_cuda_paths says what ran. Needs a CUDA build and a GPU."""
    if _C is None:
        raise RuntimeError("fused_rnn: the native extension is not loaded")
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {dtype}")
    if isinstance(device, bool):
        raise TypeError(f"device must be a CUDA device, an index or None, got {device!r}")
    dev = torch.device("cuda", device) if isinstance(device, int) else \
        torch.device("cuda") if device is None else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"device_cuda_plan plans for a CUDA device, got {dev}")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    path, rows, blocks, threads, smem = _C.device_cuda_plan(
        hidden, batch, directions, _DTYPE_NAMES[dtype], backward, index, forced)
    return {"path": path, "rows_per_block": rows, "blocks_per_direction": blocks,
            "threads": threads, "smem_bytes": smem}


def cuda_path(path: str) -> ContextManager[None]:
    """Context manager form of set_cuda_path, restoring the previous setting."""
    return _temporarily(get_cuda_path, set_cuda_path, path)


def plan_cuda_path(hidden: int, batch: int, directions: int, dtype: torch.dtype,
                   props: dict, forced: str = "auto", rows_per_block: int = 0) -> dict:
    """The CUDA path the extension picks for a layer, from device properties given as a dict with
    sm_count, smem_per_sm, smem_per_block_optin, max_threads_per_sm, regs_per_sm, and optionally
    regs_per_thread of the persistent kernel (an int, or a dict by rows per block 8/16/32), real or
    made up: no GPU is needed; rows_per_block restricts the persistent blocks as persistent_rows
    does (0: any). Returns path, rows_per_block, blocks_per_direction, threads, smem_bytes."""
    if _C is None:
        raise RuntimeError("fused_rnn: the native extension is not loaded")
    elem = torch.empty(0, dtype=dtype).element_size()
    regs = props.get("regs_per_thread", 0)
    if isinstance(regs, int):
        regs = {8: regs, 16: regs, 32: regs}
    path, rows, blocks, threads, smem = _C.plan_cuda_path(
        hidden, batch, directions, elem, props["sm_count"], props["smem_per_sm"],
        props["smem_per_block_optin"], props["max_threads_per_sm"], props["regs_per_sm"],
        regs.get(8, 0), regs.get(16, 0), regs.get(32, 0), forced, rows_per_block)
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


@torch.library.register_fake(STACK_FORWARD)
def _stack_forward_fake(input, hx, weights, batch_sizes, relu, has_biases, num_layers):
    torch._check(num_layers >= 1, lambda: f"num_layers must be at least 1, got {num_layers}")
    torch._check(hx.dim() == 3, lambda: f"hx must be 3-D, got {hx.dim()}-D")
    directions = hx.size(0) // num_layers
    torch._check(hx.size(0) == directions * num_layers,
                 lambda: f"hx.size(0) ({hx.size(0)}) must be a multiple of num_layers")
    hidden = hx.size(2)
    per = 4 if has_biases else 2
    torch._check(len(weights) == num_layers * directions * per,
                 lambda: f"expected {num_layers * directions * per} weights, got {len(weights)}")
    torch._check(input.dim() == (2 if batch_sizes is not None else 3),
                 lambda: f"input of rank {input.dim()} does not match batch_sizes")
    shape = (*input.shape[:-1], directions * hidden)
    output = input.new_empty(shape)
    return output, hx.new_empty(hx.shape), [input.new_empty(shape) for _ in range(num_layers - 1)]


@torch.library.register_fake(STACK_BACKWARD)
def _stack_backward_fake(grad_output, grad_h_n, input, hx, weights, hidden_outputs, output,
                         batch_sizes, relu, has_biases, num_layers, output_mask):
    return _backward_fake(grad_output, grad_h_n, input, hx, weights, output, batch_sizes, relu,
                          has_biases, output_mask)


# ----------------------------------------------------------------------------------------------
# Autograd.


def _zeros_for_none(grad_output, grad_h_n, output, hx):
    """Zeros for the output gradients autograd did not send."""
    return (torch.zeros_like(output) if grad_output is None else grad_output,
            torch.zeros_like(hx) if grad_h_n is None else grad_h_n)


def _input_grads(mask, grad_input, grad_hx, grad_weights, n_weights, non_tensor_args):
    """A forward op's backward result: gradients of input, hx and weights where mask asked for
    them, then None for the non-tensor arguments (batch_sizes, relu, ...)."""
    need_input, need_hx, need_weights = mask
    return (grad_input if need_input else None, grad_hx if need_hx else None,
            list(grad_weights) if need_weights else [None] * n_weights,
            *([None] * non_tensor_args))


def _forward_setup_context(ctx, inputs, output):
    input, hx, weights, batch_sizes, relu, has_biases = inputs
    ctx.save_for_backward(input, hx, output[0], *weights)
    ctx.batch_sizes = batch_sizes
    ctx.relu = relu
    ctx.has_biases = has_biases
    ctx.mask = [input.requires_grad, hx.requires_grad, any(w.requires_grad for w in weights)]


def _forward_backward(ctx, grad_output, grad_h_n):
    input, hx, output, *weights = ctx.saved_tensors
    grad_output, grad_h_n = _zeros_for_none(grad_output, grad_h_n, output, hx)
    grads = torch.ops.fused_rnn.rnn_layer_backward(
        grad_output, grad_h_n, input, hx, weights, output, ctx.batch_sizes, ctx.relu,
        ctx.has_biases, ctx.mask)
    return _input_grads(ctx.mask, *grads, len(weights), non_tensor_args=3)


if _C is None:  # the extension registers the forward ops' autograd in C++ (csrc/autograd.cpp)
    torch.library.register_autograd(FORWARD, _forward_backward,
                                    setup_context=_forward_setup_context)


def _stack_forward_setup_context(ctx, inputs, output):
    input, hx, weights, batch_sizes, relu, has_biases, num_layers = inputs
    _, _, hidden_outputs = output
    # No zeros are materialised for outputs without a gradient: the layers' outputs rarely get one
    # (only second-order passes and direct callers of the op use them) and can be most of the
    # memory.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, hx, output[0], *weights, *hidden_outputs)
    ctx.n_weights = len(weights)
    ctx.args = (batch_sizes, relu, has_biases, num_layers)
    ctx.mask = [input.requires_grad, hx.requires_grad, any(w.requires_grad for w in weights)]


def _stack_forward_backward(ctx, grad_output, grad_h_n, grad_hidden_outputs):
    input, hx, output, *rest = ctx.saved_tensors
    weights, hidden_outputs = rest[:ctx.n_weights], rest[ctx.n_weights:]
    batch_sizes, relu, has_biases, num_layers = ctx.args
    grad_output, grad_h_n = _zeros_for_none(grad_output, grad_h_n, output, hx)
    if any(g is not None for g in grad_hidden_outputs):
        # Second-order passes send gradients for the layers' outputs too: layer by layer.
        grads = _reference.rnn_backward(
            grad_output, grad_h_n, input, hx, weights, hidden_outputs, output, batch_sizes, relu,
            has_biases, num_layers, ctx.mask, grad_hidden_outputs,
            layer_backward=torch.ops.fused_rnn.rnn_layer_backward)
    else:
        grads = torch.ops.fused_rnn.rnn_backward(
            grad_output, grad_h_n, input, hx, weights, hidden_outputs, output, batch_sizes, relu,
            has_biases, num_layers, ctx.mask)
    return _input_grads(ctx.mask, *grads, len(weights), non_tensor_args=4)


if _C is None:
    torch.library.register_autograd(STACK_FORWARD, _stack_forward_backward,
                                    setup_context=_stack_forward_setup_context)


def _reference_vjp(ctx, backward, output_mask, gg_input, gg_hx, gg_weights):
    """Second order: the vector-Jacobian product of a reference backward (differentiable), with
    respect to every tensor in ctx.saved_tensors; backward(leaves) computes (grad_input, grad_hx,
    grad_weights) from those leaves.

    The partial derivatives are taken with respect to detached copies of the saved tensors: autograd
    itself chains them through the graph (output, for one, depends on input through the forward).
    """
    if torch.is_grad_enabled():
        raise NotImplementedError(
            "fused_rnn: third and higher order gradients are not supported (second order is)")
    saved = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in saved]
        grad_input, grad_hx, grad_weights = backward(leaves)
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
            return [None] * len(leaves)
        return list(torch.autograd.grad(results, leaves, cotangents, allow_unused=True))


def _backward_setup_context(ctx, inputs, output):
    (grad_output, grad_h_n, input, hx, weights, out, batch_sizes, relu, has_biases,
     output_mask) = inputs
    ctx.save_for_backward(grad_output, grad_h_n, input, hx, out, *weights)
    ctx.args = (batch_sizes, relu, has_biases, list(output_mask))


def _backward_backward(ctx, gg_input, gg_hx, gg_weights):
    batch_sizes, relu, has_biases, output_mask = ctx.args

    def backward(leaves):
        grad_output, grad_h_n, input, hx, out, *weights = leaves
        return _reference.rnn_layer_backward(grad_output, grad_h_n, input, hx, weights, out,
                                             batch_sizes, relu, has_biases, output_mask)

    grads = _reference_vjp(ctx, backward, output_mask, gg_input, gg_hx, gg_weights)
    g_out, g_hn, g_in, g_hx, g_output, *g_w = grads
    return g_out, g_hn, g_in, g_hx, list(g_w), g_output, None, None, None, None


torch.library.register_autograd(BACKWARD, _backward_backward,
                                setup_context=_backward_setup_context)


def _stack_backward_setup_context(ctx, inputs, output):
    (grad_output, grad_h_n, input, hx, weights, hidden_outputs, out, batch_sizes, relu,
     has_biases, num_layers, output_mask) = inputs
    ctx.save_for_backward(grad_output, grad_h_n, input, hx, out, *weights, *hidden_outputs)
    ctx.n_weights = len(weights)
    ctx.args = (batch_sizes, relu, has_biases, num_layers, list(output_mask))


def _stack_backward_backward(ctx, gg_input, gg_hx, gg_weights):
    batch_sizes, relu, has_biases, num_layers, output_mask = ctx.args
    n = ctx.n_weights

    def backward(leaves):
        grad_output, grad_h_n, input, hx, out, *rest = leaves
        return _reference.rnn_backward(grad_output, grad_h_n, input, hx, rest[:n], rest[n:], out,
                                       batch_sizes, relu, has_biases, num_layers, output_mask)

    grads = _reference_vjp(ctx, backward, output_mask, gg_input, gg_hx, gg_weights)
    g_out, g_hn, g_in, g_hx, g_output, *rest = grads
    return (g_out, g_hn, g_in, g_hx, list(rest[:n]), list(rest[n:]), g_output, None, None, None,
            None, None)


torch.library.register_autograd(STACK_BACKWARD, _stack_backward_backward,
                                setup_context=_stack_backward_setup_context)


def rnn_layer(input: Tensor, hx: Tensor, weights: List[Tensor], batch_sizes: Optional[Tensor],
              relu: bool, has_biases: bool):
    """One layer (one or two directions) through the fused op: (output, h_n)."""
    return torch.ops.fused_rnn.rnn_layer_forward(input, hx, weights, batch_sizes, relu,
                                                 has_biases)


def rnn_stack(input: Tensor, hx: Tensor, weights: List[Tensor], batch_sizes: Optional[Tensor],
              relu: bool, has_biases: bool, num_layers: int):
    """num_layers layers through the fused stack op: (output, h_n)."""
    output, h_n, _ = torch.ops.fused_rnn.rnn_forward(input, hx, weights, batch_sizes, relu,
                                                     has_biases, num_layers)
    return output, h_n
