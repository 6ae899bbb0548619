"""The CUDA path heuristic, exercised on the CPU with the device properties of real GPUs."""

from __future__ import annotations

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
    assert p["smem_bytes"] == rows * hidden * elem <= props["smem_per_block_optin"]
    # The whole grid is co-resident.
    per_sm = min(props["smem_per_sm"] // (p["smem_bytes"] + 1024),
                 props["max_threads_per_sm"] // p["threads"])
    assert p["blocks_per_direction"] * directions <= per_sm * props["sm_count"]


def test_small_and_medium_layers_run_persistent_on_h100():
    for h in (64, 256, 512, 1024):
        assert plan(h, batch=64)["path"] == "persistent"
    # bf16 halves W_hh's footprint: H = 2048, two directions, still fits on 132 SMs.
    assert plan(2048, directions=2, dtype=torch.bfloat16)["path"] == "persistent"


def test_weights_too_large_for_the_chip_take_the_per_step_path():
    # fp32 W_hh of two 2048-wide directions is 32 MiB: more than 132 SMs' shared memory.
    assert plan(2048, directions=2, dtype=torch.float32)["path"] == "per_step"
    assert plan(4096, dtype=torch.float32)["path"] == "per_step"
    assert plan(1024, props=TINY)["path"] == "per_step"


def test_large_batches_take_the_per_step_path():
    assert plan(512, batch=128)["path"] == "persistent"
    assert plan(512, batch=256)["path"] == "per_step"


def test_forcing():
    assert plan(512, forced="per_step")["path"] == "per_step"
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
        assert _ops.get_cuda_path() == "per_step"
    assert _ops.get_cuda_path() == "auto"
    with pytest.raises(ValueError):
        _ops.set_cuda_path("nope")
