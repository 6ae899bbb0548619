"""CUDA kernels against nn.RNN (cuDNN) and a float64 reference, on every path. Skip without a GPU.

float32 is compared with TF32 off on both sides (conftest); float16/bfloat16 are judged by the
reference's own error: ours against a float64 reference must be at most 2× cuDNN's on the same
inputs.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from fused_rnn import _ops

from conftest import assert_close, make_input, make_pair, requires_cuda, run_and_grad

pytestmark = [requires_cuda, pytest.mark.cuda]

PATHS = ["persistent", "per_step", "per_step_cublas"]
CASES = list(itertools.product(
    ["tanh", "relu"], [True, False], [False, True], [1, 2], ["padded", "packed", "unbatched"]))


@pytest.fixture(params=PATHS)
def path(request):
    with _ops.cuda_path(request.param):
        yield request.param


def test_cuda_kernels_are_native():
    assert fused_rnn.backend("cuda") == "fused"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_parity_every_path(path, case, dtype):
    nonlinearity, bias, bidirectional, layers, kind = case
    ref, fused = make_pair(5, 33, layers, nonlinearity, bias, False, 0.0, bidirectional,
                           dtype=dtype, device="cuda")
    gen = torch.Generator().manual_seed(7)
    x, leaves = make_input(kind, False, 9, 5, 5, dtype=dtype, device="cuda", gen=gen)
    d = 2 if bidirectional else 1
    shape = (layers * d, 33) if kind == "unbatched" else (layers * d, 5, 33)
    h0 = torch.randn(*shape, dtype=dtype, generator=gen).cuda().requires_grad_()
    o_ref, h_ref, g_ref = run_and_grad(ref, x, leaves, h0)
    o, h, g = run_and_grad(fused, x, leaves, h0)
    assert _ops.last_cuda_paths() == {"forward": path, "backward": path}  # no silent fallback
    assert_close(o, o_ref, dtype, "output")
    assert_close(h, h_ref, dtype, "h_n")
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert_close(a, b, dtype, f"gradient {i}")


def _to_cuda(value):
    if isinstance(value, torch.Tensor):
        return value.cuda()
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [v.cuda() for v in value]
    return value


def test_stack_ops_equal_the_chained_layer_ops_every_path(path):
    """The stack op's backward passes the gradient between layers in place on the GPU too: it must
    give the one-layer ops' results exactly, and match the float64 reference."""
    from test_ops import _stack_backward_args, stack_inputs

    from fused_rnn import _reference

    for args in stack_inputs():
        # batch_sizes stays on the CPU, as PackedSequence keeps it.
        args = tuple(a if i == 3 else _to_cuda(a) for i, a in enumerate(args))
        out, hn, hidden = torch.ops.fused_rnn.rnn_forward(*args)
        ref = _reference.rnn_forward(*args)
        for a, b in zip([out, hn, *hidden], [ref[0], ref[1], *ref[2]]):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
        bargs = tuple(a if i == 7 else _to_cuda(a)
                      for i, a in enumerate(_stack_backward_args(args, out, hn, hidden)))
        got = torch.ops.fused_rnn.rnn_backward(*bargs)
        want = _reference.rnn_backward(*bargs)
        chained = _reference.rnn_backward(
            *bargs, layer_backward=torch.ops.fused_rnn.rnn_layer_backward)
        for a, b, c in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]],
                           [chained[0], chained[1], *chained[2]]):
            torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)
            assert torch.equal(a, c)


@pytest.mark.parametrize("hidden", [1, 31, 64, 100, 257])
@pytest.mark.parametrize("batch", [1, 3, 70, 130])
def test_odd_sizes_every_path(path, hidden, batch):
    """Sizes that are not multiples of the tiles, batches above a warp count and a tile."""
    ref, fused = make_pair(6, hidden, 1, dtype=torch.float64, device="cuda", bidirectional=True)
    x = torch.randn(4, batch, 6, dtype=torch.float64, device="cuda")
    (o1, h1), (o2, h2) = ref(x), fused(x)
    assert_close(o2, o1, torch.float64)
    assert_close(h2, h1, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("packed", [False, True])
def test_half_types_within_twice_cudnn_error(path, dtype, packed):
    torch.manual_seed(0)
    ref64 = nn.RNN(32, 64, 2, bidirectional=True, dtype=torch.float64, device="cuda")
    cudnn = nn.RNN(32, 64, 2, bidirectional=True, dtype=dtype, device="cuda")
    fused = fused_rnn.RNN(32, 64, 2, bidirectional=True, dtype=dtype, device="cuda")
    cudnn.load_state_dict(ref64.state_dict())
    fused.load_state_dict(ref64.state_dict())
    x64 = torch.randn(50, 8, 32, dtype=torch.float64, device="cuda")
    lengths = torch.randint(1, 51, (8,))
    lengths[0] = 50

    def run(m, x):
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        out, hn = m(inp)
        return (out.data if packed else out).double(), hn.double()

    want_o, want_h = run(ref64, x64)
    cud_o, cud_h = run(cudnn, x64.to(dtype))
    our_o, our_h = run(fused, x64.to(dtype))
    for ours, theirs, want in ((our_o, cud_o, want_o), (our_h, cud_h, want_h)):
        err_ours = (ours - want).abs().max().item()
        err_cudnn = (theirs - want).abs().max().item()
        assert err_ours <= 2 * err_cudnn + 1e-6, (err_ours, err_cudnn)


@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck_every_path(path, packed):
    torch.manual_seed(0)
    m = fused_rnn.RNN(3, 5, 2, bidirectional=True, dtype=torch.float64, device="cuda")
    x = torch.randn(4, 3, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    h0 = torch.randn(4, 3, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    names = [n for n, _ in m.named_parameters()]

    def fn(x, h0, *ps):
        inp = pack_padded_sequence(x, [4, 2, 1]) if packed else x
        out, hn = torch.func.functional_call(m, dict(zip(names, ps)), (inp, h0))
        return (out.data if packed else out), hn

    ps = [p.detach().requires_grad_() for p in m.parameters()]
    assert torch.autograd.gradcheck(fn, (x, h0, *ps))
    assert torch.autograd.gradgradcheck(fn, (x, h0, *ps))


def test_long_sequence_every_path_agrees():
    _, fused = make_pair(16, 128, 1, dtype=torch.float32, device="cuda")
    x = torch.randn(2000, 4, 16, device="cuda")
    with _ops.cuda_path("persistent"):
        a = fused(x)[0]
    for other in ("per_step", "per_step_cublas"):
        with _ops.cuda_path(other):
            b = fused(x)[0]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_non_default_stream_and_device_guard():
    ref, fused = make_pair(8, 16, 2, dtype=torch.float64, device="cuda", bidirectional=True)
    x = torch.randn(7, 3, 8, dtype=torch.float64, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        o2, _ = fused(x)
    s.synchronize()
    assert_close(o2, ref(x)[0], torch.float64)
