"""The CUDA path heuristic, exercised on the CPU with the device properties of real GPUs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fused_rnn import _ops

pytestmark = pytest.mark.skipif(_ops._C is None, reason="native extension not built")

# cudaDeviceGetAttribute values of an H100 SXM and an A100.
H100 = dict(sm_count=132, smem_per_sm=233472, smem_per_block_optin=232448,
            max_threads_per_sm=2048, regs_per_sm=65536)
A100 = dict(sm_count=108, smem_per_sm=167936, smem_per_block_optin=166912,
            max_threads_per_sm=2048, regs_per_sm=65536)
TINY = dict(sm_count=2, smem_per_sm=65536, smem_per_block_optin=49152,
            max_threads_per_sm=1024, regs_per_sm=65536)


def plan(hidden, batch=8, directions=1, dtype=torch.float32, props=H100, forced="auto"):
    return _ops.plan_cuda_path(hidden, batch, directions, dtype, props, forced)


def _static_smem(rows, elem):
    """The persistent kernel's static shared memory: 8 warps × R partial sums in the accumulation
    type (double for float64, else float)."""
    return 8 * rows * (8 if elem == 8 else 4)


@pytest.mark.parametrize("props", [H100, A100], ids=["H100", "A100"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("hidden", [1, 7, 64, 256, 1000, 1024, 2048, 4096])
@pytest.mark.parametrize("directions", [1, 2])
def test_persistent_plans_are_consistent(props, dtype, hidden, directions):
    p = plan(hidden, directions=directions, dtype=dtype, props=props)
    if p["path"] != "persistent":
        return
    elem = torch.empty(0, dtype=dtype).element_size()
    rows = p["rows_per_block"]
    assert rows in (8, 16, 32) and not (rows == 32 and elem == 8)
    # Every output column is owned by exactly one block of its direction.
    assert p["blocks_per_direction"] == -(-hidden // rows)
    # Dynamic shared memory: the R rows of W_hh; the kernel adds its warps' partial sums (static).
    assert p["smem_bytes"] == rows * hidden * elem
    block_smem = p["smem_bytes"] + _static_smem(rows, elem)
    assert block_smem <= props["smem_per_block_optin"]
    # The whole grid is co-resident.
    per_sm = min(props["smem_per_sm"] // (block_smem + 1024),
                 props["max_threads_per_sm"] // p["threads"])
    assert p["blocks_per_direction"] * directions <= per_sm * props["sm_count"]


def test_small_and_medium_layers_run_persistent_on_h100():
    for h in (64, 256, 512, 1024):
        assert plan(h, batch=64)["path"] == "persistent"
    # bf16 halves W_hh's footprint: H = 2048, two directions, still fits on 132 SMs.
    assert plan(2048, directions=2, dtype=torch.bfloat16)["path"] == "persistent"


def test_weights_too_large_for_the_chip_take_a_per_step_path():
    # fp32 W_hh of two 2048-wide directions is 32 MiB: more than 132 SMs' shared memory. Its steps'
    # GEMMs (8 × 2048 × 2048 multiply-adds) are big enough for cuBLAS.
    assert plan(2048, directions=2, dtype=torch.float32)["path"] == "per_step_cublas"
    assert plan(4096, dtype=torch.float32)["path"] == "per_step_cublas"
    # A small GEMM on a device too small for the persistent grid: the fused tile kernel.
    assert plan(256, batch=8, props=TINY)["path"] == "per_step"
    assert plan(1024, batch=1, props=TINY)["path"] == "per_step"


def test_large_batches_take_a_per_step_path():
    assert plan(512, batch=128)["path"] == "persistent"
    assert plan(512, batch=256)["path"] == "per_step_cublas"   # 2^26 multiply-adds per step
    assert plan(64, batch=256)["path"] == "per_step"           # 2^20: one fused launch wins


def test_large_steps_take_cublas_below_the_batch_limit():
    """More than 2^16 elements (batch · hidden) per step: cuBLAS, as measured on an H200
    (float32 B 128 H 1024 forward 6.8 ms against 9.5 persistent; bfloat16 B 128 H 2048 6.3 against
    18.7); at 2^16 and below, persistent (B 64 H 1024 5.1 against 5.6)."""
    for dtype in (torch.float32, torch.bfloat16):
        assert plan(1024, batch=64, dtype=dtype)["path"] == "persistent"
        assert plan(1024, batch=65, dtype=dtype)["path"] == "per_step_cublas"
        assert plan(2048, batch=32, dtype=dtype)["path"] == "persistent"
        assert plan(2048, batch=64, dtype=dtype)["path"] == "per_step_cublas"
        assert plan(512, batch=128, dtype=dtype)["path"] == "persistent"
    # Forcing the persistent path still runs it where it fits.
    assert plan(2048, batch=64, forced="persistent")["path"] == "persistent"


def test_half_types_off_the_persistent_path_use_tensor_cores():
    for dtype in (torch.float16, torch.bfloat16):
        assert plan(64, batch=256, dtype=dtype)["path"] == "per_step_cublas"
        assert plan(256, batch=8, dtype=dtype, props=TINY)["path"] == "per_step_cublas"


def test_cublas_threshold_is_batch_times_hidden_squared():
    # 2^22 multiply-adds per step: H = 256 needs a batch of 64; one row less stays fused.
    assert plan(256, batch=64, props=TINY)["path"] == "per_step_cublas"
    assert plan(256, batch=63, props=TINY)["path"] == "per_step"
    assert plan(2048, batch=1, props=TINY)["path"] == "per_step_cublas"


def test_registers_per_thread_limit_the_blocks_per_sm():
    # H = 2048 fp32 with R = 8 needs 256 blocks: 2 per SM. At 255 registers × 256 threads only one
    # block fits per SM, so the planner takes R = 16 (128 blocks).
    assert plan(2048, batch=8)["rows_per_block"] == 8
    p = plan(2048, batch=8, props=dict(H100, regs_per_thread=255))
    assert (p["path"], p["rows_per_block"], p["blocks_per_direction"]) == ("persistent", 16, 128)
    # Only the kernel of the planned R counts.
    p = plan(2048, batch=8, props=dict(H100, regs_per_thread={8: 128, 16: 255, 32: 255}))
    assert p["rows_per_block"] == 8
    # A100, bf16: R = 8 (256 blocks) and R = 16 (128 blocks) need 2 blocks on some of the 108 SMs;
    # with those kernels at 255 registers only R = 32 (64 blocks) fits.
    p = plan(2048, batch=8, dtype=torch.bfloat16, props=A100)
    assert p["rows_per_block"] == 8
    regs = {8: 255, 16: 255, 32: 64}
    p = plan(2048, batch=8, dtype=torch.bfloat16, props=dict(A100, regs_per_thread=regs))
    assert (p["path"], p["rows_per_block"]) == ("persistent", 32)


def test_static_shared_memory_counts_against_the_block_limit():
    # H = 1000 fp32 at R = 8: 32000 bytes of W_hh rows, plus the kernel's 256 bytes of partial sums.
    # A block limit of exactly 32000 bytes cannot hold both (nor any larger R): a per-step path.
    props = dict(sm_count=1000, smem_per_sm=10**6, smem_per_block_optin=32000,
                 max_threads_per_sm=2048, regs_per_sm=65536)
    assert plan(1000, props=props)["path"] != "persistent"
    p = plan(1000, props=dict(props, smem_per_block_optin=32000 + _static_smem(8, 4)))
    assert (p["path"], p["rows_per_block"], p["smem_bytes"]) == ("persistent", 8, 32000)
    # And per SM: 2 blocks of 32000 + 256 (+ 1 KiB reserved each) need 66560 bytes.
    props = dict(props, smem_per_block_optin=10**6, sm_count=63)  # 125 blocks at R = 8: 2 per SM
    assert plan(1000, props=dict(props, smem_per_sm=66560))["rows_per_block"] == 8
    assert plan(1000, props=dict(props, smem_per_sm=66559))["rows_per_block"] != 8


def test_registers_are_counted_in_units_of_eight_per_thread():
    # Registers are allocated per warp in units of 256 (8 per thread): 42 registers take 48, so
    # 65536 / (48 · 256) = 5 blocks of 256 threads fit per SM, not the 6 that 42 suggests. On a
    # made-up GPU of 22 SMs (shared memory and threads plentiful), H = 2048 fp32 at R = 16 is 128
    # blocks: it needs 6 per SM, so with 42 registers the planner must take R = 32 (64 blocks).
    props = dict(sm_count=22, smem_per_sm=10**9, smem_per_block_optin=10**9,
                 max_threads_per_sm=4096, regs_per_sm=65536)
    assert plan(2048, props=dict(props, regs_per_thread=42))["rows_per_block"] == 32
    # 40 registers is already a multiple of 8: 6 blocks per SM, and R = 16 fits.
    assert plan(2048, props=dict(props, regs_per_thread=40))["rows_per_block"] == 16


def test_forcing():
    assert plan(512, forced="per_step")["path"] == "per_step"
    assert plan(8, batch=1, forced="per_step_cublas")["path"] == "per_step_cublas"
    assert plan(512, batch=1024, forced="persistent")["path"] == "persistent"
    with pytest.raises(RuntimeError, match="does not fit on-chip"):
        plan(4096, forced="persistent")
    with pytest.raises(RuntimeError, match="must be 'auto'"):
        plan(512, forced="fastest")


def test_process_wide_override_round_trips():
    assert _ops.get_cuda_path() == "auto"
    with _ops.cuda_path("per_step"):
        assert _ops.get_cuda_path() == "per_step"
        with _ops.cuda_path("persistent"):
            assert _ops.get_cuda_path() == "persistent"
            with _ops.cuda_path("per_step_cublas"):
                assert _ops.get_cuda_path() == "per_step_cublas"
        assert _ops.get_cuda_path() == "per_step"
    assert _ops.get_cuda_path() == "auto"
    with pytest.raises(ValueError):
        _ops.set_cuda_path("nope")


def test_rows_per_block_can_be_restricted_for_tests():
    """persistent_rows / rows_per_block: each kernel variant at small sizes (a partial last block
    included), none where that block size cannot run (32 rows of float64 are not built)."""
    for rows in (8, 16, 32):
        p = _ops.plan_cuda_path(100, 70, 2, torch.float32, H100, "persistent", rows)
        assert p["rows_per_block"] == rows and p["blocks_per_direction"] == -(-100 // rows)
    assert _ops.plan_cuda_path(100, 4, 1, torch.float64, H100, "auto", 32)["path"] == "per_step"
    with pytest.raises(RuntimeError, match="with the rows per block forced to 32") as info:
        _ops.plan_cuda_path(100, 4, 1, torch.float64, H100, "persistent", 32)
    assert "Exception raised from" not in str(info.value)  # c10's message, not its C++ backtrace
    # Without a restriction the planner still takes the most blocks that fit.
    assert _ops.plan_cuda_path(100, 4, 1, torch.float32, H100)["rows_per_block"] == 8


def test_persistent_rows_setting_is_checked_and_restored():
    assert _ops._C.get_persistent_rows() == 0
    with _ops.persistent_rows(16):
        assert _ops._C.get_persistent_rows() == 16
        with pytest.raises(ValueError, match="must be 0 .* 8, 16 or 32, got 12"):
            _ops._C.set_persistent_rows(12)
        assert _ops._C.get_persistent_rows() == 16
    assert _ops._C.get_persistent_rows() == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs tests/test_cuda.py itself")
def test_cuda_tests_hold_on_the_cpu_kernels():
    """tests/test_cuda.py's own logic, run on the CPU kernels (FUSED_RNN_CUDA_TESTS_ON=cpu): what
    they compare, with which tolerance, must hold for a correct implementation, so that on the day
    a GPU runs them a failure means the kernels. (Run this way, they caught gradients compared
    against the wrong list, cotangents drawn differently per dtype and float32 bounds too tight
    for long sums, none of which a GPU had seen yet.)"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          os.path.join("tests", "test_cuda.py")], cwd=root, capture_output=True,
                         text=True, env=dict(os.environ, FUSED_RNN_CUDA_TESTS_ON="cpu"),
                         timeout=1800)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    passed = int(res.stdout.strip().splitlines()[-1].split(" passed")[0].split()[-1])
    assert passed > 400, res.stdout[-500:]
