"""A small forward+backward on each CUDA path, checked against a float64 CPU run of nn.RNN (within 3×
nn.RNN's own float32 error on the same device): the GPU check's smoke test (does every path run,
end, and agree?) and the program compute-sanitizer watches (bench/gpu_check.sh). Exits 1 if a path
disagrees, if another path ran than the one forced, or if the build has no CUDA kernels.

    python bench/sanitize_case.py --path all
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Tuple

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from fused_rnn import _ops

PATHS = ["persistent", "per_step", "per_step_cublas"]


def errors(path: str, dtype: torch.dtype, packed: bool, nonlinearity: str, device: str,
           with_theirs: bool = True) -> Tuple[float, float]:
    """(fused_rnn's, nn.RNN's) largest error of output, h_n and every gradient, both in `dtype` on
    `device`, against nn.RNN in float64 on the CPU, as max |x − ref| / (1 + |ref|). Without
    with_theirs, nn.RNN does not run on the device (its error reads as nan)."""
    torch.manual_seed(0)
    ref = nn.RNN(24, 40, 2, nonlinearity, bidirectional=True, dtype=torch.float64)
    ours = fused_rnn.RNN(24, 40, 2, nonlinearity, bidirectional=True, device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    if with_theirs:
        theirs = nn.RNN(24, 40, 2, nonlinearity, bidirectional=True, device=device, dtype=dtype)
        theirs.load_state_dict(ref.state_dict())
    x64 = torch.randn(12, 6, 24, dtype=torch.float64)
    lengths = [12, 9, 9, 4, 2, 1]
    results = []
    models = [(ref, x64.clone())] + ([(theirs, x64.to(device, dtype))] if with_theirs else [])
    for model, x in models + [(ours, x64.to(device, dtype))]:
        x.requires_grad_()
        with _ops.cuda_path(path):
            out, hn = model(pack_padded_sequence(x, lengths) if packed else x)
            o = out.data if packed else out
            loss = o.square().sum() + hn.sum()
            grads = torch.autograd.grad(loss, [x, *model.parameters()])
        results.append([t.detach().double().cpu() for t in (o, hn, *grads)])
        if model is ours and device.startswith("cuda"):  # the forced path ran, nothing else
            ran = _ops.last_cuda_paths()
            if ran != {"forward": path, "backward": path}:
                raise SystemExit(f"sanitize_case: forced {path}, but {ran} ran")
    want = results[0]

    def error(got):
        return max(float(((g - w).abs() / (1 + w.abs())).max()) for g, w in zip(got, want))
    return error(results[-1]), error(results[1]) if with_theirs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--path", choices=PATHS + ["all"], required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cuda", help="cpu: a self-test of this script (no paths)")
    p.add_argument("--run-only", action="store_true",
                   help="under a sanitizer: run our kernels, check the forced path ran, judge no "
                        "numbers and run no vendor kernels (cuDNN) beside ours")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.device.startswith("cuda") and fused_rnn.backend("cuda") != "fused":
        raise SystemExit("sanitize_case: the extension has no CUDA kernels (a CPU-only build?)")
    # True float32 on both sides: no TF32 in cuDNN or in matmuls.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    failed = False
    for path in PATHS if args.path == "all" else [args.path]:
        for packed in (False, True):
            for nonlinearity in ("tanh", "relu"):
                t0 = time.perf_counter()
                ours, theirs = errors(path, dtype, packed, nonlinearity, args.device,
                                      with_theirs=not args.run_only)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                # float64: the parity bound; float32: within 3x nn.RNN's own error in float32.
                tol = 1e-10 if dtype == torch.float64 else 3 * theirs + 1e-7
                ok = args.run_only or ours <= tol
                failed |= not ok
                print(f"{path:16s} {args.device} {args.dtype} packed={packed!s:5s} {nonlinearity}: "
                      f"error {ours:.2e} (nn.RNN {theirs:.2e}, bound {tol:.1e}) "
                      f"{'ok' if ok else 'WRONG'} in {time.perf_counter() - t0:.2f} s", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
