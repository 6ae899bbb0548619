"""fused_rnn vs nn.RNN (cuDNN on a GPU): the benchmark users run first (`make bench`).

For every shape of a grid: identical weights on both sides, one process, interleaved runs after
warm-up; median forward (no_grad) and forward+backward time of each; speedup; the largest output
difference (a fast wrong answer is reported as FAIL); peak memory of forward+backward. Writes a
report folder: results.json (every number, device, versions, date), results.md (the table) and
speedup.png (speedup over B × H).

    python -m bench.run                          # default grid on CUDA if present, else CPU
    python -m bench.run --grid quick --reps 5
    python -m bench.run --shapes 100x8x256,50x64x1024 --layers 2 --bidirectional both
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys
from typing import Dict, List

import torch

from fused_rnn import _ops
from bench.common import (HALF_TYPES, Shape, default_tolerance, device_name,
                          errors_against_float32, forward_backward_fn, forward_fn, gemm_call,
                          gemm_gflops, half_type_bound, interleaved_medians, make_input,
                          make_models, max_abs_diff, nn_rnn_implementation, peak_memory_bytes,
                          progress, require_native, versions)
from bench.source import source_commit

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def grid_shapes(name: str, device: str, layers: List[int], bidirectional: List[bool],
                steps: int) -> List[Shape]:
    if device.startswith("cuda"):
        bs, hs, t = ({"default": ([1, 8, 64, 256], [256, 512, 1024, 2048]),
                      "quick": ([1, 64], [256, 1024])}[name]) + (steps or 512,)
    else:
        bs, hs, t = ({"default": ([1, 8, 32, 64], [64, 256, 512, 1024]),
                      "quick": ([1, 32], [64, 512])}[name]) + (steps or 64,)
    return [Shape(t, b, h, layer, bi) for layer, bi, b, h in
            itertools.product(layers, bidirectional, bs, hs)]


def parse_shapes(spec: str, layers: List[int], bidirectional: List[bool]) -> List[Shape]:
    out = []
    for item in spec.split(","):
        t, b, h = (int(v) for v in item.lower().split("x"))
        out += [Shape(t, b, h, layer, bi) for layer in layers for bi in bidirectional]
    return out


def is_large(batch: int, hidden: int) -> bool:
    """The benchmark issue's large shapes, judged against the GEMM rate."""
    return hidden >= 512 and batch >= 32


def measure(shape: Shape, device: str, dtype: torch.dtype, reps: int, warmup: int,
            gemm=None) -> Dict:
    """One shape's row of the report. gemm: (fn, flops) of the GEMM whose rate large shapes are
    judged against; timed interleaved with their forwards, so that both meet the same machine
    (on this shared machine the rate at the start of a run read 125–144 GFLOP/s over four runs
    within one hour)."""
    ref, fused = make_models(shape, device, dtype)
    x = make_input(shape, device, dtype)
    diff = max_abs_diff(ref, fused, x)
    impl = nn_rnn_implementation(ref, x)
    beside = gemm is not None and is_large(shape.B, shape.H)
    fns = [forward_fn(ref, x), forward_fn(fused, x)] + ([gemm[0]] if beside else [])
    fwd_ref, fwd_fused, *gemm_s = interleaved_medians(fns, device, reps, warmup)
    fb_ref_fn, fb_fused_fn = forward_backward_fn(ref, x), forward_backward_fn(fused, x)
    fb_ref, fb_fused = interleaved_medians([fb_ref_fn, fb_fused_fn], device, reps, warmup)
    # The CUDA path of the latest (forward+backward) run of ours, after any fallback.
    paths = _ops.last_cuda_paths() if device.startswith("cuda") else None
    mem_ref = peak_memory_bytes(fb_ref_fn, device)
    mem_fused = peak_memory_bytes(fb_fused_fn, device)
    if dtype in HALF_TYPES:
        ref_err, fused_err = errors_against_float32(ref, fused, x)
        tol = half_type_bound(dtype, ref_err)
        correct = fused_err <= tol
        judged = {"error_vs_float32": {"nn.RNN": ref_err, "fused_rnn": fused_err}}
    else:
        tol = default_tolerance(dtype)
        correct = diff <= tol
        judged = {}
    return {
        "shape": shape.label, "T": shape.T, "B": shape.B, "H": shape.H, "layers": shape.layers,
        "bidirectional": shape.bidirectional, "nn_rnn_implementation": impl,
        "forward_s": {"nn.RNN": fwd_ref, "fused_rnn": fwd_fused},
        "forward_backward_s": {"nn.RNN": fb_ref, "fused_rnn": fb_fused},
        "speedup_forward": fwd_ref / fwd_fused,
        "speedup_forward_backward": fb_ref / fb_fused,
        "fused_forward_gflops": shape.forward_flops() / fwd_fused / 1e9,
        "forward_backward_gflops": {"nn.RNN": shape.forward_backward_flops() / fb_ref / 1e9,
                                    "fused_rnn": shape.forward_backward_flops() / fb_fused / 1e9},
        **({"gemm_gflops": gemm[1] / gemm_s[0] / 1e9} if beside else {}),
        "peak_memory_bytes": {"nn.RNN": mem_ref, "fused_rnn": mem_fused},
        "max_abs_diff": diff, "tolerance": tol, "correct": bool(correct), **judged,
        **({"cuda_path": paths} if paths else {}),
    }


def summarize(rows: List[Dict], gemm: float, device: str) -> Dict:
    ok = [r for r in rows if r["correct"]]
    s: Dict = {"shapes": len(rows), "wrong_results": len(rows) - len(ok)}
    for key in ("speedup_forward", "speedup_forward_backward"):
        vals = [r[key] for r in rows]
        s[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    s["memory_fused_le_nn_rnn"] = all(
        r["peak_memory_bytes"]["fused_rnn"] <= r["peak_memory_bytes"]["nn.RNN"] for r in rows)
    if gemm:
        s["gemm_gflops"] = gemm  # at the start of the run
        large = [r for r in rows if is_large(r["B"], r["H"])]
        if large:
            # Each large shape against the rate timed beside its forward (reports from before
            # that was timed: the rate at the start).
            rates = [r.get("gemm_gflops", gemm) for r in large]
            fracs = [r["fused_forward_gflops"] / rate for r, rate in zip(large, rates)]
            s["large_forward_fraction_of_gemm"] = {"median": statistics.median(fracs),
                                                   "min": min(fracs)}
            if any("gemm_gflops" in r for r in large):
                s["gemm_gflops_beside_large"] = {"median": statistics.median(rates),
                                                 "min": min(rates), "max": max(rates)}
            # Forward+backward against the same rate, both sides (their ratio is the speedup):
            # how far each is from the GEMM it is bound by (reports from before: absent).
            if all("forward_backward_gflops" in r for r in large):
                for who, key in (("fused_rnn", "large_forward_backward_fraction_of_gemm"),
                                 ("nn.RNN", "large_forward_backward_fraction_of_gemm_nn_rnn")):
                    f = [r["forward_backward_gflops"][who] / rate for r, rate in zip(large, rates)]
                    s[key] = {"median": statistics.median(f), "min": min(f), "max": max(f)}
    return s


def implementations(rows: List[Dict]) -> str:
    """What nn.RNN ran on over the rows: one name, or each name with the shapes it ran."""
    names = sorted({r.get("nn_rnn_implementation", "?") for r in rows})
    if len(names) == 1:
        return f"{names[0]} at every shape"
    return "; ".join(f"{n} at " + ", ".join(r["shape"] for r in rows
                                          if r.get("nn_rnn_implementation", "?") == n)
                     for n in names)


def markdown(report: Dict) -> str:
    m = report["meta"]
    cuda = m["device_type"] == "cuda"
    lines = [f"# fused_rnn vs nn.RNN — {m['device']} — {m['date']}", "",
             f"Code: commit {m.get('commit') or 'unknown'}.", "",
             f"dtype {m['dtype']}, torch {m['versions']['torch']}"
             + (f", our CPU steps on the {m['versions']['cpu_kernel']}"
                if not cuda and "cpu_kernel" in m["versions"] else "")
             + (f", CUDA {m['versions']['cuda']}, cuDNN {m['versions'].get('cudnn')}"
                if cuda else "")
             + ((", TF32 allowed in cuDNN and cuBLAS (our cuBLAS GEMMs, the per_step_cublas "
                 "recurrence's too, use it; the persistent and per_step kernels compute in full "
                 "float32)" if m["tf32"] else ", TF32 off on both sides") if cuda else "")
             + f", medians of {m['reps']} interleaved runs after {m['warmup']} warm-up; forward "
             f"in eval mode under no_grad. nn.RNN ran on {implementations(report['rows'])}.", "",
             "| shape | fwd nn.RNN ms | fwd fused ms | fwd × | fwd+bwd nn.RNN ms | "
             "fwd+bwd fused ms | fwd+bwd × | peak MiB nn.RNN / fused | max abs diff |"
             + (" CUDA path fwd / bwd |" if cuda else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    for r in report["rows"]:
        f, fb, mem = r["forward_s"], r["forward_backward_s"], r["peak_memory_bytes"]
        path = r.get("cuda_path", {})
        lines.append(
            f"| {r['shape']} | {f['nn.RNN'] * 1e3:.3f} | {f['fused_rnn'] * 1e3:.3f} | "
            f"{r['speedup_forward']:.2f} | {fb['nn.RNN'] * 1e3:.3f} | {fb['fused_rnn'] * 1e3:.3f} | "
            f"{r['speedup_forward_backward']:.2f} | {mem['nn.RNN'] / 2**20:.1f} / "
            f"{mem['fused_rnn'] / 2**20:.1f} | {r['max_abs_diff']:.1e}"
            f"{'' if r['correct'] else ' **FAIL**'} |"
            + (f" {path.get('forward', '?')} / {path.get('backward', '?')} |" if cuda else ""))
    s = report["summary"]
    if m.get("partial"):
        lines += ["", f"**Partial report: {len(report['rows'])} of {m['shapes_planned']} shapes "
                      f"measured** (the run was cut short, or is still running)."]
    lines += ["", f"Speedup forward: median {s['speedup_forward']['median']:.2f}×, min "
              f"{s['speedup_forward']['min']:.2f}×, max {s['speedup_forward']['max']:.2f}×.",
              f"Speedup forward+backward: median {s['speedup_forward_backward']['median']:.2f}×, "
              f"min {s['speedup_forward_backward']['min']:.2f}×, max "
              f"{s['speedup_forward_backward']['max']:.2f}×.",
              f"Peak memory of forward+backward ≤ nn.RNN's at every shape: "
              f"{'yes' if s['memory_fused_le_nn_rnn'] else 'no'}.",
              f"Wrong results: {s['wrong_results']} of {s['shapes']}."]
    judged = [r["error_vs_float32"] for r in report["rows"] if "error_vs_float32" in r]
    if judged:
        worst = max(j["fused_rnn"] / max(j["nn.RNN"], 1e-30) for j in judged)
        lines.append(f"In {m['dtype']} a result is judged by its error against nn.RNN in float32 on "
                     f"the same input: fused_rnn's may be at most 2× nn.RNN's (+ ε/8); largest "
                     f"ratio here {worst:.2f}.")
    beside = s.get("gemm_gflops_beside_large")
    if "gemm_gflops" in s:
        lines.append(f"GEMM rate (2048² {m['dtype']}): {s['gemm_gflops']:.0f} GFLOP/s at the start "
                     "of the run" + (f"; timed interleaved with each large shape's forward: median "
                                     f"{beside['median']:.0f} ({beside['min']:.0f}–"
                                     f"{beside['max']:.0f}) GFLOP/s." if beside else "."))
    if "large_forward_fraction_of_gemm" in s:
        fr = s["large_forward_fraction_of_gemm"]
        lines.append(f"Fused forward on large shapes (H ≥ 512, B ≥ 32): median "
                     f"{fr['median'] * 100:.0f}% of the GEMM rate"
                     + (" timed beside it" if beside else "")
                     + f", min {fr['min'] * 100:.0f}%.")
    if "large_forward_backward_fraction_of_gemm" in s:
        ours = s["large_forward_backward_fraction_of_gemm"]
        ref = s["large_forward_backward_fraction_of_gemm_nn_rnn"]
        lines.append(f"Forward+backward on large shapes (3× the forward's work), against the same "
                     f"rate: fused median {ours['median'] * 100:.0f}% (min "
                     f"{ours['min'] * 100:.0f}%), nn.RNN median {ref['median'] * 100:.0f}% (max "
                     f"{ref['max'] * 100:.0f}%).")
    return "\n".join(lines) + "\n"


def plot(report: Dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["rows"]
    configs = sorted({(r["layers"], r["bidirectional"]) for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, title in ((axes[0], "speedup_forward", "forward"),
                           (axes[1], "speedup_forward_backward", "forward + backward")):
        for layers, bi in configs:
            for b in sorted({r["B"] for r in rows}):
                sel = sorted((r for r in rows if r["B"] == b and r["layers"] == layers
                              and r["bidirectional"] == bi), key=lambda r: r["H"])
                if sel:
                    ax.plot([r["H"] for r in sel], [r[key] for r in sel], marker="o",
                            label=f"B={b} L={layers} {'bi' if bi else 'uni'}")
        ax.axhline(1.0, color="gray", lw=1, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden size H")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speedup over nn.RNN (×)")
    axes[1].legend(fontsize=7, ncol=2)
    m = report["meta"]
    fig.suptitle(f"fused_rnn vs nn.RNN — {m['device']} — {m['dtype']} — T={rows[0]['T']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--grid", default="default", choices=["default", "quick"])
    p.add_argument("--shapes", help="comma-separated TxBxH (overrides --grid)")
    p.add_argument("--steps", type=int, default=0, help="sequence length T for the grid")
    p.add_argument("--layers", default="1,2", help="comma-separated layer counts")
    p.add_argument("--bidirectional", default="both", choices=["no", "yes", "both"])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tf32", action="store_true", help="allow TF32 on both sides (CUDA)")
    p.add_argument("--out", default=None, help="report folder (default bench/out/<device>-<date>)")
    args = p.parse_args(argv)

    device, dtype = args.device, DTYPES[args.dtype]
    require_native(device, "bench.run")
    layers = [int(v) for v in args.layers.split(",")]
    bidir = {"no": [False], "yes": [True], "both": [False, True]}[args.bidirectional]
    if device.startswith("cuda"):
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    shapes = (parse_shapes(args.shapes, layers, bidir) if args.shapes
              else grid_shapes(args.grid, device, layers, bidir, args.steps))
    name, driver = device_name(device)
    now = datetime.datetime.now(datetime.timezone.utc)
    out = args.out or os.path.join("bench", "out",
                                   f"{device.split(':')[0]}-{now.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)

    # The CPU's GEMM rate, the roofline of large shapes, in float32 and float64 runs only: the CPU
    # runs half types on nn.RNN's own ATen ops (nothing of ours to judge against it), and a 2048²
    # bfloat16 GEMM on a CPU without AVX-512 BF16 took over 10 s.
    cpu = not device.startswith("cuda") and dtype in (torch.float32, torch.float64)
    gemm_beside = gemm_call(device, dtype) if cpu else None
    gemm = gemm_gflops(gemm_beside, device) if cpu else 0.0
    meta = {"device": name, "device_type": device.split(":")[0], "driver": driver,
            "date": now.isoformat(timespec="seconds"), "dtype": args.dtype,
            "tf32": bool(args.tf32), "reps": args.reps, "warmup": args.warmup,
            "threads": torch.get_num_threads(), "versions": versions(),
            "commit": source_commit(),
            "shapes_planned": len(shapes)}
    rows: List[Dict] = []
    for i, shape in enumerate(shapes):
        sys.stderr.write(progress(i, len(shapes), shape.label))
        sys.stderr.flush()
        rows.append(measure(shape, device, dtype, args.reps, args.warmup, gemm_beside))
        # After every shape (marked partial until the last): a run cut short keeps what it measured.
        report = {"meta": dict(meta, partial=len(rows) < len(shapes)), "rows": rows,
                  "summary": summarize(rows, gemm, device)}
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(report, f, indent=1)
        md = markdown(report)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(md)
    sys.stderr.write(progress(len(shapes), len(shapes), "done") + "\n")
    if not rows:
        raise SystemExit("bench.run: no shapes to measure")

    plotted = plot(report, os.path.join(out, "speedup.png"))
    print(md)
    print(f"report: {out}/results.json, results.md" + (", speedup.png" if plotted else
                                                         " (no plot: matplotlib missing)"))
    return 1 if report["summary"]["wrong_results"] else 0


if __name__ == "__main__":
    sys.exit(main())
