"""The README's results table from a benchmark report: speedup over nn.RNN per batch × hidden size,
one column per layer count × direction, each cell "forward / forward+backward".

    python -m bench.table bench/results/cpu-2026-11-25/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List


def config_name(layers: int, bidirectional: bool) -> str:
    return f"{layers} layer{'s' if layers > 1 else ''}" + (", bidir." if bidirectional else "")


def speedup_table(report: Dict) -> str:
    """Markdown: a header naming the device, torch and date, then the table. A shape measured at
    several sequence lengths is not expected (the runner's grids use one)."""
    rows: List[Dict] = report["rows"]
    m = report["meta"]
    configs = sorted({(r["layers"], r["bidirectional"]) for r in rows})
    cells = {(r["B"], r["H"], r["layers"], r["bidirectional"]): r for r in rows}
    kernel = m["versions"].get("cpu_kernel") if m["device_type"] == "cpu" else None
    lines = [f"Speedup over `nn.RNN`, forward / forward+backward ({m['device']}"
             + (f", {kernel}" if kernel else "") + f", torch {m['versions']['torch']}, "
             f"{m['dtype']}, {m['date'][:10]}"
             + (f", commit {m['commit']}" if m.get("commit") else "") + "):", "",
             "| B | H | " + " | ".join(config_name(*c) for c in configs) + " |",
             "|---|---|" + "---|" * len(configs)]
    for b, h in sorted({(r["B"], r["H"]) for r in rows}):
        out = []
        for c in configs:
            r = cells.get((b, h, *c))
            out.append("—" if r is None else
                       f"{r['speedup_forward']:.2f} / {r['speedup_forward_backward']:.2f}"
                       + ("" if r["correct"] else " **FAIL**"))
        lines.append(f"| {b} | {h} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", help="a results.json written by bench.run")
    args = p.parse_args(argv)
    with open(args.report) as f:
        sys.stdout.write(speedup_table(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
