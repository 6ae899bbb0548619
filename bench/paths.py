"""Each CUDA recurrence path forced in turn against nn.RNN (cuDNN), per shape: the measurements that
tune the path heuristic's thresholds (csrc/cuda_plan.h: kPersistentMaxBatch, kCublasStepMinMacs and
the on-chip fit), next to what the heuristic picks on this device.

    python -m bench.paths                                  # default grid, float32 and bfloat16
    python -m bench.paths --grid quick --dtypes float32
    python -m bench.paths --shapes 256x64x1024,256x128x512 --bidirectional

Writes paths.json and paths.md to --out. On the CPU (no paths) it times the one CPU kernel: a
self-test of this script.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
from typing import Dict, List, Optional

import torch

from bench.common import (Shape, device_name, forward_backward_fn, forward_fn, interleaved_medians,
                          make_input, make_models, progress, require_native, versions)
from fused_rnn import _ops

PATHS = ("persistent", "per_step", "per_step_cublas")
MODES = {"forward": forward_fn, "forward_backward": forward_backward_fn}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
GRIDS = {"default": ([1, 8, 32, 64, 128, 256], [128, 256, 512, 1024, 2048]),
         "quick": ([1, 64, 256], [256, 1024])}
# Auto's choice counts as a miss where another path is this much faster.
MISS_MARGIN = 1.10


def forced(fn, path: Optional[str]):
    """fn run with the CUDA path forced (None: the heuristic's own choice)."""
    if path is None:
        return fn

    def run():
        with _ops.cuda_path(path):
            return fn()
    return run


def measure(shape: Shape, device: str, dtype: torch.dtype, reps: int, warmup: int) -> Dict:
    ref, fused = make_models(shape, device, dtype)
    x = make_input(shape, device, dtype)
    cuda = device.startswith("cuda")
    row: Dict = {"shape": shape.label, "T": shape.T, "B": shape.B, "H": shape.H,
                 "bidirectional": shape.bidirectional, "unavailable": {}, "max_abs_diff": {}}
    if cuda:
        d = 2 if shape.bidirectional else 1
        row["auto"] = {m: _ops.device_cuda_plan(shape.H, shape.B, d, dtype, backward=b)["path"]
                       for m, b in (("forward", False), ("backward", True))}
    with torch.no_grad():
        want = ref(x)[0].double()
    for mode, make in MODES.items():
        fns = {"nn.RNN": make(ref, x)}
        for path in (PATHS + (None,) if cuda else (None,)):
            name = path or ("auto" if cuda else "fused_rnn")
            candidate = forced(make(fused, x), path)
            try:
                candidate()
            except RuntimeError as e:  # persistent where W_hh does not fit on-chip
                row["unavailable"][name] = str(e).splitlines()[0]
                continue
            if mode == "forward":
                with torch.no_grad():
                    got = forced(lambda: fused(x)[0], path)().double()
                row["max_abs_diff"][name] = (got - want).abs().max().item()
            fns[name] = candidate
        names = list(fns)
        row[mode] = dict(zip(names, interleaved_medians([fns[n] for n in names], device, reps,
                                                        warmup)))
        ours = {n: t for n, t in row[mode].items() if n not in ("nn.RNN", "auto")}
        row[f"best_{mode}"] = min(ours, key=ours.get)
    return row


def misses(rows: List[Dict]) -> List[str]:
    """Shapes where the heuristic's own run (the "auto" column: its forward and backward choices,
    which may differ) is MISS_MARGIN slower than the best single path, as text lines."""
    out = []
    for r in rows:
        if "auto" not in r:
            continue
        for mode, kind in (("forward", "forward"), ("forward_backward", "backward")):
            best, t = r[f"best_{mode}"], r[mode]
            if "auto" in t and t["auto"] > MISS_MARGIN * t[best]:
                out.append(f"{r['dtype']} {r['shape']} {mode}: auto ({r['auto'][kind]}) takes "
                           f"{t['auto'] * 1e3:.3f} ms, {best} {t[best] * 1e3:.3f} ms")
    return out


def markdown(report: Dict) -> str:
    m = report["meta"]
    lines = [f"# fused_rnn CUDA paths vs nn.RNN — {m['device']} — {m['date']}", "",
             f"torch {m['versions']['torch']}, TF32 off, medians of {m['reps']} interleaved runs "
             f"after {m['warmup']} warm-up; ms; '—' where a path cannot run (W_hh off-chip).", ""]
    names = [*PATHS, "auto"] if m["device_type"] == "cuda" else ["fused_rnn"]
    for mode in MODES:
        lines += [f"## {mode.replace('_', '+')}", "",
                  "| dtype | shape | auto's path | nn.RNN | " + " | ".join(names) + " | best |",
                  "|---|---|---|---|" + "---|" * len(names) + "---|"]
        for r in report["rows"]:
            t = r[mode]
            auto = r.get("auto", {}).get("forward" if mode == "forward" else "backward", "")
            cells = [f"{t[n] * 1e3:.3f}" if n in t else "—" for n in names]
            lines.append(f"| {r['dtype']} | {r['shape']} | {auto} | {t['nn.RNN'] * 1e3:.3f} | "
                         + " | ".join(cells) + f" | {r[f'best_{mode}']} |")
        lines.append("")
    if m.get("partial"):
        lines += [f"**Partial report: {len(report['rows'])} of {m['rows_planned']} rows measured** "
                  f"(the run was cut short, or is still running).", ""]
    found = misses(report["rows"])
    lines.append(f"Auto's choice more than {round((MISS_MARGIN - 1) * 100)}% slower than the best "
                 f"path: {len(found)} case(s)" + (":" if found else "."))
    lines += [f"- {line}" for line in found]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--grid", default="default", choices=sorted(GRIDS))
    p.add_argument("--shapes", help="comma-separated TxBxH (overrides --grid)")
    p.add_argument("--steps", type=int, default=256, help="sequence length T for the grid")
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=os.path.join("bench", "out", "paths"))
    args = p.parse_args(argv)

    device = args.device
    require_native(device, "bench.paths")
    if device.startswith("cuda"):
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.shapes:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    else:
        bs, hs = GRIDS[args.grid]
        sizes = [(args.steps, b, h) for h, b in itertools.product(hs, bs)]
    shapes = [Shape(t, b, h, 1, args.bidirectional) for t, b, h in sizes]
    dtypes = [d for d in args.dtypes.split(",") if d]
    name, driver = device_name(device)
    meta = {"device": name, "device_type": device.split(":")[0], "driver": driver,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "reps": args.reps, "warmup": args.warmup, "versions": versions(),
            "rows_planned": len(shapes) * len(dtypes)}
    os.makedirs(args.out, exist_ok=True)
    rows: List[Dict] = []
    total = len(shapes) * len(dtypes)
    for i, (dtype, shape) in enumerate(itertools.product(dtypes, shapes)):
        sys.stderr.write(progress(i, total, f"{dtype} {shape.label}"))
        sys.stderr.flush()
        row = measure(shape, device, DTYPES[dtype], args.reps, args.warmup)
        rows.append({"dtype": dtype, **row})
        # After every row (partial until the last): a run cut short keeps what it measured.
        report = {"meta": dict(meta, partial=len(rows) < total), "rows": rows,
                  "misses": misses(rows)}
        with open(os.path.join(args.out, "paths.json"), "w") as f:
            json.dump(report, f, indent=1)
        md = markdown(report)
        with open(os.path.join(args.out, "paths.md"), "w") as f:
            f.write(md)
    sys.stderr.write(progress(total, total, "done") + "\n")
    if not rows:
        raise SystemExit("bench.paths: no shapes to measure")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
