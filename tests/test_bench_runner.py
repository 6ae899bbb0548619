"""The benchmark runner (`make bench`) end to end on tiny shapes: its report folder and exit status."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import os
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, ROOT)
from bench import run as bench_run  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_runner_writes_a_complete_report(device, tmp_path, capsys):
    if device not in DEVICES:
        pytest.skip("no CUDA device")
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        rc = bench_run.main(["--device", device, "--shapes", "4x2x8,3x1x20", "--layers", "1,2",
                             "--bidirectional", "both", "--reps", "2", "--warmup", "1",
                             "--out", str(tmp_path)])
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert rc == 0
    report = json.loads((tmp_path / "results.json").read_text())
    meta, rows, summary = report["meta"], report["rows"], report["summary"]
    assert meta["device_type"] == device and meta["dtype"] == "float32"
    assert meta["tf32"] is False and meta["versions"]["torch"] == torch.__version__
    assert meta["date"][:4].isdigit()
    # The commit the code came from: GPU_CHECK_COMMIT where set, else this checkout's HEAD (marked
    # if the tree differs from it), None outside a git checkout.
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    named = os.environ.get("GPU_CHECK_COMMIT", "").strip()
    if named or head:
        assert meta["commit"].split(" ")[0] == (named or head)
    else:
        assert meta["commit"] is None
    assert f"Code: commit {meta['commit'] or 'unknown'}." in (tmp_path / "results.md").read_text()
    # 2 shapes × 2 layer counts × 2 directions, each with both sides' times, speedups, error, memory.
    assert len(rows) == 8 and summary["shapes"] == 8 and summary["wrong_results"] == 0
    assert {(r["T"], r["B"], r["H"]) for r in rows} == {(4, 2, 8), (3, 1, 20)}
    assert {(r["layers"], r["bidirectional"]) for r in rows} == {(1, False), (1, True),
                                                                 (2, False), (2, True)}
    for r in rows:
        for key in ("forward_s", "forward_backward_s", "peak_memory_bytes"):
            assert set(r[key]) == {"nn.RNN", "fused_rnn"} and all(v > 0 for v in r[key].values())
        assert r["speedup_forward"] == pytest.approx(r["forward_s"]["nn.RNN"] /
                                                     r["forward_s"]["fused_rnn"])
        assert r["correct"] and r["max_abs_diff"] <= r["tolerance"]
        # Torch's CPU RNN_TANH/RELU is its own ATen loop; a CUDA build of torch has cuDNN.
        assert r["nn_rnn_implementation"] == ("ATen" if device == "cpu" else "cuDNN")
    if device == "cpu":
        assert summary["gemm_gflops"] > 0
        # The report names the GEMM kernel our steps ran on (reports from CPUs with and without
        # AVX-512 are otherwise told apart by nothing but the CPU's name).
        from fused_rnn import _ops
        kernel = meta["versions"]["cpu_kernel"]
        assert ("panel" in kernel) == (_ops._C.cpu_panel_isa() != "")
        assert f"our CPU steps on the {kernel}" in (tmp_path / "results.md").read_text()
        from bench.table import speedup_table
        assert f"{meta['device']}, {kernel}, torch" in speedup_table(report)
        assert (f", commit {meta['commit']}):" in speedup_table(report)) == bool(meta["commit"])
    else:  # the CUDA path each shape ran on, in the JSON and the table
        paths = {"persistent", "per_step", "per_step_cublas"}
        assert all(set(r["cuda_path"].values()) <= paths for r in rows)
    md = (tmp_path / "results.md").read_text()
    assert all(r["shape"] in md for r in rows)
    assert ("CUDA path fwd / bwd" in md) == (device == "cuda")
    assert f"nn.RNN ran on {rows[0]['nn_rnn_implementation']} at every shape" in md
    assert "Partial" not in md and meta["partial"] is False
    png = tmp_path / "speedup.png"
    if importlib.util.find_spec("matplotlib") is not None:  # the plot's one optional dependency
        assert png.exists() and os.path.getsize(png) > 1000
    assert "results.json" in capsys.readouterr().out


def test_runner_judges_half_types_against_float32(tmp_path):
    """bfloat16: each side's error against float32 nn.RNN is reported, and the verdict follows it."""
    rc = bench_run.main(["--device", "cpu", "--dtype", "bfloat16", "--shapes", "5x3x16",
                         "--layers", "1", "--bidirectional", "yes", "--reps", "1", "--warmup", "0",
                         "--out", str(tmp_path)])
    assert rc == 0
    (row,) = json.loads((tmp_path / "results.json").read_text())["rows"]
    errors = row["error_vs_float32"]
    assert 0 < errors["nn.RNN"] < 0.1 and 0 < errors["fused_rnn"] < 0.1
    eps = torch.finfo(torch.bfloat16).eps
    assert row["tolerance"] == pytest.approx(2 * errors["nn.RNN"] + eps / 8)
    assert row["correct"] == (errors["fused_rnn"] <= row["tolerance"])
    assert "judged by its error against nn.RNN in float32" in (tmp_path / "results.md").read_text()


def test_large_shapes_are_judged_against_the_gemm_rate_timed_beside_them():
    """On the CPU, the GEMM whose rate large shapes (H >= 512, B >= 32) are judged against is timed
    interleaved with each large shape's forward, and each shape's fraction is of its own rate: one
    shape at 2 GFLOP/s beside a GEMM at 4 is at 50%, whatever the rate at the start of the run."""
    from bench.common import Shape, gemm_call

    gemm = gemm_call("cpu", torch.float32, n=64)
    large = bench_run.measure(Shape(2, 32, 512), "cpu", torch.float32, 1, 0, gemm)
    small = bench_run.measure(Shape(2, 8, 512), "cpu", torch.float32, 1, 0, gemm)
    assert large["gemm_gflops"] > 0 and "gemm_gflops" not in small
    shape = Shape(2, 32, 512)
    fb = large["forward_backward_gflops"]
    assert fb["fused_rnn"] == pytest.approx(
        shape.forward_backward_flops() / large["forward_backward_s"]["fused_rnn"] / 1e9)
    assert fb["nn.RNN"] == pytest.approx(
        3 * shape.forward_flops() / large["forward_backward_s"]["nn.RNN"] / 1e9)
    rows = [dict(large, fused_forward_gflops=2.0, gemm_gflops=4.0,
                 forward_backward_gflops={"nn.RNN": 2.0, "fused_rnn": 3.0}),
            dict(large, H=1024, fused_forward_gflops=3.0, gemm_gflops=3.0,
                 forward_backward_gflops={"nn.RNN": 1.5, "fused_rnn": 3.3}), small]
    s = bench_run.summarize(rows, 100.0, "cpu")
    assert s["gemm_gflops"] == 100.0
    assert s["large_forward_fraction_of_gemm"] == {"median": 0.75, "min": 0.5}
    assert s["gemm_gflops_beside_large"] == {"median": 3.5, "min": 3.0, "max": 4.0}
    assert s["large_forward_backward_fraction_of_gemm"] == pytest.approx(
        {"median": 0.925, "min": 0.75, "max": 1.1})
    assert s["large_forward_backward_fraction_of_gemm_nn_rnn"] == pytest.approx(
        {"median": 0.5, "min": 0.5, "max": 0.5})
    # A report from before the rate was timed beside each shape: the rate at the start.
    old = [{k: v for k, v in r.items() if k != "gemm_gflops"} for r in rows]
    assert bench_run.summarize(old, 4.0, "cpu")["large_forward_fraction_of_gemm"]["min"] == 0.5
    meta = {"device": "cpu", "device_type": "cpu", "date": "2026-11-30", "dtype": "float32",
            "tf32": False, "reps": 1, "warmup": 0, "versions": {"torch": torch.__version__}}
    md = bench_run.markdown({"meta": meta, "rows": rows, "summary": s})
    assert "timed interleaved with each large shape's forward: median 4 (3–4) GFLOP/s" in md
    assert "median 75% of the GEMM rate timed beside it, min 50%" in md
    assert "fused median 92% (min 75%), nn.RNN median 50% (max 50%)" in md


def test_runner_keeps_a_partial_report_when_cut_short(tmp_path, monkeypatch):
    """A run that ends early (the GPU check's deadline) leaves results.json and results.md with
    what it measured, marked partial."""
    measure = bench_run.measure

    def measure_then_stop(shape, *args):
        if shape.H == 20:
            raise KeyboardInterrupt
        return measure(shape, *args)

    monkeypatch.setattr(bench_run, "measure", measure_then_stop)
    with pytest.raises(KeyboardInterrupt):
        bench_run.main(["--device", "cpu", "--shapes", "4x2x8,3x1x20,3x1x8", "--layers", "1",
                        "--bidirectional", "no", "--reps", "1", "--warmup", "0",
                        "--out", str(tmp_path)])
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["meta"]["partial"] is True and len(report["rows"]) == 1
    md = (tmp_path / "results.md").read_text()
    assert "T4-B2-H8-L1-uni" in md and "Partial report: 1 of 3 shapes measured" in md


@pytest.mark.parametrize("script", ["run", "paths"])
def test_benchmarks_refuse_to_time_the_fallback(script, tmp_path, monkeypatch):
    """Without the extension's kernels for the device, a benchmark stops instead of timing the
    pure-PyTorch fallback under fused_rnn's name."""
    import fused_rnn
    from bench import paths

    monkeypatch.setattr(fused_rnn, "backend", lambda device="cpu": "reference")
    main = {"run": bench_run.main, "paths": paths.main}[script]
    with pytest.raises(SystemExit, match="pure-PyTorch fallback"):
        main(["--device", "cpu", "--shapes", "4x2x8", "--out", str(tmp_path)])
    assert not os.listdir(tmp_path)


def test_forward_timing_runs_in_eval_mode():
    """The forward column is inference: eval mode (cuDNN's inference forward for nn.RNN) under
    no_grad, and the model's mode is restored for the forward+backward timing."""
    from bench.common import forward_fn

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append((self.training, torch.is_grad_enabled()))
            return x

    probe = Probe()
    forward_fn(probe, torch.zeros(1))()
    assert seen == [(False, False)] and probe.training
    probe.eval()
    forward_fn(probe, torch.zeros(1))()
    assert not probe.training


def test_path_timings_script_on_the_cpu(tmp_path):
    """bench/paths.py end to end where it can run here (the CPU kernel stands in for the paths)."""
    from bench import paths

    assert paths.main(["--device", "cpu", "--shapes", "6x2x16", "--dtypes", "float32",
                       "--reps", "1", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "paths.json").read_text())["rows"]
    assert row["dtype"] == "float32" and (row["T"], row["B"], row["H"]) == (6, 2, 16)
    for mode in ("forward", "forward_backward"):
        assert set(row[mode]) == {"nn.RNN", "fused_rnn"} and row[f"best_{mode}"] == "fused_rnn"
    assert row["max_abs_diff"]["fused_rnn"] < 1e-5
    assert "| float32 | T6-B2-H16-L1-uni |" in (tmp_path / "paths.md").read_text()


def test_path_timings_flag_where_auto_is_not_the_fastest():
    """The GPU report's verdict, on made-up timings: the heuristic's own run ("auto") against the
    best forced path, a miss only beyond the 10% margin, per mode."""
    from bench import paths

    def row(auto_fwd, auto_bwd, fwd, fb):
        best = {m: min((n for n in t if n not in ("nn.RNN", "auto")), key=t.get)
                for m, t in (("forward", fwd), ("forward_backward", fb))}
        return {"dtype": "float32", "shape": "T1-B1-H1-L1-uni",
                "auto": {"forward": auto_fwd, "backward": auto_bwd},
                "forward": fwd, "best_forward": best["forward"],
                "forward_backward": fb, "best_forward_backward": best["forward_backward"]}

    times = {"nn.RNN": 4.0, "persistent": 1.0, "per_step": 1.05, "per_step_cublas": 2.0}
    ok = row("persistent", "per_step", dict(times, auto=1.08), dict(times, auto=1.1))
    assert paths.misses([ok]) == []  # within 10% of the best
    slow = row("per_step_cublas", "persistent", dict(times, auto=2.0),
               dict(times, persistent=3.0, auto=3.0))
    found = paths.misses([slow])
    assert found == [
        "float32 T1-B1-H1-L1-uni forward: auto (per_step_cublas) takes 2000.000 ms, "
        "persistent 1000.000 ms",
        "float32 T1-B1-H1-L1-uni forward_backward: auto (persistent) takes 3000.000 ms, "
        "per_step 1050.000 ms"]
    report = {"meta": {"device": "GPU", "device_type": "cuda", "date": "d", "reps": 1, "warmup": 0,
                       "versions": {"torch": "x"}}, "rows": [ok]}
    md = paths.markdown(report)
    assert ("| float32 | T1-B1-H1-L1-uni | persistent | 4000.000 | 1000.000 | 1050.000 | 2000.000 "
            "| 1080.000 | persistent |") in md
    assert "0 case(s)" in md


def _run(args, **kwargs):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)


def test_gpu_smoke_case_checks_every_path():
    """The GPU check's smoke/sanitizer program, run on the CPU (where the paths are the CPU kernels):
    it compares output, h_n and every gradient with float64 nn.RNN and says so per case."""
    res = _run([sys.executable, "bench/sanitize_case.py", "--path", "all", "--device", "cpu"])
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 12 and all(" ok in " in line for line in lines), res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU outcome")
def test_gpu_check_fails_loudly_without_a_gpu(tmp_path):
    """Without a GPU the check must fail (not skip every CUDA test and pass), say so in its summary,
    and reject stages it does not know."""
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_STATE=str(tmp_path / "state"))
    bad = _run(["bash", "bench/gpu_check.sh", "--stages", "smoke,nope", str(tmp_path / "r")],
               env=env)
    assert bad.returncode == 2 and "unknown stage 'nope'" in bad.stderr
    res = _run(["bash", "bench/gpu_check.sh", "--stages", "smoke,tests-cuda", "--deadline", "300",
                str(tmp_path / "report")], env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "| smoke | FAIL (rc=1) |" in summary and "| tests-cuda | FAIL (rc=" in summary
    assert "| bench-float32 | not run |" in summary
    logs = (tmp_path / "report" / "logs.txt").read_text()
    assert "no CUDA device" in logs
    # The commit line comes from bench.source, as the benchmark reports' does.
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    named = os.environ.get("GPU_CHECK_COMMIT", "").strip()
    assert f"\ncommit {named or head or 'unknown'}" in logs


def test_gpu_check_skips_the_rest_of_a_call_after_a_failed_build(tmp_path):
    """A failed build leaves nothing of ours to test: the call's other stages say so instead of
    running (and, for the benchmarks, timing the pure-PyTorch fallback)."""
    env = dict(os.environ, PYTHON="false", GPU_CHECK_STATE=str(tmp_path / "state"))
    res = _run(["bash", "bench/gpu_check.sh", "--stages", "build,smoke,bench-float32",
                str(tmp_path / "report")], env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "| build | FAIL (rc=1) |" in summary
    assert "| smoke | not run (build failed) |" in summary
    assert "| bench-float32 | not run (build failed) |" in summary


@pytest.mark.parametrize("says,want", [
    ("========= Device not supported", "| sanitizer-memcheck | not available here (========= Device "
                                      "not supported) |"),
    ("========= Invalid __global__ write of size 4 bytes", "| sanitizer-memcheck | FAIL (rc=3) |"),
], ids=["refused", "finding"])
def test_gpu_check_tells_a_refused_sanitizer_from_a_finding(tmp_path, says, want):
    """A device that refuses compute-sanitizer (gVisor machines do) is reported as such and fails
    nothing; a sanitizer that reports an error fails the check."""
    fake = tmp_path / "bin" / "compute-sanitizer"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho '{says}'\nexit 3\n")
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_STATE=str(tmp_path / "state"),
               PATH=f"{fake.parent}:{os.environ['PATH']}")
    res = _run(["bash", "bench/gpu_check.sh", "--stages", "sanitizer-memcheck",
                str(tmp_path / "report")], env=env)
    assert res.returncode == (0 if "not available" in want else 1), res.stdout + res.stderr
    assert want in (tmp_path / "report" / "summary.md").read_text()


def test_gpu_check_cpu_bench_stage_reports_the_cpu_run(tmp_path):
    """The last stage times our CPU kernels on the device machine's cores: its report reaches the
    summary and results.tar.gz (here on one small shape)."""
    import tarfile

    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_STATE=str(tmp_path / "state"),
               GPU_CHECK_CPU_BENCH_ARGS="--shapes 8x2x32 --layers 1 --bidirectional no --reps 1")
    res = _run(["bash", "bench/gpu_check.sh", "--stages", "cpu-bench", str(tmp_path / "report")],
               env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "| cpu-bench | pass |" in summary and "| T8-B2-H32-L1-uni |" in summary
    with tarfile.open(tmp_path / "report" / "results.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"./cpu-results.json", "./cpu-results.md", "./cpu-speedup.png"} <= names


def test_gpu_check_runs_every_test_file_with_cuda_tests():
    """tests-cuda names its files (to run test_cuda.py first): every test module is among them,
    once, but the two CPU-only ones that CI runs."""
    script = os.path.join(ROOT, "bench", "gpu_check.sh")
    res = _run(["bash", "-c", f'eval "$(sed -n "/^cuda_test_files()/,/^}}/p" {script})"; '
                "cuda_test_files"])
    files = res.stdout.split()
    assert files[0] == "tests/test_cuda.py" and len(files) == len(set(files)), files
    every = {f"tests/{name}" for name in os.listdir(os.path.join(ROOT, "tests"))
             if name.startswith("test_") and name.endswith(".py")}
    assert set(files) == every - {"tests/test_cuda_plan.py", "tests/test_cuda_emulated.py"}


def test_gpu_check_races_are_watched_in_every_kernel_of_ours():
    """racecheck and synccheck are limited to our kernels by name: every __global__ function in
    csrc/cuda must match one of the names gpu_check.sh gives them."""
    import re

    script = open(os.path.join(ROOT, "bench", "gpu_check.sh")).read()
    watched = re.findall(r"--kernel-name kns=(\w+)", script)
    kernel = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(")
    kernels = set()
    cuda_dir = os.path.join(ROOT, "csrc", "cuda")
    for name in os.listdir(cuda_dir):
        kernels |= set(kernel.findall(open(os.path.join(cuda_dir, name)).read()))
    assert watched and len(kernels) >= 3, (watched, kernels)
    assert all(any(w in k for w in watched) for k in kernels), (watched, kernels)


def test_readme_results_table_is_the_committed_report():
    """The README's results table is bench.table's rendering of the report it cites, so its
    numbers cannot drift from a committed measurement."""
    import re

    from bench.table import speedup_table

    readme = open(os.path.join(ROOT, "README.md")).read()
    cited = re.findall(r"full table in\s+`(bench/results/[\w.-]+)/([\w-]*)results\.md`", readme)
    assert cited, "the README cites no committed report"
    for folder, prefix in cited:  # the GPU check's reports are float32-results.*, bfloat16-...
        with open(os.path.join(ROOT, folder, prefix + "results.json")) as f:
            assert speedup_table(json.load(f)) in readme, folder + "/" + prefix


def test_memory_measurement_keeps_the_profilers_lines_off_stderr():
    """The CPU peak-memory replay runs torch's profiler, whose C++ side prints lines to stderr at
    every session ('USDT: ... profiler_start'): four per shape, between the progress bar's
    updates. peak_memory_bytes keeps them off, and still measures."""
    code = ("import torch; from bench.common import peak_memory_bytes; x = torch.randn(8, 8); "
            "print(peak_memory_bytes(lambda: x @ x, 'cpu'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 8 * 8 * 4
    assert "USDT" not in out.stderr and "profiler_st" not in out.stderr, out.stderr


@pytest.mark.parametrize("shape", [(64, 1, 64, 1, False), (64, 8, 64, 2, True),
                                   (64, 1, 256, 1, True), (4, 8, 256, 2, True)],
                         ids=lambda s: "T{}-B{}-H{}-L{}-{}".format(*s[:4], "bi" if s[4] else "uni"))
def test_forward_backward_peak_memory_at_most_nn_rnns(shape):
    """The benchmark's memory target on small shapes of its grid, in every CI run: the CPU peak (the
    profiler's allocations replayed, deterministic) of forward+backward is at most nn.RNN's. Scratch
    buffers that grow with a change show here first (a single dX block over dA raised B1 H64 by
    256 bytes over nn.RNN)."""
    from bench.common import Shape, forward_backward_fn, make_input, make_models, \
        peak_memory_bytes
    s = Shape(*shape)
    ref, fused = make_models(s, "cpu", torch.float32)
    x = make_input(s, "cpu", torch.float32)
    mem_ref = peak_memory_bytes(forward_backward_fn(ref, x), "cpu")
    mem_fused = peak_memory_bytes(forward_backward_fn(fused, x), "cpu")
    assert 0 < mem_fused <= mem_ref
