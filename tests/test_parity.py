"""Parity with nn.RNN over the full configuration grid: outputs, h_n and every gradient."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import DEVICES, assert_close, make_input, make_pair, reference_grad, run_and_grad

GRID = list(itertools.product(
    ["tanh", "relu"],          # nonlinearity
    [True, False],             # bias
    [False, True],             # batch_first
    [False, True],             # bidirectional
    [1, 2, 3],                 # num_layers
    ["padded", "packed", "unbatched"],
    [False, True],             # h0 given
))


def _id(case):
    nl, bias, bf, bi, layers, kind, h0 = case
    return f"{nl}-bias{int(bias)}-bf{int(bf)}-bi{int(bi)}-L{layers}-{kind}-h0{int(h0)}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_parity_with_nn_rnn(case, dtype, device):
    nonlinearity, bias, batch_first, bidirectional, layers, kind, with_h0 = case
    steps, batch, isize, hidden = 6, 4, 5, 7
    ref, fused = make_pair(isize, hidden, layers, nonlinearity, bias, batch_first, 0.0,
                           bidirectional, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    x, leaves = make_input(kind, batch_first, steps, batch, isize, dtype=dtype, device=device,
                           gen=gen)
    h0 = None
    if with_h0:
        d = 2 if bidirectional else 1
        shape = (layers * d, hidden) if kind == "unbatched" else (layers * d, batch, hidden)
        h0 = torch.randn(*shape, dtype=dtype, generator=gen).to(device).requires_grad_()
    o_ref, h_ref, g_ref = reference_grad(ref, x, leaves, h0)
    o, h, g = run_and_grad(fused, x, leaves, h0)
    assert o.shape == o_ref.shape and h.shape == h_ref.shape
    assert_close(o, o_ref, dtype, "output")
    assert_close(h, h_ref, dtype, "h_n")
    assert len(g) == len(g_ref)
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert_close(a, b, dtype, f"gradient {i}")
