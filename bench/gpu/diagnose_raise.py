"""Errors raised from the CUDA ops must reach Python as RuntimeError. The first GPU check
(2026-11-30) saw the process die with SIGSEGV where the persistent path was forced and W_hh could
not fit on-chip. Each case runs alone: python3 bench/gpu/diagnose_raise.py CASE (or under cuda-gdb
for a native backtrace); no CASE runs each in its own process and prints how each ended."""
import subprocess
import sys

import torch

CASES = ["forced_persistent_too_big", "bad_hx_shape", "cpu_op_bad_hx_shape"]


def run(case):
    import fused_rnn
    from fused_rnn import _ops

    dev = "cpu" if case.startswith("cpu") else "cuda"
    try:
        if case == "forced_persistent_too_big":
            m = fused_rnn.RNN(8, 2500, 1).to(dev)
            with _ops.cuda_path("persistent"):
                m(torch.randn(2, 1, 8, device=dev))
        else:  # a TORCH_CHECK in the shared argument checks, called from the device's op
            w = [torch.randn(5, 3, device=dev), torch.randn(5, 5, device=dev)]
            torch.ops.fused_rnn.rnn_layer_forward(torch.randn(2, 4, 3, device=dev),
                                                  torch.randn(1, 3, 5, device=dev), w, None,
                                                  False, False)
        print(case, "no error")
    except RuntimeError as e:
        print(case, "raised RuntimeError:", str(e).splitlines()[0][:160])


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run(sys.argv[1])
    else:
        for c in CASES:
            r = subprocess.run([sys.executable, __file__, c], capture_output=True, text=True,
                               timeout=120)
            print(f"{c}: rc {r.returncode}: {(r.stdout + r.stderr).strip().splitlines()[-1:]}")
