"""A small forward+backward on one CUDA path, for compute-sanitizer (bench/gpu_check.sh)."""

from __future__ import annotations

import argparse

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from fused_rnn import _ops


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--path", choices=["persistent", "per_step", "per_step_cublas"], required=True)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with _ops.cuda_path(args.path):
        for packed in (False, True):
            for nonlinearity in ("tanh", "relu"):
                m = fused_rnn.RNN(24, 40, 2, nonlinearity, bidirectional=True, device="cuda",
                                  dtype=dtype)
                x = torch.randn(12, 6, 24, device="cuda", dtype=dtype, requires_grad=True)
                inp = pack_padded_sequence(x, [12, 9, 9, 4, 2, 1]) if packed else x
                out, hn = m(inp)
                o = out.data if packed else out
                (o.float().square().sum() + hn.float().sum()).backward()
    torch.cuda.synchronize()
    print(f"sanitize case ok: path={args.path} dtype={args.dtype}")


if __name__ == "__main__":
    main()
