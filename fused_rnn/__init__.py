"""fused_rnn: torch.nn.RNN (Elman, tanh or relu) on fused CPU and CUDA kernels.

Swap ``torch.nn.RNN`` for :class:`fused_rnn.RNN`, or call :func:`fused_rnn.convert` on a model: same
numbers, gradients, state_dict and errors, faster.
"""

from __future__ import annotations

import torch

from . import _ops
from ._ops import cuda_path, set_cuda_path
from ._version import __version__
from .functional import rnn
from .modules import RNN, convert

__all__ = ["RNN", "convert", "rnn", "backend", "cuda_path", "set_cuda_path", "__version__"]


def backend(device: "str | torch.device" = "cpu") -> str:
    """Which implementation runs the recurrence on ``device``.

    Returns ``"fused"`` when the native extension has a kernel for that device type, else
    ``"reference"`` (the pure-PyTorch implementation: correct, slower).
    """
    device_type = torch.device(device).type
    return "fused" if _ops.has_native_kernel(device_type) else "reference"
