"""pytest-benchmark suite: fused_rnn vs nn.RNN per shape, for regression tracking.

    make bench-pytest                     # or:
    python -m pytest bench/test_bench.py --benchmark-only --benchmark-group-by=param:shape
    ... --benchmark-autosave              # then --benchmark-compare to see a regression

Each shape is one group with four entries (forward / forward+backward × nn.RNN / fused_rnn). The
T = 1 shapes are a decoder's one-step calls, where per-call overhead is most of the time; each of
their rounds times 100 calls.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import Shape, forward_backward_fn, forward_fn, make_input, make_models, synchronize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = ([Shape(64, 1, 64), Shape(64, 8, 256), Shape(64, 32, 512), Shape(64, 8, 256, 2, True),
           Shape(1, 1, 256), Shape(1, 8, 512, 2), Shape(1, 64, 512)]
          if DEVICE == "cpu" else
          [Shape(512, 1, 256), Shape(512, 64, 512), Shape(512, 256, 1024), Shape(1, 64, 512, 2)])
if DEVICE == "cuda":  # full float32 on both sides, as bench.run measures by default
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.parametrize("impl", ["nn.RNN", "fused_rnn"])
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("shape", [s.label for s in SHAPES])
def test_rnn(benchmark, shape, mode, impl):
    s = next(s for s in SHAPES if s.label == shape)
    ref, fused = make_models(s, DEVICE, torch.float32)
    model = ref if impl == "nn.RNN" else fused
    x = make_input(s, DEVICE, torch.float32)
    fn = (forward_fn if mode == "forward" else forward_backward_fn)(model, x)

    def run():
        fn()
        synchronize(DEVICE)

    benchmark.extra_info.update(device=DEVICE, shape=shape, mode=mode)
    benchmark.pedantic(run, rounds=5, iterations=100 if s.T == 1 else 1, warmup_rounds=1)
