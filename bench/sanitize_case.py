"""A small forward+backward on each CUDA path, checked against a float64 CPU run of nn.RNN: the GPU
check's smoke test (does every path run, end, and agree?) and the program compute-sanitizer watches
(bench/gpu_check.sh). Exits 1 if a path disagrees.

    python bench/sanitize_case.py --path all
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from fused_rnn import _ops

PATHS = ["persistent", "per_step", "per_step_cublas"]
# float32 kernels against a float64 reference on this small case: parity contract's float32 bound.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def run_case(path: str, dtype: torch.dtype, packed: bool, nonlinearity: str, device: str) -> float:
    """Largest error of output, h_n and every gradient against nn.RNN in float64 on the CPU, as
    max |fused − ref| / (1 + |ref|): the parity tests' atol = rtol bound."""
    torch.manual_seed(0)
    ref = nn.RNN(24, 40, 2, nonlinearity, bidirectional=True, dtype=torch.float64)
    fused = fused_rnn.RNN(24, 40, 2, nonlinearity, bidirectional=True, device=device,
                          dtype=dtype)
    with torch.no_grad():
        for p, q in zip(fused.parameters(), ref.parameters()):
            p.copy_(q)
    x64 = torch.randn(12, 6, 24, dtype=torch.float64)
    lengths = [12, 9, 9, 4, 2, 1]
    results = []
    for model, x in ((ref, x64.clone()), (fused, x64.to(device, dtype))):
        x.requires_grad_()
        with _ops.cuda_path(path):
            out, hn = model(pack_padded_sequence(x, lengths) if packed else x)
            o = out.data if packed else out
            loss = o.square().sum() + hn.sum()
            grads = torch.autograd.grad(loss, [x, *model.parameters()])
        results.append([t.detach().double().cpu() for t in (o, hn, *grads)])
    return max(float(((b - a).abs() / (1 + a.abs())).max()) for a, b in zip(*results))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--path", choices=PATHS + ["all"], required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cuda", help="cpu: a self-test of this script (no paths)")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = False  # true float32 GEMMs: the tolerance assumes them
    tol = TOLERANCE[dtype]
    failed = False
    for path in PATHS if args.path == "all" else [args.path]:
        for packed in (False, True):
            for nonlinearity in ("tanh", "relu"):
                t0 = time.perf_counter()
                diff = run_case(path, dtype, packed, nonlinearity, args.device)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                ok = diff <= tol
                failed |= not ok
                print(f"{path:16s} {args.device} {args.dtype} packed={packed!s:5s} {nonlinearity}: "
                      f"error {diff:.2e} (tolerance {tol:.0e}) {'ok' if ok else 'WRONG'} in "
                      f"{time.perf_counter() - t0:.2f} s", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
