"""The CPU float32 tanh's largest error in ulps over every float (tools/fit_tanh.py fits it).

Every non-negative float32 up to 10.5 goes through the forward op (W_ih = 1, W_hh = 0, no bias: the
output is tanh of the input) in chunks, against float64 tanh; past 10 the kernel returns what it
does at 10 (1, as torch does), and tanh is odd and the kernel symmetric. Prints the worst error and
where.
Run with the extension built: python tools/tanh_error.py (about a minute on 2 cores).
"""
import torch

import fused_rnn  # noqa: F401  (registers the ops)


def largest_error(chunk=1 << 24):
    last = int(torch.tensor(10.5).view(torch.int32))
    worst, where = 0.0, 0.0
    ws = [torch.ones(1, 1), torch.zeros(1, 1)]
    for start in range(0, last + 1, chunk):
        x = torch.arange(start, min(start + chunk, last + 1), dtype=torch.int32).view(torch.float32)
        n = x.numel()
        got = torch.ops.fused_rnn.rnn_layer_forward(x.reshape(1, n, 1), torch.zeros(1, n, 1), ws,
                                                    None, False, False)[0].reshape(-1).double()
        want = torch.tanh(x.double())
        _, e = torch.frexp(want.float().double())
        err = (got - want).abs() / torch.ldexp(torch.ones_like(want), (e - 24).clamp_min(-149))
        i = int(err.argmax())
        if err[i].item() > worst:
            worst, where = err[i].item(), x[i].item()
    return worst, where


if __name__ == "__main__":
    worst, where = largest_error()
    print(f"largest error {worst:.3f} ulp, at x = {where!r}")
