"""Measurement helpers shared by the benchmark runner and the pytest-benchmark suite."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch import nn

import fused_rnn


@dataclasses.dataclass(frozen=True)
class Shape:
    T: int
    B: int
    H: int
    layers: int = 1
    bidirectional: bool = False
    nonlinearity: str = "tanh"

    @property
    def label(self) -> str:
        d = "bi" if self.bidirectional else "uni"
        return f"T{self.T}-B{self.B}-H{self.H}-L{self.layers}-{d}"

    def forward_flops(self) -> float:
        """Multiply-adds ×2 of the forward: input projection + recurrence, every layer/direction."""
        d = 2 if self.bidirectional else 1
        flops = 0.0
        for layer in range(self.layers):
            isize = self.H if layer == 0 else self.H * d
            flops += 2.0 * self.T * self.B * (isize * self.H + self.H * self.H) * d
        return flops

    def forward_backward_flops(self) -> float:
        """Forward and backward with the input requiring grad: 3× the forward's, as each of its two
        products per layer and direction (X · W_ihᵀ, the steps' h · W_hhᵀ) has two of the same size
        in the backward (dX and dW_ih; dh and dW_hh)."""
        return 3.0 * self.forward_flops()


def make_models(shape: Shape, device: str, dtype: torch.dtype, seed: int = 0):
    """nn.RNN and fused_rnn.RNN with identical weights (input_size = H)."""
    torch.manual_seed(seed)
    ref = nn.RNN(shape.H, shape.H, shape.layers, shape.nonlinearity,
                 bidirectional=shape.bidirectional, device=device, dtype=dtype)
    fused = fused_rnn.RNN(shape.H, shape.H, shape.layers, shape.nonlinearity,
                          bidirectional=shape.bidirectional, device=device, dtype=dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def make_input(shape: Shape, device: str, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape.T, shape.B, shape.H, generator=g).to(device=device, dtype=dtype)


def require_native(device: str, who: str) -> None:
    """Stops a benchmark where the extension has no kernels for the device: it would time the
    pure-PyTorch fallback and call it fused_rnn."""
    if fused_rnn.backend(device) != "fused":
        raise SystemExit(f"{who}: the extension has no kernels for {device} (not built, or built "
                         f"without them), so this would time the pure-PyTorch fallback")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object], device: str) -> float:
    """Seconds for one call: CUDA events on a GPU, perf_counter on the CPU."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_medians(fns: List[Callable[[], object]], device: str, reps: int,
                        warmup: int) -> List[float]:
    """Median seconds of each fn, run alternately (ABAB...) so drift hits all sides alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    synchronize(device)
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            times[i].append(time_once(fn, device))
    return [statistics.median(t) for t in times]


def forward_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """Inference: no_grad, in eval mode (nn.RNN passes its training flag to cuDNN, whose training
    forward also writes the reserve buffer a backward would need), the mode restored after."""
    def run():
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return model(x)
        finally:
            model.train(training)
    return run


def forward_backward_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """Forward and backward of sum(output) + sum(h_n), input and parameters requiring grad."""
    xg = x.detach().clone().requires_grad_()

    def run():
        out, hn = model(xg)
        (out.sum() + hn.sum()).backward()
        model.zero_grad(set_to_none=True)
        xg.grad = None
    return run


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 goes to /dev/null inside. torch's profiler (kineto), which the runner
    uses to see what nn.RNN ran and to replay allocations, prints lines from C++ at every session
    ('USDT: ... profiler_start', '... profiler_stop', and on a CUDA build without a GPU an ERROR
    on the device count), which would land between the progress bar's updates. An exception
    still propagates; its traceback is printed after fd 2 is back."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated by torch during fn, above what was allocated before it.

    CUDA: the caching allocator's peak counter. CPU: every allocation and free that the profiler
    records, replayed in order.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                            profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


# The ATen ops by which nn.RNN's implementation is known, as the profiler names them.
NN_RNN_IMPLEMENTATIONS = {"aten::_cudnn_rnn": "cuDNN", "aten::miopen_rnn": "MIOpen",
                          "aten::mkldnn_rnn_layer": "oneDNN"}


def nn_rnn_implementation(model: nn.Module, x: torch.Tensor) -> str:
    """What nn.RNN ran on for this input: a vendor library (cuDNN where torch's build and the
    dtype allow it), or "ATen" (its own loop of ATen ops)."""
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU]) as prof, \
            torch.no_grad():
        model(x)
    names = {e.name for e in prof.events()}
    return next((v for k, v in NN_RNN_IMPLEMENTATIONS.items() if k in names), "ATen")


def max_abs_diff(ref_model: nn.Module, fused_model: nn.Module, x: torch.Tensor) -> float:
    """Largest |difference| over output and h_n, computed in float64."""
    with torch.no_grad():
        o1, h1 = ref_model(x)
        o2, h2 = fused_model(x)
    return max((o1.double() - o2.double()).abs().max().item(),
               (h1.double() - h2.double()).abs().max().item())


HALF_TYPES = (torch.float16, torch.bfloat16)


def errors_against_float32(ref_model: nn.Module, fused_model: nn.Module,
                           x: torch.Tensor) -> Tuple[float, float]:
    """For half types, where the two sides round at different points and their difference says
    little: each side's largest |error| over output and h_n against nn.RNN run in float32 on the
    same (half-precision) input and weights. Returns (nn.RNN's, fused_rnn's)."""
    ref32 = copy.deepcopy(ref_model).float()
    with torch.no_grad():
        want = ref32(x.float())
        errors = []
        for model in (ref_model, fused_model):
            got = model(x)
            errors.append(max((g.float() - w).abs().max().item() for g, w in zip(got, want)))
    return errors[0], errors[1]


def half_type_bound(dtype: torch.dtype, ref_error: float) -> float:
    """The error a half-type result may have: twice nn.RNN's own, plus an eighth of the dtype's
    epsilon for shapes nn.RNN happens to get almost exactly."""
    return 2 * ref_error + torch.finfo(dtype).eps / 8


def gemm_call(device: str, dtype: torch.dtype = torch.float32,
              n: int = 2048) -> Tuple[Callable[[], object], float]:
    """One large square GEMM (the roofline for big shapes) to time, and its floating-point ops."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b)), 2.0 * n ** 3


def gemm_gflops(call: Tuple[Callable[[], object], float], device: str, reps: int = 10) -> float:
    """The rate of a gemm_call's GEMM on this machine, now."""
    fn, flops = call
    (t,) = interleaved_medians([fn], device, reps=reps, warmup=2)
    return flops / t / 1e9


def progress(done: int, total: int, label: str, width: int = 30) -> str:
    filled = int(width * done / max(total, 1))
    return f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<32}"


def default_tolerance(dtype: torch.dtype) -> float:
    """Largest output difference accepted as 'the same result' over a benchmark-length sequence
    (float32, float64; half types are judged by errors_against_float32 instead)."""
    return {torch.float64: 1e-9, torch.float32: 1e-4}[dtype]


def versions() -> dict:
    info = {"torch": torch.__version__, "fused_rnn": fused_rnn.__version__,
            "cuda": torch.version.cuda, "backend_cpu": fused_rnn.backend("cpu")}
    if fused_rnn.backend("cpu") == "fused":  # which CPU GEMM kernel our float32 steps ran on
        from fused_rnn import _ops

        isa = _ops._C.cpu_panel_isa()
        info["cpu_kernel"] = {"avx512": "AVX-512 panel kernel", "avx2": "AVX2 panel kernel"}.get(
            isa, f"{_ops._C.cpu_gemm_path()} GEMM")
    if torch.cuda.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
        info["backend_cuda"] = fused_rnn.backend("cuda")
    return info


def device_name(device: str) -> Tuple[str, Optional[str]]:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        driver = None
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                     "--format=csv,noheader"], capture_output=True, text=True,
                                    timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            pass
        return props.name, driver
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)", None
