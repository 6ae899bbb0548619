"""Reliability: fuzzed parity with nn.RNN, hostile inputs, limits, leaks, threads, determinism."""

from __future__ import annotations

import gc
import os
import threading

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import fused_rnn

from conftest import DEVICES, assert_close, make_pair

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


def outputs_and_grads(module, x, h0):
    out, hn = module(x, h0) if h0 is not None else module(x)
    o = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    loss = (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum() + hn.sum()
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=False)
    return o, hn, grads


CONFIG = st.fixed_dictionaries({
    "input_size": st.integers(1, 9),
    "hidden_size": st.integers(1, 17),
    "num_layers": st.integers(1, 3),
    "nonlinearity": st.sampled_from(["tanh", "relu"]),
    "bias": st.booleans(),
    "batch_first": st.booleans(),
    "bidirectional": st.booleans(),
    "dropout": st.sampled_from([0.0, 0.0, 0.3]),
})


@settings(max_examples=60, deadline=None, print_blob=True)
@given(config=CONFIG, steps=st.integers(1, 9), batch=st.integers(1, 6),
       dtype=st.sampled_from([torch.float64, torch.float32]), packed=st.booleans(),
       with_h0=st.booleans(), train=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fuzzed_parity_with_nn_rnn(config, steps, batch, dtype, packed, with_h0, train, seed):
    if config["num_layers"] == 1:
        config = dict(config, dropout=0.0)
    ref, fused = make_pair(seed=seed % 1000, dtype=dtype, **config)
    ref.train(train)
    fused.train(train)
    g = torch.Generator().manual_seed(seed)
    isz, hsz = config["input_size"], config["hidden_size"]
    if packed:
        lengths = torch.randint(1, steps + 1, (batch,), generator=g).tolist()
        x = pack_sequence([torch.randn(n, isz, generator=g, dtype=dtype) for n in lengths],
                          enforce_sorted=False)
    else:
        shape = (batch, steps, isz) if config["batch_first"] else (steps, batch, isz)
        x = torch.randn(*shape, generator=g, dtype=dtype)
    d = 2 if config["bidirectional"] else 1
    h0 = torch.randn(config["num_layers"] * d, batch, hsz, generator=g, dtype=dtype) \
        if with_h0 else None
    torch.manual_seed(seed)
    a = outputs_and_grads(ref, x, h0)
    torch.manual_seed(seed)
    b = outputs_and_grads(fused, x, h0)
    note = f"seed={seed} config={config} steps={steps} batch={batch} packed={packed}"
    assert_close(b[0], a[0], dtype, f"output ({note})")
    assert_close(b[1], a[1], dtype, f"h_n ({note})")
    for i, (u, v) in enumerate(zip(b[2], a[2])):
        assert_close(u, v, dtype, f"gradient {i} ({note})")


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_poison_the_same_positions(device):
    ref, fused = make_pair(4, 5, 2, dtype=torch.float64, device=device, bidirectional=True)
    x = torch.randn(6, 3, 4, dtype=torch.float64, device=device)
    x[2, 1, 0] = float("nan")
    x[4, 0, 3] = float("inf")
    x[1, 2, 2] = -float("inf")
    (o1, h1), (o2, h2) = ref(x), fused(x)
    assert torch.equal(torch.isnan(o1), torch.isnan(o2))
    assert torch.equal(torch.isnan(h1), torch.isnan(h2))
    finite = ~torch.isnan(o1)
    assert_close(o2[finite], o1[finite], torch.float64)


def test_relu_nan_gradients_match():
    ref, fused = make_pair(3, 4, 1, "relu", dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    x[1, 0, 1] = float("nan")
    g = []
    for m in (ref, fused):
        out, _ = m(x)
        g.append(torch.autograd.grad(out.nan_to_num().sum(), list(m.parameters())))
    for a, b in zip(*g):
        assert torch.equal(torch.isnan(a), torch.isnan(b))


def test_empty_batch_and_one_step():
    ref, fused = make_pair(4, 5, 2, dtype=torch.float64, bidirectional=True)
    for x in (torch.randn(3, 0, 4, dtype=torch.float64), torch.randn(1, 3, 4, dtype=torch.float64)):
        x.requires_grad_()
        (o1, h1), (o2, h2) = ref(x), fused(x)
        assert o1.shape == o2.shape and h1.shape == h2.shape
        assert_close(o2, o1, torch.float64)
        if x.numel():
            g1 = torch.autograd.grad(o1.sum() + h1.sum(), x)
            g2 = torch.autograd.grad(o2.sum() + h2.sum(), x)
            assert_close(g2[0], g1[0], torch.float64)


def test_zero_length_sequence_errors_like_nn_rnn():
    errs = []
    for m in make_pair(4, 5):
        with pytest.raises(RuntimeError) as info:
            m(torch.randn(0, 3, 4, dtype=torch.float64))
        errs.append(str(info.value))
    assert errs[0] == errs[1]


def test_very_long_sequence_is_linear_and_needs_no_recursion():
    """T = 100 000, small H: forward and backward complete (no recursion limit, no per-step
    Python), and agree with nn.RNN."""
    ref, fused = make_pair(2, 4, 1, dtype=torch.float64)
    x = torch.randn(100_000, 1, 2, dtype=torch.float64, requires_grad=True)
    o2, h2 = fused(x)
    (g2,) = torch.autograd.grad(o2.sum() + h2.sum(), x)
    o1, h1 = ref(x)
    (g1,) = torch.autograd.grad(o1.sum() + h1.sum(), x)
    assert_close(o2, o1, torch.float64)
    assert_close(g2, g1, torch.float64)


@pytest.mark.parametrize("input_size", [3, 10, 17], ids=["I<DH", "I=DH", "I>DH"])
def test_long_packed_sequences_input_gradient_in_blocks(input_size):
    """Hundreds of rows: dX is computed in several row blocks over dA's own storage (or into a new
    tensor when the input is wider than D·H); every gradient still equals nn.RNN's."""
    ref, fused = make_pair(input_size, 5, 2, dtype=torch.float64, bidirectional=True)
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randn(n, input_size, dtype=torch.float64, generator=gen).requires_grad_()
            for n in (700, 650, 3, 512)]
    outs = []
    for m in (ref, fused):
        out, hn = m(pack_sequence(seqs, enforce_sorted=False))
        loss = (out.data * torch.linspace(-1, 1, out.data.shape[1], dtype=out.data.dtype)).sum()
        outs.append(torch.autograd.grad(loss + hn.sum(), seqs + list(m.parameters())))
    for a, b in zip(outs[1], outs[0]):
        assert_close(a, b, torch.float64)


def test_wide_layer_input_gradient_in_blocks_of_64_rows():
    """D·H ≥ 512: dX over dA's storage in blocks of 64 rows (150 rows: 64, 64, 22), input narrower
    than D·H and as wide; every gradient equals nn.RNN's."""
    for input_size in (100, 512):
        ref, fused = make_pair(input_size, 256, 1, dtype=torch.float64, bidirectional=True)
        x = torch.randn(3, 50, input_size, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(4)).requires_grad_()
        outs = []
        for m in (ref, fused):
            out, hn = m(x)
            loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum() + hn.sum()
            outs.append(torch.autograd.grad(loss, [x] + list(m.parameters())))
        for a, b in zip(outs[1], outs[0]):
            assert_close(a, b, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_transposed_hidden_states_and_batch_first_views(device):
    """Non-contiguous hx and input views are taken as they are. On CUDA nn.RNN (cuDNN) refuses a
    non-contiguous hx ("rnn: hx is not contiguous"; H200, torch 2.11, 2026-11-30) where on the CPU it
    takes it: there the reference gets hx.contiguous(), and ours accepts it as nn.RNN on the CPU
    does (README FAQ)."""
    ref, fused = make_pair(4, 5, 2, dtype=torch.float64, device=device, batch_first=True)
    base = torch.randn(3, 2, 5, dtype=torch.float64, device=device)
    h0 = base.transpose(0, 1)  # (2, 3, 5), non-contiguous
    assert not h0.is_contiguous()
    x = torch.randn(7, 3, 4, dtype=torch.float64, device=device).transpose(0, 1)  # (3, 7, 4) view
    (o1, h1) = ref(x, h0 if device == "cpu" else h0.contiguous())
    (o2, h2) = fused(x, h0)
    assert_close(o2, o1, torch.float64)
    assert_close(h2, h1, torch.float64)
    strided = torch.randn(3, 14, 4, dtype=torch.float64, device=device)[:, ::2]
    assert_close(fused(strided)[0], ref(strided)[0], torch.float64)


def test_parameter_cast_after_construction_errors_like_nn_rnn():
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_hh_l1"):
        types = []
        for m in make_pair(4, 5, 2, dtype=torch.float32):
            p = getattr(m, name)
            p.data = p.data.double()
            with pytest.raises((RuntimeError, ValueError)) as info:
                m(torch.randn(3, 2, 4))
            types.append(type(info.value))
        assert types[0] is types[1], name


def test_hx_on_another_device_errors_like_nn_rnn():
    errs = []
    for m in make_pair(4, 5, dtype=torch.float32):
        with pytest.raises(RuntimeError) as info:
            m(torch.randn(3, 2, 4), torch.randn(1, 2, 5, device="meta"))
        errs.append(str(info.value))
    assert errs[0] == errs[1]


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_grad_and_inference_mode_save_nothing(mode):
    _, fused = make_pair(4, 5, 2, dtype=torch.float32)
    x = torch.randn(3, 2, 4)
    with mode():
        out, hn = fused(x)
    assert out.grad_fn is None and hn.grad_fn is None and not out.requires_grad


def test_determinism_on_cpu():
    _, fused = make_pair(16, 32, 2, dtype=torch.float32, bidirectional=True)
    x = torch.randn(20, 8, 16, requires_grad=True)
    runs = []
    for _ in range(3):
        out, hn = fused(x)
        grads = torch.autograd.grad(out.sum() + hn.sum(), [x, *fused.parameters()])
        runs.append((out, hn, grads))
    for r in runs[1:]:
        assert torch.equal(r[0], runs[0][0]) and torch.equal(r[1], runs[0][1])
        for a, b in zip(r[2], runs[0][2]):
            assert torch.equal(a, b)


def test_threads_give_the_sequential_results():
    _, fused = make_pair(8, 16, 2, dtype=torch.float32, bidirectional=True)
    inputs = [torch.randn(10, 4, 8, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        want = [fused(x)[0] for x in inputs]
    got = [None] * len(inputs)
    errors = []

    def work(i):
        try:
            for _ in range(20):
                with torch.no_grad():
                    got[i] = fused(inputs[i])[0]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="under ASan (make sanitize) freed memory sits in ASan's quarantine, so "
                           "resident memory grows without a leak")
def test_no_leak_over_thousands_of_iterations():
    _, fused = make_pair(16, 32, 2, dtype=torch.float32, bidirectional=True)
    x = torch.randn(12, 4, 16, requires_grad=True)
    packed = pack_sequence([torch.randn(n, 16) for n in (12, 9, 5, 2)])

    def step():
        out, hn = fused(x)
        (out.sum() + hn.sum()).backward()
        out, hn = fused(packed)
        (out.data.sum() + hn.sum()).backward()

    # A first window lets the allocators reach their steady state; a leak keeps growing after.
    samples = []
    for _ in range(3):
        for _ in range(1500):
            step()
        gc.collect()
        samples.append(_rss_bytes())
    grown = samples[2] - samples[1]
    # 1500 iterations of a leak of even one small tensor (≥ 1 KiB) would add ≥ 1.5 MiB.
    assert grown < 2**20, f"resident memory grew by {grown / 2**20:.2f} MiB ({samples})"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_gpu_leak_and_double_backward_on_cuda():
    ref, fused = make_pair(4, 6, 2, dtype=torch.float64, device="cuda", bidirectional=True)
    x = torch.randn(5, 3, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    res = []
    for m in (ref, fused):
        # cuDNN's RNN has no double backward: the reference runs on ATen's native RNN instead.
        with torch.backends.cudnn.flags(enabled=m is not ref):
            out, hn = m(x)
        (gx,) = torch.autograd.grad(out.tanh().sum() + hn.pow(2).sum(), x, create_graph=True)
        res.append(torch.autograd.grad(gx.pow(2).sum(), [x, *m.parameters()]))
    for a, b in zip(*res):
        assert_close(b, a, torch.float64)
    for _ in range(50):
        fused(x)[0].sum().backward()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(1000):
        fused(x)[0].sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


@pytest.mark.parametrize("shape", [(64, 8, 256, 2, False), (64, 8, 512, 2, True),
                                   (64, 8, 128, 3, True)], ids=str)
def test_training_step_peak_memory_at_most_nn_rnn(shape):
    """Forward + backward (input and weights requiring grad) holds at most what nn.RNN holds, on
    the CPU where the profiler sees every allocation, at sequence lengths of the benchmark grid.
    Multi-layer stacks were above nn.RNN while each layer's backward copied the gradient coming
    from the layer above. (Not promised for tiny T·B with 3+ layers, where the weight gradients
    are most of the memory and nn.RNN frees each step's saved state as its backward proceeds: T16
    B4 H128 3 layers bidirectional is 1 % above.)"""
    from bench.common import Shape, forward_backward_fn, make_input, make_models, \
        peak_memory_bytes

    s = Shape(*shape)
    ref, fused = make_models(s, "cpu", torch.float32)
    x = make_input(s, "cpu", torch.float32)
    peaks = [peak_memory_bytes(forward_backward_fn(m, x), "cpu") for m in (ref, fused)]
    assert peaks[1] <= peaks[0], f"fused peak {peaks[1]} B > nn.RNN's {peaks[0]} B"


def _available_memory_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


@pytest.mark.slow
@pytest.mark.skipif(_available_memory_gib() < 14, reason="needs about 9 GiB of free memory")
def test_input_past_two_to_the_31_elements_works():
    """An input of 2^31 + 2048 float32 elements (8 GiB): 64-bit addressing all the way. Data sits at
    the far end of the input (features past index 2^20 of the last rows, element offsets past 2^31),
    so an index that wrapped would read the wrong memory. Output, h_n and the weight gradients
    (input not requiring grad: its gradient would need another 8 GiB) equal nn.RNN's."""
    T, B, I, H = 2048, 1, 2**20 + 1, 3
    assert T * B * I > 2**31
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(T, B, I)
    x[:, :, :16] = torch.rand(T, B, 16, generator=gen) - 0.5
    x[-64:, :, -16:] = torch.rand(64, B, 16, generator=gen) - 0.5
    ref, fused = make_pair(I, H, 1, dtype=torch.float32)
    results = []
    for m in (fused, ref):
        out, hn = m(x)
        grads = torch.autograd.grad((out * out).sum() + hn.sum(), list(m.parameters()))
        results.append((out.detach(), hn.detach(), [g[..., -16:] for g in grads[:1]], grads[1:]))
        del out, hn, grads
    (o2, h2, far2, rest2), (o1, h1, far1, rest1) = results
    assert o1[-64:].abs().max() > 0 and far1[0].abs().max() > 0  # the far data matters
    assert_close(o2, o1, torch.float32, "output")
    assert_close(h2, h1, torch.float32, "h_n")
    assert_close(far2[0], far1[0], torch.float32, "dW_ih, last features")
    for a, b in zip(rest2, rest1):
        assert_close(a, b, torch.float32, "gradient")
