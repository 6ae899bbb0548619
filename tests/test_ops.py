"""The ops themselves: schemas, registration, opcheck, argument checks, both GEMM paths, fallback."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import fused_rnn
from fused_rnn import _ops, _reference

from conftest import ROOT, assert_close, make_input, make_pair, run_and_grad

native = pytest.mark.skipif(_ops._C is None, reason="native extension not built")


def layer_weights(directions, input_size, hidden, has_biases, g, dtype):
    """Random weights of one layer in the ops' order, scaled to a well-conditioned recurrence."""
    ws = []
    for _ in range(directions):
        ws += [torch.randn(hidden, input_size, generator=g, dtype=dtype) * 0.4,
               torch.randn(hidden, hidden, generator=g, dtype=dtype) * 0.4]
        if has_biases:
            ws += [torch.randn(hidden, generator=g, dtype=dtype) * 0.1 for _ in range(2)]
    return ws


def sample_inputs(dtype=torch.float64, requires_grad=True, hidden=6, lengths=(5, 3, 2)):
    """(args) tuples for rnn_layer_forward: padded and packed, 1 and 2 directions, with and without
    biases, tanh and relu. Padded input has len(lengths) sequences of max(lengths) steps."""
    g = torch.Generator().manual_seed(0)
    T, B, I, H = max(lengths), len(lengths), 4, hidden
    out = []
    for packed in (False, True):
        for D in (1, 2):
            for has_biases in (True, False):
                for relu in (False, True):
                    if packed:
                        seqs = [torch.randn(n, I, generator=g, dtype=dtype) for n in lengths]
                        p = pack_sequence(seqs)
                        x, bs = p.data, p.batch_sizes
                    else:
                        x, bs = torch.randn(T, B, I, generator=g, dtype=dtype), None
                    hx = torch.randn(D, B, H, generator=g, dtype=dtype)
                    ws = layer_weights(D, I, H, has_biases, g, dtype)
                    if requires_grad:
                        for t in [x, hx, *ws]:
                            t.requires_grad_()
                    out.append((x, hx, ws, bs, relu, has_biases))
    return out


@native
def test_native_schemas_match_the_fallback_definitions():
    fwd = str(torch.ops.fused_rnn.rnn_layer_forward.default._schema)
    bwd = str(torch.ops.fused_rnn.rnn_layer_backward.default._schema)
    assert fwd == "fused_rnn::" + _ops.FORWARD_SCHEMA
    assert bwd == "fused_rnn::" + _ops.BACKWARD_SCHEMA
    assert str(torch.ops.fused_rnn.rnn_forward.default._schema) == \
        "fused_rnn::" + _ops.STACK_FORWARD_SCHEMA
    assert str(torch.ops.fused_rnn.rnn_backward.default._schema) == \
        "fused_rnn::" + _ops.STACK_BACKWARD_SCHEMA


@native
def test_native_kernels_are_registered():
    assert fused_rnn.backend("cpu") == "fused"
    # The CUDA kernels are registered exactly when the build compiled them.
    assert _ops.has_native_kernel("cuda") == _ops._C.has_cuda_kernels()


@pytest.mark.parametrize("args", sample_inputs(), ids=lambda a: None)
def test_opcheck_forward(args):
    torch.library.opcheck(torch.ops.fused_rnn.rnn_layer_forward.default, args)


@pytest.mark.parametrize("args", sample_inputs(requires_grad=False)[::3])
def test_opcheck_backward(args):
    x, hx, ws, bs, relu, has_biases = args
    out, hn = torch.ops.fused_rnn.rnn_layer_forward(*args)
    bargs = (torch.randn_like(out), torch.randn_like(hn), x, hx, ws, out, bs, relu, has_biases,
             [True, True, True])
    torch.library.opcheck(torch.ops.fused_rnn.rnn_layer_backward.default, bargs)


@pytest.mark.parametrize("args", sample_inputs(requires_grad=False))
def test_native_kernels_equal_the_reference(args):
    out, hn = torch.ops.fused_rnn.rnn_layer_forward(*args)
    ref_out, ref_hn = _reference.rnn_layer_forward(*args)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(hn, ref_hn, atol=1e-12, rtol=1e-12)
    x, hx, ws, bs, relu, has_biases = args
    go, gh = torch.randn_like(out), torch.randn_like(hn)
    got = torch.ops.fused_rnn.rnn_layer_backward(go, gh, x, hx, ws, out, bs, relu, has_biases,
                                                 [True, True, True])
    want = _reference.rnn_layer_backward(go, gh, x, hx, ws, out, bs, relu, has_biases,
                                         [True, True, True])
    torch.testing.assert_close(got[0], want[0], atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(got[1], want[1], atol=1e-11, rtol=1e-11)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)


def test_backward_output_mask_skips_work():
    x, hx, ws, bs, relu, has_biases = sample_inputs(requires_grad=False)[0]
    out, hn = torch.ops.fused_rnn.rnn_layer_forward(x, hx, ws, bs, relu, has_biases)
    gi, ghx, gw = torch.ops.fused_rnn.rnn_layer_backward(
        torch.ones_like(out), torch.ones_like(hn), x, hx, ws, out, bs, relu, has_biases,
        [False, True, False])
    assert gi.numel() == 0 and len(gw) == 0 and ghx.shape == hx.shape


def _float32_ulps():
    """Float32 values spread over every binade from the subnormals to 12 (every 997th bit pattern),
    both signs, with dense runs where an approximation of tanh is likeliest to go wrong: below 1
    (where formulas built on e^{2x} cancel, and where our kernel switches formula) and in the tail
    short of saturation."""
    bits = torch.arange(0, 0x41400000, 997, dtype=torch.int64).to(torch.int32)
    spread = bits.view(torch.float32)
    dense = torch.cat([torch.linspace(0.15, 1, 100001), torch.linspace(6, 10.5, 100001)])
    pos = torch.cat([spread, dense, torch.tensor([1e-30, 1e-45, 3.4e38])])
    return torch.cat([pos, -pos])


def _activation_through_op(x, relu):
    """act(x) computed by the forward op: W_hh = 0, no biases and W_ih = 1 make every output row
    act of its input alone (one step, one row of the batch per value)."""
    n = x.numel()
    ws = [torch.ones(1, 1), torch.zeros(1, 1)]
    out, _ = torch.ops.fused_rnn.rnn_layer_forward(x.reshape(1, n, 1), torch.zeros(1, n, 1), ws,
                                                   None, relu, False)
    return out.reshape(-1)


@pytest.mark.parametrize("relu", [False, True])
def test_float32_activation_accuracy(relu):
    """float32 act against float64, in float32 ulps of the exact value: relu exact, tanh within 1.25
    (over every float, tools/tanh_error.py: 1.04 with FMA contraction, 1.14 without; the kernel
    before it, 6.3). ±inf and NaN come out as torch's do. (Signed zeros cannot be told apart here:
    the step adds h · W_hhᵀ = +0 to the pre-activation, as nn.RNN does.)"""
    x = _float32_ulps()
    got = _activation_through_op(x, relu).double()
    want = torch.relu(x.double()) if relu else torch.tanh(x.double())
    # One ulp of the float32 nearest `want`: 2^(e - 24) for want = m·2^e, m in [0.5, 1); the
    # subnormal spacing below the normal range.
    _, e = torch.frexp(want.float().double())
    ulp = torch.ldexp(torch.ones_like(want), (e - 24).clamp_min(-149))
    err = (got - want).abs() / ulp
    bound = 0.0 if relu else 1.25
    worst = int(err.argmax())
    assert err.max().item() <= bound, \
        f"{err.max().item():.2f} ulp at x = {x[worst].item()!r}: {got[worst].item()!r}"
    inf = float("inf")
    special = _activation_through_op(torch.tensor([float("nan"), inf, -inf]), relu)
    assert torch.isnan(special[0])
    assert special[1:].tolist() == ([inf, 0.0] if relu else [1.0, -1.0])


def stack_inputs(dtype=torch.float64):
    """(args) tuples for rnn_forward: 1 to 3 layers, padded and packed, 1 and 2 directions, with and
    without biases (tanh and relu alternate)."""
    g = torch.Generator().manual_seed(1)
    I, H, B = 4, 5, 3
    out = []
    for layers in (1, 2, 3):
        for packed in (False, True):
            for D in (1, 2):
                for has_biases in (True, False):
                    relu = (layers + D) % 2 == 1
                    if packed:
                        p = pack_sequence([torch.randn(n, I, generator=g, dtype=dtype)
                                           for n in (4, 4, 1)])
                        x, bs = p.data, p.batch_sizes
                    else:
                        x, bs = torch.randn(4, B, I, generator=g, dtype=dtype), None
                    hx = torch.randn(layers * D, B, H, generator=g, dtype=dtype)
                    ws = []
                    for layer in range(layers):
                        isize = I if layer == 0 else D * H
                        for _ in range(D):
                            ws += [torch.randn(H, isize, generator=g, dtype=dtype) * 0.4,
                                   torch.randn(H, H, generator=g, dtype=dtype) * 0.4]
                            if has_biases:
                                ws += [torch.randn(H, generator=g, dtype=dtype) * 0.1
                                       for _ in range(2)]
                    out.append((x, hx, ws, bs, relu, has_biases, layers))
    return out


def _stack_backward_args(args, out, hn, hidden, mask=(True, True, True)):
    x, hx, ws, bs, relu, has_biases, layers = args
    g = torch.Generator().manual_seed(2)
    go = torch.randn(out.shape, generator=g, dtype=out.dtype)
    gh = torch.randn(hn.shape, generator=g, dtype=hn.dtype)
    return (go, gh, x, hx, ws, hidden, out, bs, relu, has_biases, layers, list(mask))


@pytest.mark.parametrize("args", stack_inputs()[::2])
def test_opcheck_stack_ops(args):
    torch.library.opcheck(torch.ops.fused_rnn.rnn_forward.default, args)
    out, hn, hidden = torch.ops.fused_rnn.rnn_forward(*args)
    torch.library.opcheck(torch.ops.fused_rnn.rnn_backward.default,
                          _stack_backward_args(args, out, hn, hidden))


@pytest.mark.parametrize("mask", [(True, True, True), (False, True, False), (True, False, True),
                                  (False, False, True)])
@pytest.mark.parametrize("args", stack_inputs())
def test_stack_ops_equal_the_reference_and_the_layer_ops(args, mask):
    """The stack ops against _reference (1e-11), and bitwise against the one-layer ops chained:
    passing the gradient between layers in place must change nothing."""
    x, hx, ws, bs, relu, has_biases, layers = args
    out, hn, hidden = torch.ops.fused_rnn.rnn_forward(*args)
    ref = _reference.rnn_forward(*args)
    for a, b in zip([out, hn, *hidden], [ref[0], ref[1], *ref[2]]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert len(hidden) == layers - 1
    bargs = _stack_backward_args(args, out, hn, hidden, mask)
    got = torch.ops.fused_rnn.rnn_backward(*bargs)
    want = _reference.rnn_backward(*bargs)
    chained = _reference.rnn_backward(*bargs, layer_backward=torch.ops.fused_rnn.rnn_layer_backward)
    assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
    assert len(got[2]) == len(want[2]) == (len(ws) if mask[2] else 0)
    for a, b, c in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]],
                       [chained[0], chained[1], *chained[2]]):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)
        assert torch.equal(a, c)
    # The caller's gradient is left as it was.
    assert torch.equal(bargs[0], _stack_backward_args(args, out, hn, hidden)[0])


STACK_BAD_ARGS = [
    ("num_layers must be at least 1", lambda a: a[:6] + (0,)),
    ("must be num_layers", lambda a: (a[0], a[1][:1]) + a[2:]),
    ("expected 16 weights", lambda a: (a[0], a[1], a[2][:-1]) + a[3:]),
    ("expected w_ih of size", lambda a: (a[0], a[1], a[2][8:] + a[2][:8]) + a[3:]),
]


@native
@pytest.mark.parametrize("needle,mutate", STACK_BAD_ARGS, ids=[b[0] for b in STACK_BAD_ARGS])
def test_native_stack_op_rejects_bad_arguments(needle, mutate):
    args = next(a for a in stack_inputs() if a[6] == 2 and a[1].size(0) == 4 and a[5])
    with pytest.raises(RuntimeError, match="fused_rnn::rnn_forward") as info:
        torch.ops.fused_rnn.rnn_forward(*mutate(args))
    assert needle in str(info.value)


@native
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("which", ["input", "hx", "weight"])
def test_native_ops_refuse_dual_tensors(which, requires_grad):
    """The ops have no forward derivative: a dual tensor is refused with a message, where one not
    requiring grad used to lose its tangent without a word (the module itself runs the reference
    ops under forward AD)."""
    import torch.autograd.forward_ad as fwAD
    layer_args = sample_inputs(requires_grad=False)[0]
    stack_args = next(a for a in stack_inputs() if a[6] == 2)
    for op, args in ((torch.ops.fused_rnn.rnn_layer_forward, layer_args),
                     (torch.ops.fused_rnn.rnn_forward, stack_args)):
        x, hx, ws, *rest = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        ws = [w.detach().requires_grad_(requires_grad) for w in ws]
        with fwAD.dual_level():
            if which == "input":
                x = fwAD.make_dual(x, torch.ones_like(x))
            elif which == "hx":
                hx = fwAD.make_dual(hx, torch.ones_like(hx))
            else:
                ws[1] = fwAD.make_dual(ws[1], torch.ones_like(ws[1]))
            with pytest.raises(RuntimeError, match="forward-mode AD is not supported"):
                op(x, hx, ws, *rest)


@native
def test_native_stack_backward_rejects_bad_arguments():
    args = next(a for a in stack_inputs() if a[6] == 3)
    out, hn, hidden = torch.ops.fused_rnn.rnn_forward(*args)
    bargs = _stack_backward_args(args, out, hn, hidden)
    with pytest.raises(RuntimeError, match="expected 2 hidden_outputs"):
        torch.ops.fused_rnn.rnn_backward(*bargs[:5], hidden[:1], *bargs[6:])
    with pytest.raises(RuntimeError, match="expected grad_h_n of size"):
        torch.ops.fused_rnn.rnn_backward(bargs[0], bargs[1][:2], *bargs[2:])
    with pytest.raises(RuntimeError, match="expected output of size"):
        torch.ops.fused_rnn.rnn_backward(*bargs[:5], [hidden[0], hidden[1][:2]], *bargs[6:])


@native
def test_cpu_step_parts_heuristic(monkeypatch):
    monkeypatch.delenv("FUSED_RNN_CPU_PARTS", raising=False)
    parts = _ops._C.cpu_step_parts
    assert parts(8, 512, 512, 2) == 2
    assert parts(64, 64, 64, 2) == 2
    assert parts(8, 512, 512, 1) == 1  # one thread
    assert parts(1, 256, 256, 2) == 1  # 65 k multiply-adds: less than a fork/join per step costs
    assert parts(8, 512, 512, 16) == 16
    assert parts(64, 40, 4096, 8) == 3  # blocks of at least 16 columns
    monkeypatch.setenv("FUSED_RNN_CPU_PARTS", "3")
    assert parts(1, 100, 100, 1) == 3
    assert parts(1, 20, 20, 4) == 2
    assert parts(1, 8, 8, 4) == 1


def _layer_ops_and_float64(args, dtype, seed=4):
    """(ours, float64 reference) pairs: the outputs of rnn_layer_forward and rnn_layer_backward on
    args (out, h_n, dx, dhx, the weight gradients)."""
    x, hx, ws, bs, relu, has_biases = args
    out, hn = torch.ops.fused_rnn.rnn_layer_forward(*args)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=dtype)
    gh = torch.randn(hn.shape, generator=g, dtype=dtype)
    got = torch.ops.fused_rnn.rnn_layer_backward(go, gh, x, hx, ws, out, bs, relu, has_biases,
                                                 [True, True, True])
    w64 = [w.double() for w in ws]
    ref = _reference.rnn_layer_forward(x.double(), hx.double(), w64, bs, relu, has_biases)
    want = _reference.rnn_layer_backward(go.double(), gh.double(), x.double(), hx.double(), w64,
                                         ref[0], bs, relu, has_biases, [True] * 3)
    return list(zip([out, hn, got[0], got[1], *got[2]],
                    [ref[0], ref[1], want[0], want[1], *want[2]]))


def _assert_layer_ops_match_float64(args, dtype, seed=4):
    """rnn_layer_forward and rnn_layer_backward on args against the float64 reference."""
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    for a, b in _layer_ops_and_float64(args, dtype, seed):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol)


def _contracting(args):
    """The same args with weights scaled to a contracting recurrence (W_hh's spectral radius about
    0.8), in which float32 rounding does not grow from step to step."""
    x, hx, ws, bs, relu, has_biases = args
    return (x, hx, [w * 0.3 for w in ws], bs, relu, has_biases)


@native
@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("parts", ["1", "2", "3"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_column_blocks_and_parallel_directions_equal_the_reference(parts, threads, dtype,
                                                                   monkeypatch):
    """Steps cut into column blocks (FUSED_RNN_CPU_PARTS), run in parallel or not; the two
    directions run in parallel, single-threaded each (2 threads) or both cut into column blocks in
    one parallel region (4 threads, on however many cores there are), against the float64
    reference."""
    monkeypatch.setenv("FUSED_RNN_CPU_PARTS", parts)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # H = 40: blocks of 16 + 16 + 8 columns.
        for args in sample_inputs(dtype, False, hidden=40, lengths=(6, 6, 6, 4, 1)):
            _assert_layer_ops_match_float64(_contracting(args), dtype)
    finally:
        torch.set_num_threads(previous)


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f
                         if line.startswith("flags")), set())
    except OSError:
        return set()


@native
def test_panel_kernel_runs_wherever_avx2_or_avx512_does():
    """The AVX-512 panel kernel where the CPU has AVX-512F, else the AVX2 one where it has AVX2 and
    FMA, else none."""
    kernel, isa = _ops._C.cpu_step_kernel(8, 512, 512), _ops._C.cpu_panel_isa()
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64" and \
            "FUSED_RNN_CPU_GEMM" not in os.environ:
        flags = _cpu_flags()
        want = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else ""
        assert isa == want, (isa, sorted(flags & {"avx2", "fma", "avx512f"}))
    assert (kernel == "panel") == (isa != "")
    assert kernel in ("panel", "packed", "blas", "aten")


@native
@pytest.mark.skipif(not {"avx2", "fma"} <= _cpu_flags(), reason="no AVX2 and FMA on this CPU")
def test_avx2_panel_kernel_where_avx512_runs_too():
    """FUSED_RNN_CPU_GEMM=panel_avx2 runs the AVX2 kernel on any CPU that has it, so that machines
    with AVX-512 test it too: the panel tests below, and parity with nn.RNN, on it."""
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
         "panel_step_kernel or weight_layouts or avx2_kernel_is_running", __file__],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env=dict(os.environ, FUSED_RNN_CPU_GEMM="panel_avx2", FUSED_RNN_EXPECT_ISA="avx2"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout, res.stdout[-2000:]
    parity = _run_python(PARITY_SNIPPET, {"FUSED_RNN_CPU_GEMM": "panel_avx2"})
    assert parity.returncode == 0 and "parity ok" in parity.stdout, parity.stderr


@native
@pytest.mark.skipif("FUSED_RNN_EXPECT_ISA" not in os.environ, reason="run by the test above")
def test_avx2_kernel_is_running():
    assert _ops._C.cpu_panel_isa() == os.environ["FUSED_RNN_EXPECT_ISA"]


def _disassembly(library, *options):
    """objdump's disassembly of the library (options: e.g. one symbol, or demangled names)."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", *options, library],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@native
@pytest.mark.skipif(shutil.which("nm") is None or shutil.which("objdump") is None,
                    reason="no binutils (nm, objdump) here")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="make sanitize's build is -O1 with sanitizers: vectorising is the -O3 "
                           "build's property")
def test_multiversioned_loops_are_vectorised():
    """The pointwise loops are compiled for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and baseline
    x86-64 and picked at load time; each AVX-512 clone must use zmm registers and each AVX2 clone
    ymm ones. (The AVX2 clone of the float tanh once compiled to scalar code with a branch per
    element: GCC's trapping-math default kept it from if-converting the loop.)"""
    library = _ops._C.__file__
    names = subprocess.run(["nm", library], capture_output=True, text=True, timeout=120)
    assert names.returncode == 0, names.stderr
    clones = sorted({line.split()[-1] for line in names.stdout.splitlines()
                     if line.split()[-1].endswith((".arch_x86_64_v3", ".arch_x86_64_v4"))})
    if not clones:
        pytest.skip("no multiversioned clones in this build (not a GCC x86-64 build)")
    # float and double tanh, relu and their gradients: 7 loops, two clones each.
    assert len(clones) == 14, clones
    for symbol in clones:
        register = "%zmm" if symbol.endswith("v4") else "%ymm"
        assert register in _disassembly(library, f"--disassemble={symbol}"), \
            f"{symbol} has no {register} instruction"


def _fma_loops(library, name_pattern):
    """The innermost loops (a backward jump and the instructions it spans, holding no other) that
    contain an FMA, in every function of the library whose demangled name matches name_pattern:
    (function, loop's instructions)."""
    functions, name = {}, None
    for line in _disassembly(library, "-C").splitlines():
        head = re.match(r"^([0-9a-f]+) <(.*)>:$", line)
        if head:
            name = head.group(2) if re.search(name_pattern, head.group(2)) else None
            if name is not None:
                functions[name] = []
            continue
        ins = re.match(r"^\s+([0-9a-f]+):\s+(\S+)\s*(.*)$", line)
        if name is not None and ins:
            functions[name].append((int(ins.group(1), 16), ins.group(2), ins.group(3)))
    loops = []
    for fn, body in functions.items():
        spans = []
        for addr, mnemonic, operands in body:
            target = re.match(r"^([0-9a-f]+) <", operands)
            if mnemonic.startswith("j") and target and int(target.group(1), 16) <= addr:
                spans.append((int(target.group(1), 16), addr))
        for lo, hi in spans:
            if any((lo, hi) != (a, b) and lo <= a and b <= hi for a, b in spans):
                continue  # an outer loop: its inner loops are checked themselves
            loop = [i for i in body if lo <= i[0] <= hi]
            if any(m.startswith("vfmadd") for _, m, _ in loop):
                loops.append((fn, loop))
    return loops


@native
@pytest.mark.skipif(shutil.which("objdump") is None, reason="no binutils (objdump) here")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="make sanitize's build is -O1 with sanitizers: register allocation is "
                           "the -O3 build's property")
def test_panel_tiles_keep_their_sums_in_registers():
    """Every FMA loop of the panel kernels (AVX-512 tile, AVX2 tile_avx2, and the row blocks they
    are inlined into) keeps its accumulators in registers: no stack access inside the loop. GCC
    keeps them in memory, storing them at every step of k, when a tile's code gives it a reason (a
    loop over the accumulators it does not unroll; once, a prefetch of C's rows placed before the
    loop): the kernel then ran 20-35% slower with the same results, which no other test sees."""
    library = _ops._C.__file__
    kernels = r"fused_rnn::cpu::\(anonymous namespace\)::(tile|row_block)(_avx2)?<"
    loops = _fma_loops(library, kernels)
    if not loops:
        pytest.skip("no panel kernel in this build (not an x86-64 GCC/Clang build)")
    assert any("_avx2<" in fn for fn, _ in loops) and any(
        re.search(r"::(tile|row_block)<", fn) for fn, _ in loops), sorted({fn for fn, _ in loops})
    spilling = sorted({re.sub(r"\(long.*", "", fn) for fn, loop in loops
                       if any("(%rsp)" in ops for _, _, ops in loop)})
    assert not spilling, f"FMA loops reading or writing the stack: {spilling}"


# (batch, hidden): every batch remainder modulo the kernel's 8-row tiles, batches above 8, and hidden
# sizes that end in a partial panel (1, 15, 17, 33, 70) or not (16), with 1, 2, 3 or 5 panels (tiles
# are 2 or 4 panels wide on AVX-512, 1, 2 or 4 on AVX2, so 3 and 5 leave a narrower tile at the end).
# (AVX2's 6-row tiles: every remainder modulo 6 too.)
PANEL_SHAPES = [(1, 1), (2, 15), (3, 16), (4, 17), (5, 33), (6, 70), (7, 33), (8, 17), (9, 16),
                (10, 15), (11, 70), (12, 1), (13, 33), (16, 70), (17, 17)]


@native
@pytest.mark.skipif(_ops._C is not None and _ops._C.cpu_step_kernel(8, 64, 64) != "panel",
                    reason="the panel kernel does not run on this machine")
@pytest.mark.parametrize("parts", ["1", "2"])
@pytest.mark.parametrize("batch,hidden", PANEL_SHAPES)
def test_panel_step_kernel_equals_the_reference(batch, hidden, parts, monkeypatch):
    """float32 step GEMMs on the panel kernel: tile and panel edges, packed sequences (steps
    of fewer rows), two directions (row stride 2H), the beta = 0 product of dh0, column blocks."""
    monkeypatch.setenv("FUSED_RNN_CPU_PARTS", parts)
    lengths = [6 - i % 4 for i in range(batch)]
    for args in sample_inputs(torch.float32, False, hidden=hidden, lengths=sorted(lengths)[::-1]):
        _assert_layer_ops_match_float64(_contracting(args), torch.float32)


@native
@pytest.mark.skipif(_ops._C is not None and _ops._C.cpu_step_kernel(8, 64, 64) != "panel",
                    reason="the panel kernel does not run on this machine")
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("steps,batch,input_size,hidden", [(4, 50, 1300, 70), (3, 7, 20, 1100)])
def test_panel_kernel_cache_blocks_equal_the_reference(steps, batch, input_size, hidden, packed):
    """Products across the AVX2 kernel's cache blocks: inner dimensions deeper than one 1024-deep
    slice with a partial last one (the input projection at I = 1300, the steps at H = 1100), more
    rows than one 96-row chunk (the 200 input-projection rows), more columns than one 64-column
    group with a partial last group (H = 70, 1100); biases (added by the first slice only), both
    directions, packed or not; against the float64 reference. The weight gradients here are sums
    over 200 rows of values near 1 (up to about 56), so each tensor's absolute tolerance is 2e-5 of
    its own largest value (2e-5 itself for the outputs, which are at most 1); a block summed twice,
    or missed, or a bias added twice, is off by far more."""
    g = torch.Generator().manual_seed(11)
    lengths = [steps] * (batch - 2) + [steps - 1, 1]
    if packed:
        p = pack_sequence([torch.randn(n, input_size, generator=g) for n in lengths])
        x, bs = p.data, p.batch_sizes
    else:
        x, bs = torch.randn(steps, batch, input_size, generator=g), None
    D = 2
    hx = torch.randn(D, batch, hidden, generator=g)
    ws = []
    for _ in range(D):  # scaled by 1/sqrt(fan-in): a contracting recurrence, tanh off saturation
        ws += [torch.randn(hidden, input_size, generator=g) / input_size ** 0.5,
               torch.randn(hidden, hidden, generator=g) * 0.8 / hidden ** 0.5,
               torch.randn(hidden, generator=g) * 0.1, torch.randn(hidden, generator=g) * 0.1]
    for a, b in _layer_ops_and_float64((x, hx, ws, bs, False, True), torch.float32):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b, atol=2e-5 * scale, rtol=2e-5)


@native
def test_weight_layouts_do_not_change_the_result():
    """Weights given as column-major or strided views: the input projection packs a column-major
    W_ih like a row-major one (bitwise the same forward on the panel kernel) and hands strided ones to
    ATen (the same to rounding)."""
    g = torch.Generator().manual_seed(7)
    T, B, I, H = 5, 3, 24, 40
    x = torch.randn(T, B, I, generator=g)
    hx = torch.randn(1, B, H, generator=g)
    ws = [torch.randn(H, I, generator=g) * 0.2, torch.randn(H, H, generator=g) * 0.2,
          torch.randn(H, generator=g) * 0.1, torch.randn(H, generator=g) * 0.1]

    def run(weights):
        out, hn = torch.ops.fused_rnn.rnn_layer_forward(x, hx, weights, None, False, True)
        grads = torch.ops.fused_rnn.rnn_layer_backward(torch.ones_like(out), torch.ones_like(hn),
                                                       x, hx, weights, out, None, False, True,
                                                       [True, True, True])
        return [out, hn, grads[0], grads[1], *grads[2]]

    column_major = [w.t().contiguous().t() if w.dim() == 2 else w for w in ws]
    strided = []
    for w in ws:
        wide = torch.zeros(*w.shape[:-1], 2 * w.shape[-1])
        wide[..., ::2] = w
        strided.append(wide[..., ::2])
    assert not column_major[0].is_contiguous() and not strided[0].is_contiguous()
    want = run(ws)
    for got in (run(column_major), run(strided)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if _ops._C.cpu_step_kernel(8, 64, 64) == "panel":
        for a, b in zip(run(column_major)[:2], want[:2]):
            assert torch.equal(a, b)


BAD_ARGS = [
    ("input must be 3-D", lambda x, hx, ws, bs: (x[0], hx, ws, bs)),
    ("hx must be 3-D", lambda x, hx, ws, bs: (x, hx[0], ws, bs)),
    ("expected 4 weights", lambda x, hx, ws, bs: (x, hx, ws[:3], bs)),
    ("expected w_hh of size", lambda x, hx, ws, bs: (x, hx, [ws[0], ws[1][:, :2]] + ws[2:], bs)),
    ("expected w_ih of size", lambda x, hx, ws, bs: (x[..., :2], hx, ws, bs)),
    ("w_hh has dtype", lambda x, hx, ws, bs: (x, hx, [ws[0], ws[1].float()] + ws[2:], bs)),
    ("hx has dtype", lambda x, hx, ws, bs: (x, hx.float(), ws, bs)),
    ("hx.size(1)", lambda x, hx, ws, bs: (x, hx[:, :2], ws, bs)),
    ("input must be 2-D", lambda x, hx, ws, bs: (x, hx, ws, torch.tensor([3, 3]))),
    ("batch_sizes must be non-increasing",
     lambda x, hx, ws, bs: (x.reshape(-1, x.size(-1)), hx, ws, torch.tensor([3, 2, 3, 3, 4]))),
    ("batch_sizes sum to",
     lambda x, hx, ws, bs: (x.reshape(-1, x.size(-1)), hx, ws, torch.tensor([3, 3, 3]))),
    ("batch_sizes must have dtype int64",
     lambda x, hx, ws, bs: (x.reshape(-1, x.size(-1)), hx, ws, torch.tensor([3.0] * 5))),
    ("batch_sizes[0]", lambda x, hx, ws, bs: (x.reshape(-1, x.size(-1)), hx, ws,
                                             torch.tensor([5, 5, 5]))),
]


@native
@pytest.mark.parametrize("needle,mutate", BAD_ARGS, ids=[b[0] for b in BAD_ARGS])
def test_native_op_rejects_bad_arguments_with_named_message(needle, mutate):
    x, hx, ws, bs, relu, has_biases = sample_inputs(requires_grad=False)[0]
    args = mutate(x, hx, ws, bs)
    with pytest.raises(RuntimeError, match="fused_rnn::rnn_layer_forward") as info:
        torch.ops.fused_rnn.rnn_layer_forward(*args, relu, has_biases)
    assert needle in str(info.value)


def _run_python(code, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"),
                                         env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)


PARITY_SNIPPET = """
    import itertools, torch
    from conftest import make_pair, make_input, run_and_grad, assert_close
    for nl, bi, kind in itertools.product(["tanh", "relu"], [False, True], ["padded", "packed"]):
        for dtype in (torch.float64, torch.float32):
            ref, fused = make_pair(5, 7, 2, nl, True, False, 0.0, bi, dtype=dtype)
            x, leaves = make_input(kind, False, 6, 4, 5, dtype=dtype, device="cpu",
                                   gen=torch.Generator().manual_seed(1))
            a, b = run_and_grad(ref, x, leaves, None), run_and_grad(fused, x, leaves, None)
            assert_close(b[0], a[0], dtype); assert_close(b[1], a[1], dtype)
            for u, v in zip(b[2], a[2]):
                assert_close(u, v, dtype)
    print("parity ok")
"""


@native
def test_blas_step_paths_keep_parity():
    """FUSED_RNN_CPU_GEMM=blas turns the panel kernel off: float32 steps of 4+ rows on W_hh (blocks)
    of at least 2^18 elements then take MKL's packed GEMM where torch exports it, others plain BLAS;
    H = 1024 padded (every step packed) and packed sequences (short steps not), 1 and 2 threads."""
    code = """
        import torch, fused_rnn
        from conftest import make_pair, make_input, run_and_grad, assert_close
        C = fused_rnn._ops._C
        assert C.cpu_step_kernel(8, 256, 256) in ("blas", "aten")
        assert C.cpu_step_kernel(3, 1024, 1024) in ("blas", "aten")
        if C.cpu_step_kernel(4, 512, 512) == "packed":
            assert C.cpu_step_kernel(4, 512, 1024) == "packed"
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for bi, kind in [(False, "padded"), (True, "packed"), (False, "packed")]:
                ref, fused = make_pair(16, 1024, 1, "tanh", True, False, 0.0, bi,
                                       dtype=torch.float32)
                x, leaves = make_input(kind, False, 5, 6, 16, dtype=torch.float32, device="cpu",
                                       gen=torch.Generator().manual_seed(2))
                a, b = run_and_grad(ref, x, leaves, None), run_and_grad(fused, x, leaves, None)
                assert_close(b[0], a[0], torch.float32)
                assert_close(b[1], a[1], torch.float32)
                for u, v in zip(b[2], a[2]):
                    assert_close(u, v, torch.float32)
        print("packed ok")
    """
    res = _run_python(textwrap.dedent(code) + textwrap.dedent(PARITY_SNIPPET),
                      {"FUSED_RNN_CPU_GEMM": "blas"})
    assert res.returncode == 0, res.stderr
    assert "packed ok" in res.stdout and "parity ok" in res.stdout


@native
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_op_errors_keep_their_numbers(device):
    """An argument check's message, numbers and all, reaches Python as a RuntimeError. Built
    against a second, static copy of libstdc++ (a compiler that links it statically), the
    extension's streams found no number formatting: the message stopped at its first number here
    and the process died (SIGSEGV) on a GPU machine; setup.py links torch's own libstdc++."""
    w = [torch.randn(5, 3, device=device), torch.randn(5, 5, device=device)]
    with pytest.raises(RuntimeError, match=re.escape(
            "hx.size(1) (3) must equal the input's batch size input.size(1) (4)")):
        torch.ops.fused_rnn.rnn_layer_forward(torch.randn(2, 4, 3, device=device),
                                              torch.randn(1, 3, 5, device=device), w, None,
                                              False, False)


@native
def test_short_sequences_do_not_pack():
    """A layer's step GEMMs pack W_hh only for sequences of 8 steps or more, whatever the batch:
    one step of 64 rows does not pack, eight of 8 rows do. The
    input projection packs from 64 rows. Both by default, and as FUSED_RNN_CPU_MIN_PACK_STEPS and
    _ROWS move the thresholds, read at every call. Parity holds on the plain path for one-step
    calls (a decoder's) and a step-by-step loop matches the whole sequence."""
    code = """
        import os, torch, fused_rnn
        from conftest import make_pair, make_input, run_and_grad, assert_close
        # conftest's settings for the other tests
        os.environ.pop("FUSED_RNN_CPU_MIN_PACK_ROWS")
        os.environ.pop("FUSED_RNN_CPU_MIN_PACK_STEPS")
        C = fused_rnn._ops._C
        assert C.cpu_min_packing_rows() == 64
        os.environ["FUSED_RNN_CPU_MIN_PACK_ROWS"] = "1000"
        assert C.cpu_min_packing_rows() == 1000
        del os.environ["FUSED_RNN_CPU_MIN_PACK_ROWS"]
        packed, plain = C.cpu_step_kernel(8, 512, 512), C.cpu_gemm_path()
        assert C.cpu_step_kernel(8, 512, 512, 7) == plain
        assert C.cpu_step_kernel(8, 512, 512, 8) == packed
        assert C.cpu_step_kernel(64, 512, 512, 1) == plain  # one step of 64 rows
        assert C.cpu_step_kernel(8, 512, 512, 0) == plain  # no steps
        os.environ["FUSED_RNN_CPU_MIN_PACK_STEPS"] = "1000"
        assert C.cpu_step_kernel(8, 512, 512, 999) == plain
        assert C.cpu_step_kernel(8, 512, 512, 1000) == packed
        os.environ["FUSED_RNN_CPU_MIN_PACK_STEPS"] = "1"
        assert C.cpu_step_kernel(8, 512, 512, 1) == packed
        del os.environ["FUSED_RNN_CPU_MIN_PACK_STEPS"]
        g = torch.Generator().manual_seed(3)
        # (2, 40, ...): the projection packed (80 rows), the steps not.
        for T, B, H, layers, bi in [(1, 8, 512, 2, False), (1, 1, 300, 1, True),
                                    (3, 5, 64, 1, False), (1, 64, 256, 1, False),
                                    (2, 40, 128, 1, True)]:
            ref, fused = make_pair(H, H, layers, "tanh", True, False, 0.0, bi, dtype=torch.float32)
            x, leaves = make_input("padded", False, T, B, H, dtype=torch.float32, device="cpu",
                                   gen=g)
            a, b = run_and_grad(ref, x, leaves, None), run_and_grad(fused, x, leaves, None)
            for u, v in zip(b[:2], a[:2]):
                assert_close(u, v, torch.float32)
            for u, v in zip(b[2], a[2]):
                assert_close(u, v, torch.float32)
        # A decoder's loop: one step per call, the state carried, against the whole sequence.
        ref, fused = make_pair(256, 256, 2, "tanh", True, False, 0.0, False, dtype=torch.float32)
        x = torch.randn(12, 4, 256, generator=g)
        with torch.no_grad():
            whole, h_whole = fused(x)
            h, outs = None, []
            for t in range(12):
                o, h = fused(x[t:t + 1], h)
                outs.append(o)
        assert_close(torch.cat(outs), whole, torch.float32)
        assert_close(h, h_whole, torch.float32)
        print("short ok")
    """
    res = _run_python(code)
    assert res.returncode == 0, res.stderr
    assert "short ok" in res.stdout


@native
@pytest.mark.skipif(_ops._C is not None and _ops._C.cpu_step_kernel(8, 512, 512) != "panel",
                    reason="no panel kernel on this CPU (its packing is what is counted)")
def test_layers_pack_w_hh_by_their_step_count(monkeypatch):
    """The forward packs W_hh into panels (allocations from torch's allocator, as the profiler sees
    them) for a sequence of 8 steps, padded or packed (one sequence of 8 steps and 40 of one:
    48 rows, 8 steps), and not for one step of a batch of 63 or 7 steps of 7: the layer passes its
    step count to the rule that test_short_sequences_do_not_pack checks. (The projections stay
    below 64 rows, so W_ih is not packed.)"""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.delenv("FUSED_RNN_CPU_MIN_PACK_ROWS")
    monkeypatch.delenv("FUSED_RNN_CPU_MIN_PACK_STEPS")
    H = 512
    weights = [torch.randn(H, H) / H**0.5, torch.randn(H, H) / H**0.5]

    def big_allocations(T, B, lengths=None):
        x, h0, batch_sizes = torch.randn(T, B, H), torch.zeros(1, B, H), None
        if lengths is not None:  # packed: the rows of each step, longest sequence first
            batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(T)])
            x, h0 = torch.randn(sum(lengths), H), torch.zeros(1, len(lengths), H)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            torch.ops.fused_rnn.rnn_layer_forward(x, h0, weights, batch_sizes, False, False)
        sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        # The output is at most 64 · H floats (128 KiB); W_hh's panels, in one block per thread,
        # H · H floats (1 MiB) in all.
        return sum(n for n in sizes if n > 64 * H * 4)

    assert big_allocations(1, 63) == 0
    assert big_allocations(7, 7) == 0
    assert big_allocations(8, 7) == H * H * 4
    assert big_allocations(8, 41, [8] + [1] * 40) == H * H * 4


@native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("directions", [1, 2])
def test_short_sequence_projection_equals_the_reference(dtype, directions, monkeypatch):
    """Under 64 rows the input projection is one direct BLAS call per direction (bias rows written
    first) rather than ATen's addmm: every layout it takes (no ATen GEMM then runs in the forward,
    whose steps are direct BLAS calls too) or refuses, against float64."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("FUSED_RNN_CPU_MIN_PACK_ROWS", "64")  # conftest's 1 would skip that path
    blas = _ops._C.cpu_gemm_path() == "blas"

    def aten_gemms(args):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            torch.ops.fused_rnn.rnn_layer_forward(*args)
        return [e.key for e in prof.key_averages() if e.key in ("aten::addmm", "aten::mm")]

    g = torch.Generator().manual_seed(11)
    layouts = {
        "row-major": lambda w: w,
        "column-major": lambda w: w.t().contiguous().t() if w.dim() == 2 else w,
        "strided": lambda w: torch.stack([w, torch.zeros_like(w)], -1)[..., 0],
    }
    shapes = [(1, 1, 5, 6), (5, 3, 4, 6), (1, 1, 1, 1), (2, 3, 1, 5), (3, 2, 7, 1), (9, 7, 3, 4),
              (2, 0, 3, 4)]
    for T, B, I, H in shapes:
        for has_biases in (True, False):
            for name, layout in layouts.items():
                x = torch.randn(T, B, I, generator=g, dtype=dtype)
                hx = torch.randn(directions, B, H, generator=g, dtype=dtype)
                ws = layer_weights(directions, I, H, has_biases, g, dtype)
                args = (x, hx, [layout(w) for w in ws], None, False, has_biases)
                if blas and B > 0:
                    # Strided weights go to ATen, unless all their dimensions are 1.
                    refused = name == "strided" and (I > 1 or H > 1)
                    assert bool(aten_gemms(args)) == refused, (T, B, I, H, name)
                # The forward (out, h_n) is the projection plus a few steps: a few float32
                # roundings; the gradients sum over the rows (the tolerance of
                # _assert_layer_ops_match_float64).
                pairs = _layer_ops_and_float64(args, dtype)
                for i, (a, b) in enumerate(pairs):
                    tol = (1e-12 if i < 2 else 1e-11) if dtype == torch.float64 else \
                        (2e-6 if i < 2 else 2e-5)
                    torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol,
                                               msg=lambda m: f"{(T, B, I, H)} {name} {i}: {m}")
    # Packed input: the projection of its 10 rows, and steps whose batch shrinks.
    for args in sample_inputs(dtype, requires_grad=False):
        if args[1].size(0) == directions:
            _assert_layer_ops_match_float64(args, dtype)


@native
def test_aten_gemm_path_keeps_parity():
    """FUSED_RNN_CPU_GEMM=aten forces the fallback used where no Fortran BLAS is exported."""
    code = "import fused_rnn\nassert fused_rnn._ops._C.cpu_gemm_path() == 'aten'\n" + \
        textwrap.dedent(PARITY_SNIPPET)
    res = _run_python(code, {"FUSED_RNN_CPU_GEMM": "aten"})
    assert res.returncode == 0, res.stderr
    assert "parity ok" in res.stdout


def test_pure_pytorch_fallback_when_extension_is_missing():
    """Block fused_rnn._C: one warning, backend() says so, and parity still holds."""
    code = """
        import sys, warnings
        sys.modules["fused_rnn._C"] = None  # makes `from . import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fused_rnn
        msgs = [str(w.message) for w in caught if "native extension" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert fused_rnn.backend("cpu") == "reference"
        assert fused_rnn.backend("cuda") == "reference"
    """
    res = _run_python(textwrap.dedent(code) + textwrap.dedent(PARITY_SNIPPET))
    assert res.returncode == 0, res.stderr
    assert "parity ok" in res.stdout
