"""A dependency-free progress bar for the examples."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "", width: int = 30):
        self.total, self.label, self.width = total, label, width
        self.start = time.perf_counter()
        self.done = 0

    def update(self, n: int = 1, **info) -> None:
        self.done += n
        frac = self.done / max(self.total, 1)
        bar = "#" * int(self.width * frac) + "." * (self.width - int(self.width * frac))
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in info.items())
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s {extra}  ")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()
