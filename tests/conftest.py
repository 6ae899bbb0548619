"""Shared helpers: build an nn.RNN and a fused_rnn.RNN with identical weights, run both, compare."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_sequence

# The CPU GEMMs pack their right side only for input projections of 64 rows or more and for steps
# of sequences of 8 steps or more (cpu_gemm.h): the tests' small shapes would otherwise never reach
# the panel kernel. Packing from one row and one step keeps them on it; the default thresholds have
# their own tests (test_ops.py), which set these variables themselves.
os.environ.setdefault("FUSED_RNN_CPU_MIN_PACK_ROWS", "1")
os.environ.setdefault("FUSED_RNN_CPU_MIN_PACK_STEPS", "1")

import fused_rnn  # noqa: E402

# Tolerances of the parity contract (issue: float64 within 1e-10, float32 within 1e-5).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

HAS_CUDA = torch.cuda.is_available()
if HAS_CUDA:
    # Parity is judged in true float32 on both sides: no TF32 in cuDNN or in matmuls.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
# The GPU check sets this: there, a missing device or missing CUDA kernels must fail the run rather
# than skip every CUDA test (or test the pure-PyTorch fallback) and read as a pass.
if os.environ.get("FUSED_RNN_REQUIRE_CUDA") == "1":
    if not HAS_CUDA:
        raise RuntimeError("FUSED_RNN_REQUIRE_CUDA=1, but torch sees no CUDA device")
    if fused_rnn.backend("cuda") != "fused":
        raise RuntimeError("FUSED_RNN_REQUIRE_CUDA=1, but the extension has no CUDA kernels")
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def make_pair(*args, seed=0, device="cpu", dtype=torch.float64, **kwargs):
    """(nn.RNN, fused_rnn.RNN) built from the same seed: the same weights by construction."""
    torch.manual_seed(seed)
    ref = nn.RNN(*args, device=device, dtype=dtype, **kwargs)
    torch.manual_seed(seed)
    fused = fused_rnn.RNN(*args, device=device, dtype=dtype, **kwargs)
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), fused.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    return ref, fused


def make_input(kind, batch_first, steps, batch, size, *, dtype, device, gen=None):
    """(x, leaves): x is 'padded', 'packed' (variable lengths, unsorted) or 'unbatched'; leaves are
    the tensors that require grad and make x (the sequences, for a packed x)."""
    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, generator=gen).to(device)

    if kind == "padded":
        shape = (batch, steps, size) if batch_first else (steps, batch, size)
        x = randn(*shape).requires_grad_()
        return x, [x]
    if kind == "unbatched":
        x = randn(steps, size).requires_grad_()
        return x, [x]
    lengths = [steps] + [int(torch.randint(1, steps + 1, (1,), generator=gen)) for _ in range(batch - 1)]
    seqs = [randn(n, size).requires_grad_() for n in lengths]
    return pack_sequence(seqs, enforce_sorted=False), seqs


def output_tensor(out):
    return out.data if isinstance(out, PackedSequence) else out


def run_and_grad(module, x, leaves, h0, seed=123, functional_dtype=None):
    """Forward, then gradients of a random linear functional of (output, h_n) w.r.t. everything
    (h0 may be a tensor computed from a leaf: its gradient is then that tensor's). The functional
    is rounded to functional_dtype first where given (a float64 run standing in for a float32 one
    gets the float32 run's functional)."""
    out, hn = module(x, h0) if h0 is not None else module(x)
    o = output_tensor(out)
    g = torch.Generator(device="cpu").manual_seed(seed)

    def functional(shape, like):
        # Drawn in float64 and cast, so that runs in different dtypes get the same functional.
        f = torch.randn(shape, generator=g, dtype=torch.float64)
        return f.to(functional_dtype or like.dtype).to(like.device, like.dtype)

    go, gh = functional(o.shape, o), functional(hn.shape, hn)
    loss = (o * go).sum() + (hn * gh).sum()
    wrt = [p for p in module.parameters()]
    inputs = list(leaves) + ([h0] if h0 is not None else [])
    grads = torch.autograd.grad(loss, inputs + wrt, retain_graph=True)
    return o, hn, grads


def reference_grad(ref, x, leaves, h0, seed=123):
    """nn.RNN's side of a parity test: run_and_grad(ref, ...), except for a float32 nn.RNN on CUDA,
    which runs in float64 on the same inputs (upcast inside the graph, so the gradients reach the
    same float32 leaves), its results rounded to float32. cuDNN's float32 tanh on padded input is
    about 1e-4 off the float64 result (GPU check, H200, cuDNN 9.19, 2026-11-30: 9.5e-5 where our
    kernels are 3.5-4.1e-6 off, and cuDNN's packed path 2.3e-6), more than the float32 contract's
    1e-5: against cuDNN no kernel of float32 accuracy meets it. So on CUDA the float32 contract is
    judged against float64 truth, at the same tolerance. On the CPU, nn.RNN's float32 is the
    reference itself."""
    p = next(ref.parameters())
    if p.dtype != torch.float32 or p.device.type != "cuda":
        return run_and_grad(ref, x, leaves, h0, seed)
    ref64 = copy.deepcopy(ref).double()
    if isinstance(x, PackedSequence):
        x64 = PackedSequence(x.data.double(), x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    else:
        x64 = x.double()
    o, hn, grads = run_and_grad(ref64, x64, leaves, None if h0 is None else h0.double(), seed,
                                functional_dtype=torch.float32)
    return o.float(), hn.float(), tuple(t.float() for t in grads)


def assert_close(actual, expected, dtype, what=""):
    tol = TOL[dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")
