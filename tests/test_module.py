"""fused_rnn.RNN as a drop-in nn.RNN: construction, errors, state, weights, dropout, higher order."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence

import fused_rnn

from conftest import assert_close, make_pair


def both(fn):
    """fn(cls) for nn.RNN and fused_rnn.RNN: (result or exception) of each."""
    out = []
    for cls in (nn.RNN, fused_rnn.RNN):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out.append(("ok", fn(cls), [str(w.message) for w in caught]))
        except Exception as exc:  # noqa: BLE001 - comparing whatever each raises
            out.append(("raise", type(exc), str(exc)))
    return out


CTOR_CASES = [
    ((4, 5), {}),
    ((4, 5, 2, "relu", False, True, 0.3, True), {}),
    ((4, 5), {"nonlinearity": "sigmoid"}),
    ((4, 5), {"proj_size": 2}),
    ((4, 5), {"dropout": 2}),
    ((4, 5), {"dropout": True}),
    ((4, 5), {"dropout": 0.5}),  # warns: dropout with one layer
    ((4, 5), {"bias": 1}),
    ((4, 5), {"batch_first": 1}),
    ((4, 5), {"num_layers": 0}),
    ((0, 5), {}),
    ((4, 0), {}),
    ((4.0, 5), {}),
    ((4, 5.0), {}),
    ((4, 5, 1.5), {}),
]


@pytest.mark.parametrize("args,kwargs", CTOR_CASES)
def test_constructor_matches_nn_rnn(args, kwargs):
    ref, fused = both(lambda cls: cls(*args, **kwargs))
    assert ref[0] == fused[0]
    if ref[0] == "raise":
        assert ref[1:] == fused[1:]
    else:
        assert repr(ref[1]) == repr(fused[1])
        assert ref[2] == fused[2]  # same warnings


def test_same_seed_same_weights_and_state_dict_keys():
    torch.manual_seed(3)
    ref = nn.RNN(3, 4, 3, bidirectional=True)
    torch.manual_seed(3)
    fused = fused_rnn.RNN(3, 4, 3, bidirectional=True)
    assert list(ref.state_dict()) == list(fused.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(v, fused.state_dict()[k])
    assert [[n for n, _ in ref.named_parameters()]] == [[n for n, _ in fused.named_parameters()]]
    assert [[w.shape for w in ws] for ws in ref.all_weights] == \
        [[w.shape for w in ws] for ws in fused.all_weights]


def test_rng_consumed_like_nn_rnn():
    torch.manual_seed(5)
    nn.RNN(3, 4, 2)
    after_ref = torch.rand(3)
    torch.manual_seed(5)
    fused_rnn.RNN(3, 4, 2)
    assert torch.equal(after_ref, torch.rand(3))


def test_state_dict_both_ways():
    ref = nn.RNN(3, 4, 2, nonlinearity="relu")
    fused = fused_rnn.RNN(3, 4, 2, nonlinearity="relu")
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3)
    assert_close(fused(x)[0], ref(x)[0], torch.float32)
    ref2 = nn.RNN(3, 4, 2, nonlinearity="relu")
    ref2.load_state_dict(fused.state_dict())
    assert_close(ref2(x)[0], ref(x)[0], torch.float32)


FORWARD_ERRORS = [
    ("rank 4", lambda: (torch.randn(2, 3, 4, 1),)),
    ("rank 1", lambda: (torch.randn(4),)),
    ("feature size", lambda: (torch.randn(2, 3, 6),)),
    ("hx shape", lambda: (torch.randn(2, 3, 4), torch.randn(2, 2, 5))),
    ("hx rank batched", lambda: (torch.randn(2, 3, 4), torch.randn(2, 5))),
    ("hx rank unbatched", lambda: (torch.randn(2, 4), torch.randn(2, 1, 5))),
    ("input dtype", lambda: (torch.randn(2, 3, 4).double(),)),
    ("int input", lambda: (torch.randint(0, 3, (2, 3, 4)),)),
    ("hx dtype", lambda: (torch.randn(2, 3, 4), torch.randn(2, 3, 5).double())),
    ("empty sequence", lambda: (torch.randn(0, 3, 4),)),
    ("hx device", lambda: (torch.randn(2, 3, 4), torch.randn(2, 3, 5, device="meta"))),
    ("packed hx shape",
     lambda: (pack_sequence([torch.randn(3, 4), torch.randn(2, 4)]), torch.randn(2, 3, 5))),
]


@pytest.mark.parametrize("name,make_args", FORWARD_ERRORS, ids=[c[0] for c in FORWARD_ERRORS])
def test_forward_errors_match_nn_rnn(name, make_args):
    args = make_args()
    ref, fused = both(lambda cls: (torch.manual_seed(0), cls(4, 5, 2)(*args))[1])
    assert ref[0] == "raise", "nn.RNN accepted it"
    assert fused[:2] == ref[:2] and fused[2] == ref[2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.complex64])
def test_other_dtypes_behave_as_nn_rnn_on_cpu(dtype):
    ref, fused = make_pair(4, 5, 2, dtype=dtype)
    x = torch.randn(3, 2, 4).to(dtype)
    (o1, h1), (o2, h2) = ref(x), fused(x)
    assert o2.dtype == o1.dtype == dtype
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(h2, h1)


def test_zero_batch():
    ref, fused = make_pair(4, 5, 2)
    x = torch.randn(3, 0, 4, dtype=torch.float64)
    (o1, h1), (o2, h2) = ref(x), fused(x)
    assert o1.shape == o2.shape and h1.shape == h2.shape


def test_output_layout_matches():
    ref, fused = make_pair(4, 5, 2, batch_first=True, bidirectional=True)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    (o1, h1), (o2, h2) = ref(x), fused(x)
    assert o1.shape == o2.shape == (2, 3, 10) and h1.shape == h2.shape == (4, 2, 5)
    assert o1.stride() == o2.stride()


def test_packed_in_packed_out_with_permutation():
    ref, fused = make_pair(4, 5, 2, bidirectional=True)
    lengths = torch.tensor([2, 5, 3])
    padded = torch.randn(5, 3, 4, dtype=torch.float64)
    packed = pack_padded_sequence(padded, lengths, enforce_sorted=False)
    h0 = torch.randn(4, 3, 5, dtype=torch.float64)
    (o1, h1), (o2, h2) = ref(packed, h0), fused(packed, h0)
    assert type(o2) is type(o1)
    assert torch.equal(o1.batch_sizes, o2.batch_sizes)
    assert torch.equal(o1.sorted_indices, o2.sorted_indices)
    assert torch.equal(o1.unsorted_indices, o2.unsorted_indices)
    assert_close(o2.data, o1.data, torch.float64)
    assert_close(h2, h1, torch.float64)


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_dropout_matches_nn_rnn_under_seed(layers, packed, bidirectional):
    ref, fused = make_pair(4, 6, layers, dropout=0.4, bidirectional=bidirectional)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    if packed:
        x = pack_padded_sequence(x, [5, 4, 2])
    results = []
    for m in (ref, fused):
        torch.manual_seed(7)
        out, hn = m(x)
        o = out.data if packed else out
        grads = torch.autograd.grad((o ** 2).sum() + hn.sum(), list(m.parameters()))
        results.append((o, hn, grads, torch.rand(2)))
    (o1, h1, g1, r1), (o2, h2, g2, r2) = results
    assert_close(o2, o1, torch.float64)
    assert_close(h2, h1, torch.float64)
    for a, b in zip(g2, g1):
        assert_close(a, b, torch.float64)
    assert torch.equal(r1, r2), "RNG state after forward differs"
    # And dropout really was applied: eval mode gives a different result.
    fused.eval()
    out_eval, _ = fused(x)
    assert not torch.allclose(out_eval.data if packed else out_eval, o2)


def test_dropout_changed_after_construction():
    ref, fused = make_pair(4, 6, 2)
    ref.dropout = fused.dropout = 0.5
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    torch.manual_seed(1)
    o1, _ = ref(x)
    torch.manual_seed(1)
    o2, _ = fused(x)
    assert_close(o2, o1, torch.float64)


def test_functional_call_with_substituted_parameters():
    ref, fused = make_pair(4, 5, 2)
    params = {k: torch.randn_like(v) for k, v in ref.named_parameters()}
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    o1, _ = torch.func.functional_call(ref, params, (x,))
    o2, _ = torch.func.functional_call(fused, params, (x,))
    assert_close(o2, o1, torch.float64)
    assert not torch.allclose(o2, fused(x)[0])


@pytest.mark.parametrize("which", ["weight_norm", "spectral_norm"])
def test_parametrized_weights(which):
    ref, fused = make_pair(4, 5, 2)
    for m in (ref, fused):
        torch.manual_seed(0)
        getattr(parametrizations, which)(m, "weight_hh_l0")
        torch.manual_seed(0)
        getattr(parametrizations, which)(m, "weight_ih_l1")
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    torch.manual_seed(2)
    o1, h1 = ref(x)
    torch.manual_seed(2)
    o2, h2 = fused(x)
    assert_close(o2, o1, torch.float64)
    g1 = torch.autograd.grad(o1.sum(), list(ref.parameters()))
    g2 = torch.autograd.grad(o2.sum(), list(fused.parameters()))
    for a, b in zip(g2, g1):
        assert_close(a, b, torch.float64)


def test_parameter_replaced_by_assignment_and_assign_load():
    ref, fused = make_pair(4, 5, 1)
    new = nn.Parameter(torch.randn(5, 5, dtype=torch.float64))
    ref.weight_hh_l0 = new
    fused.weight_hh_l0 = new
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    assert_close(fused(x)[0], ref(x)[0], torch.float64)
    sd = {k: torch.randn_like(v) for k, v in ref.state_dict().items()}
    ref.load_state_dict(sd, assign=True)
    fused.load_state_dict(sd, assign=True)
    assert fused.weight_ih_l0 is not None
    assert_close(fused(x)[0], ref(x)[0], torch.float64)


def test_meta_construction_then_to_empty():
    fused = fused_rnn.RNN(4, 5, 2, device="meta")
    ref = nn.RNN(4, 5, 2)
    fused.to_empty(device="cpu")
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 2, 4)
    assert_close(fused(x)[0], ref(x)[0], torch.float32)


def test_deepcopy_pickle_and_torch_save_roundtrip():
    _, fused = make_pair(4, 5, 2, bidirectional=True)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    want = fused(x)[0]
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused)),
                  torch.load(buf, weights_only=False)):
        assert type(clone) is fused_rnn.RNN
        assert torch.equal(clone(x)[0], want)


def test_dtype_conversion_after_construction():
    ref = nn.RNN(4, 5, 2)
    fused = fused_rnn.RNN(4, 5, 2)
    fused.load_state_dict(ref.state_dict())
    ref.double()
    fused.double()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    assert_close(fused(x)[0], ref(x)[0], torch.float64)
    fused.to(torch.float32)
    assert fused(x.float())[0].dtype == torch.float32


def test_flatten_parameters_and_repr():
    ref, fused = make_pair(4, 5, 2, nonlinearity="relu", bidirectional=True)
    fused.flatten_parameters()
    assert repr(fused) == repr(ref)


@pytest.mark.parametrize("config", [
    dict(num_layers=2, bidirectional=True),
    dict(nonlinearity="relu", bias=False),
    dict(batch_first=True),
], ids=["bi-L2", "relu-nobias", "batch_first"])
@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck_and_gradgradcheck(config, packed):
    torch.manual_seed(0)
    m = fused_rnn.RNN(3, 4, dtype=torch.float64, **config)
    params = list(m.parameters())
    lengths = [4, 3, 1]
    shape = (3, 4, 3) if m.batch_first else (4, 3, 3)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(m.num_layers * (2 if m.bidirectional else 1), 3, 4, dtype=torch.float64,
                     requires_grad=True)

    def fn(x, h0, *ps):
        out, hn = torch.func.functional_call(m, dict(zip([n for n, _ in m.named_parameters()], ps)),
                                             (pack_padded_sequence(x, lengths, m.batch_first) if packed else x, h0))
        return (out.data if packed else out), hn

    inputs = (x, h0, *[p.detach().requires_grad_() for p in params])
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_second_order_matches_nn_rnn():
    ref, fused = make_pair(3, 4, 2, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    res = []
    for m in (ref, fused):
        out, hn = m(x)
        (gx,) = torch.autograd.grad(out.tanh().sum() + hn.pow(2).sum(), x, create_graph=True)
        res.append(torch.autograd.grad(gx.pow(2).sum(), [x, *m.parameters()]))
    for a, b in zip(res[1], res[0]):
        assert_close(a, b, torch.float64)


def test_convert_replaces_in_place_and_shares_parameters():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
            self.rnn = nn.RNN(4, 5, 2, batch_first=True)
            self.blocks = nn.ModuleList([nn.RNN(5, 5, nonlinearity="relu")])
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            out, _ = self.rnn(self.encoder(x))
            out, _ = self.blocks[0](out.transpose(0, 1))
            return self.head(out)

    torch.manual_seed(0)
    model = Model()
    x = torch.randn(2, 6, 3)
    want = model(x)
    before = {n: p for n, p in model.named_parameters()}
    assert fused_rnn.convert(model) is model
    assert type(model.rnn) is fused_rnn.RNN and type(model.blocks[0]) is fused_rnn.RNN
    after = dict(model.named_parameters())
    assert list(after) == list(before)
    assert all(after[n] is before[n] for n in before), "parameters must be shared, not copied"
    assert_close(model(x), want, torch.float32)
    # Training through the converted model updates the original parameter objects.
    opt = torch.optim.SGD(before.values(), lr=0.1)
    model(x).sum().backward()
    opt.step()
    assert not torch.allclose(model(x), want)


def test_convert_of_a_bare_rnn_and_of_a_parametrized_one():
    rnn = nn.RNN(3, 4)
    fused = fused_rnn.convert(rnn)
    assert type(fused) is fused_rnn.RNN and fused.weight_ih_l0 is rnn.weight_ih_l0
    para = nn.RNN(3, 4)
    parametrizations.weight_norm(para, "weight_hh_l0")
    x = torch.randn(5, 2, 3)
    want = para(x)[0]
    converted = fused_rnn.convert(para)
    assert isinstance(converted, fused_rnn.RNN)
    assert_close(converted(x)[0], want, torch.float32)


def test_convert_leaves_subclasses_alone():
    class MyRNN(nn.RNN):
        pass

    m = nn.Sequential(MyRNN(3, 4))
    fused_rnn.convert(m)
    assert type(m[0]) is MyRNN


@pytest.mark.parametrize("layers, batch, grad, one_op", [
    (1, 2, False, True), (2, 2, False, True), (3, 2, False, True),
    (3, 33, False, False),  # inner outputs of 64 · 33 · 128 > 2^18 elements: per-layer ops
    (3, 33, True, True),
])
def test_which_ops_run_a_stack(monkeypatch, layers, batch, grad, one_op):
    """One stack op per call (one call's overhead, the backward passing the gradient between layers
    in place), except without autograd on three or more layers whose inner outputs would be large:
    there per-layer ops free each layer's output once read. Same results either way."""
    from fused_rnn import _ops
    calls = []
    for name in ("rnn_stack", "rnn_layer"):
        real = getattr(_ops, name)
        monkeypatch.setattr(_ops, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    ref, fused = make_pair(8, 128, layers)
    x = torch.randn(64, batch, 8, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        (o1, h1), (o2, h2) = ref(x), fused(x)
    assert calls == (["rnn_stack"] if one_op else ["rnn_layer"] * layers)
    assert_close(o2, o1, torch.float64)
    assert_close(h2, h1, torch.float64)
