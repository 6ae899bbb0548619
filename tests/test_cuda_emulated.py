"""Our CUDA kernels' own source, run on the CPU by a host emulator of CUDA threads.

tests/cuda_emulator compiles csrc/cuda's kernel headers unchanged with the host compiler, each CUDA
thread a fiber, with __syncthreads, warp shuffles and grid.sync() as real meeting points, and launches
them as rnn_cuda.cu does (same step descriptors, same GEMM split of the cuBLAS path with a host GEMM
standing in for cuBLAS, same grid geometry). Each path (persistent at 8, 16 and 32 rows per block,
per_step, per_step_cublas), forward and BPTT, padded and packed, one and two directions, every dtype,
is compared against the pure-PyTorch reference in float64 on the same (rounded) inputs. This is what
the CUDA kernels compute, checked on every CI run; speed, memory ordering between SMs and races are
left to a GPU (tests/test_cuda.py, compute-sanitizer in bench/gpu_check.sh).
"""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

from fused_rnn import _reference

EMULATOR = Path(__file__).parent / "cuda_emulator"
CSRC = Path(__file__).parent.parent / "csrc"

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
PATH_CODES = {"persistent": 0, "per_step": 1, "per_step_cublas": 2}
# (path, rows per block): every kernel variant the CUDA build has.
VARIANTS = [("persistent", 8), ("persistent", 16), ("persistent", 32), ("per_step", 0),
            ("per_step_cublas", 0)]

_ptr = ctypes.c_void_p
_ptrs = ctypes.POINTER(ctypes.c_void_p)
_i64 = ctypes.c_int64


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the emulator's fiber switch is written for x86-64")
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    lib_path = tmp_path_factory.mktemp("cuda_emulator") / "libcuda_emu.so"
    cmd = [cxx, "-std=c++20", "-O2", "-g", "-fPIC", "-shared", "-pthread", "-fno-extern-tls-init", "-Wall", "-Wextra",
           "-Werror", "-Wno-unknown-pragmas", "-Wl,--no-undefined",
           f"-I{EMULATOR / 'shim'}", f"-I{EMULATOR}", f"-I{CSRC}",
           *[f"-isystem{p}" for p in include_paths()],
           str(EMULATOR / "emulator.cpp"), str(EMULATOR / "harness.cpp"), "-o", str(lib_path)]
    built = subprocess.run(cmd, capture_output=True, text=True)
    if built.returncode != 0:
        pytest.fail("the CUDA emulator does not build:\n" + built.stderr[-4000:])
    lib = ctypes.CDLL(str(lib_path))
    lib.emu_recurrence.restype = ctypes.c_int
    lib.emu_recurrence.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, _i64, _i64,
                                   _ptr, _ptr, _i64, _i64, _ptr, _ptr, _ptrs, _ptrs, _ptrs, _ptrs,
                                   ctypes.c_int, ctypes.c_char_p, _i64]
    lib.emu_selftest.restype = ctypes.c_int
    lib.emu_selftest.argtypes = [ctypes.c_int, _ptr, ctypes.c_char_p, _i64]
    return lib


# Elements of NaN before and after every buffer the emulated kernels get: a read past an end shows
# as NaN in the results, a write past one as a guard that is no longer NaN.
GUARD = 64


class _Guarded:
    """A copy of `tensor` inside NaN guards, for the kernels; `inner` is the copy."""

    def __init__(self, tensor):
        self.flat = torch.full((tensor.numel() + 2 * GUARD,), float("nan"), dtype=tensor.dtype)
        self.inner = self.flat[GUARD:GUARD + tensor.numel()].view(tensor.shape)
        self.inner.copy_(tensor)

    def check(self, name):
        guards = torch.cat([self.flat[:GUARD], self.flat[-GUARD:]])
        assert guards.isnan().all(), f"the kernels wrote outside {name}"


def _pointers(guarded):
    return (ctypes.c_void_p * 2)(*[g.inner.data_ptr() for g in guarded] + [0] * (2 - len(guarded)))


def emulate(lib, *, backward, path, rows_per_block, buf, out, w, h0, hn, dhn, batch_sizes,
            batch, relu):
    """Runs one layer's recurrence in place over buf (N, D·H) on the emulated kernels, every
    buffer they get (one per direction for w, h0, hn, dhn) inside NaN guards; hn receives h_n."""
    hidden, directions = w[0].shape[0], len(w)
    steps = batch_sizes.numel() if batch_sizes is not None else buf.shape[0] // max(batch, 1)
    bs = off = None
    if batch_sizes is not None:  # the packed step tables, as rnn_layer.h lays them out
        sizes, offsets = _reference.schedule(buf, None, batch_sizes)
        bs, off = torch.tensor(sizes, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)
    g = {"buf": [_Guarded(buf)], "out": [_Guarded(out)] if out is not None else [],
         "w": [_Guarded(t) for t in w], "h0": [_Guarded(t) for t in h0],
         "hn": [_Guarded(t) for t in hn], "dhn": [_Guarded(t) for t in dhn]}
    err = ctypes.create_string_buffer(1024)
    rc = lib.emu_recurrence(
        DTYPE_CODES[buf.dtype], int(backward), PATH_CODES[path], rows_per_block, steps, batch,
        bs.data_ptr() if bs is not None else None, off.data_ptr() if off is not None else None,
        hidden, directions, g["buf"][0].inner.data_ptr(),
        g["out"][0].inner.data_ptr() if out is not None else None, _pointers(g["w"]),
        _pointers(g["h0"]), _pointers(g["hn"]), _pointers(g["dhn"]), int(relu), err, len(err))
    assert rc == 0, err.value.decode()
    for name, guarded in g.items():
        for x in guarded:
            x.check(name)
    buf.copy_(g["buf"][0].inner)
    for t, x in zip(hn, g["hn"]):
        t.copy_(x.inner)


def _selector_weights(hidden, directions, w_hh):
    """Per direction: W_ih picking the direction's own columns of X (so P_d = X[:, dH:(d+1)H] and
    dX = [dA_0, dA_1] exactly), and its W_hh."""
    weights = []
    for d in range(directions):
        w_ih = torch.zeros(hidden, directions * hidden, dtype=torch.float64)
        w_ih[:, d * hidden:(d + 1) * hidden] = torch.eye(hidden, dtype=torch.float64)
        weights += [w_ih, w_hh[d]]
    return weights


# Largest |emulated − float64 reference| allowed, per dtype: each step rounds h_t or dA_t (of size
# up to ~2) to the dtype once, after float (double) accumulation over H ≤ 70 terms; about 4 units in
# the last place of 2 for the 2-byte types, more room for accumulation in float32/float64. Measured
# worst over every case (2026-11-25): bfloat16 7.8e-3, float16 8.6e-4, float32 4.9e-7, float64
# 7.8e-16; a wrong index or a missing term gives errors of order 0.1.
TOLERANCE = {torch.float64: 1e-14, torch.float32: 4e-6, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _case(path, rows_per_block, dtype, directions, packed, relu, seed):
    """A layer shaped to cross each path's tile boundaries: the persistent kernel's last block
    partial (H = 259) and its steps of 19, 11, 5, 4, 3, 2 and 1 rows (19 and 11: two rows per warp,
    over two passes for some warps at 19, the last row some warp's second at 11; then rows split
    over k across 1, 2, 2, 2, 4 and 8 warps; padded: 2 rows, 4 warps each), the per-step kernel's
    64-wide tiles partial in both dimensions."""
    g = torch.Generator().manual_seed(seed)
    if path == "persistent":
        # H = 8·32 + 3: at a split of 8 every warp's slice of k has work; the last block partial.
        steps, hidden, batch = 7, 259, 19 if packed else 2
        lengths = [7, 6, 5, 4, 3] + [2] * 6 + [1] * 8
    else:
        # Padded: two column tiles, the second partial. Packed: H below one k chunk (16), so the
        # first chunk's tile is partial too (a slot left unwritten holds whatever shared memory held).
        steps, hidden, batch = 6, (13 if packed else 70), 67
        lengths = sorted([steps, steps] + torch.randint(1, steps + 1, (batch - 2,), generator=g).tolist(),
                         reverse=True)
    if packed:
        batch_sizes = torch.tensor([sum(1 for n in lengths if n > t) for t in range(steps)])
    else:
        batch_sizes = None
    rows = int(batch_sizes.sum()) if packed else steps * batch
    scale = hidden ** -0.5

    def rand(*shape, s=1.0):
        # Drawn in float64, rounded to the dtype: both sides see the same values.
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * s).to(dtype)

    return dict(hidden=hidden, batch=batch, steps=steps, batch_sizes=batch_sizes, rows=rows,
                x=rand(rows, directions * hidden), h0=rand(directions, batch, hidden),
                w_hh=[rand(hidden, hidden, s=scale) for _ in range(directions)],
                dH=rand(rows, directions * hidden), dhn=rand(directions, batch, hidden), relu=relu)


def _reference_input(c, t):
    return t if c["batch_sizes"] is not None else t.view(c["steps"], c["batch"], -1)


@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("directions", [1, 2], ids=["uni", "bi"])
@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("path,rows_per_block", VARIANTS,
                         ids=[f"{p}{r or ''}" for p, r in VARIANTS])
def test_emulated_kernels_match_the_reference(emulator, path, rows_per_block, dtype, directions,
                                              packed, relu):
    if rows_per_block == 32 and dtype == torch.float64:
        pytest.skip("no 32-row double kernel is built (it would spill registers)")
    seed = zlib.crc32(repr((path, rows_per_block, dtype, directions, packed, relu)).encode())
    c = _case(path, rows_per_block, dtype, directions, packed, relu, seed)
    H, D, B = c["hidden"], directions, c["batch"]
    f64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    weights = _selector_weights(H, D, [w.double() for w in c["w_hh"]])
    ref_out, ref_hn = _reference.rnn_layer_forward(
        _reference_input(c, f64["x"]), f64["h0"], weights, c["batch_sizes"], relu, False)
    ref_out = ref_out.reshape(c["rows"], D * H)

    # Forward: buf holds P (= x, by the selector W_ih) and receives h_t.
    buf = c["x"].clone()
    hn = torch.full((D, B, H), float("nan"), dtype=dtype)
    emulate(emulator, backward=False, path=path, rows_per_block=rows_per_block, buf=buf, out=None,
            w=c["w_hh"], h0=list(c["h0"]), hn=list(hn), dhn=[], batch_sizes=c["batch_sizes"],
            batch=B, relu=relu)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(buf.double(), ref_out, rtol=0, atol=tol)
    torch.testing.assert_close(hn.double(), ref_hn, rtol=0, atol=tol)

    # BPTT from the reference's h_t (rounded to the dtype, as the forward would have left it).
    out = ref_out.to(dtype)
    grad_input, _, _ = _reference.rnn_layer_backward(
        _reference_input(c, f64["dH"]), f64["dhn"], _reference_input(c, f64["x"]), f64["h0"],
        weights, _reference_input(c, out.double()), c["batch_sizes"], relu, False,
        [True, False, False])
    dA = c["dH"].clone()
    emulate(emulator, backward=True, path=path, rows_per_block=rows_per_block, buf=dA, out=out,
            w=c["w_hh"], h0=[], hn=[], dhn=list(c["dhn"]), batch_sizes=c["batch_sizes"], batch=B,
            relu=relu)
    torch.testing.assert_close(dA.double(), grad_input.reshape(c["rows"], D * H), rtol=0, atol=tol)


def test_emulator_runs_warps_barriers_and_grids_as_cuda_does(emulator):
    result = torch.full((256,), -1, dtype=torch.int64)
    err = ctypes.create_string_buffer(512)

    def run(which):
        result.fill_(-1)
        rc = emulator.emu_selftest(which, result.data_ptr(), err, len(err))
        return rc, err.value.decode()

    assert run(0) == (0, "") and result[:128].tolist() == [496] * 128  # butterfly sums per warp
    assert run(1) == (0, "") and result[:8].tolist() == [1, 2, 3, 4, 2, 3, 4, 1]  # grid.sync
    assert run(2) == (0, "") and result.tolist() == [3 * (255 - i) for i in range(256)]
    # Misuses are reported, not hung.
    assert "__syncthreads after some threads" in run(3)[1]
    assert "grid.sync" in run(4)[1]
    assert "shuffle" in run(5)[1]
    assert "reached from" in run(6)[1]  # a barrier in divergent code
    assert run(7) == (0, "") and result[:64].view(torch.float64).isnan().all()


@pytest.mark.parametrize("path,rows_per_block", VARIANTS,
                         ids=[f"{p}{r or ''}" for p, r in VARIANTS])
def test_emulated_bptt_rows_without_a_gemm_term_ignore_w_hh(emulator, path, rows_per_block):
    # A row whose sequence ends at step t has no dA_{t+1} · W_hh term there: its dA_t is
    # (dH_t + dh_n) ⊙ act'(h_t) whatever W_hh holds, as in cuDNN, which multiplies only the rows
    # that go on. With an infinite weight, 0 · W would make it NaN.
    c = _case(path, rows_per_block, torch.float32, 1, True, False, seed=7)
    H, B = c["hidden"], c["batch"]
    w_hh = c["w_hh"][0].clone()
    w_hh[1, 2] = float("inf")
    out = torch.tanh(c["x"])  # any h_t in (-1, 1): BPTT takes the forward's output as given
    dA = c["dH"].clone()
    emulate(emulator, backward=True, path=path, rows_per_block=rows_per_block, buf=dA, out=out,
            w=[w_hh], h0=[], hn=[], dhn=list(c["dhn"]), batch_sizes=c["batch_sizes"], batch=B,
            relu=False)
    bs, offsets = _reference.schedule(dA, None, c["batch_sizes"])
    for t in range(len(bs) - 1):
        ending = slice(offsets[t] + bs[t + 1], offsets[t] + bs[t])  # rows [bs[t+1], bs[t]) of t
        expected = (c["dH"][ending].double() + c["dhn"][0, bs[t + 1]:bs[t]].double()) \
            * (1 - out[ending].double() ** 2)
        torch.testing.assert_close(dA[ending].double(), expected, rtol=0,
                                   atol=TOLERANCE[torch.float32])
    assert not dA.isfinite().all()  # the infinite weight did reach the rows that go on
