"""Which code a benchmark or GPU check measured. No torch import: bench/gpu_check.sh asks before
anything is built."""

from __future__ import annotations

import os
import subprocess
from typing import Optional


def source_commit() -> Optional[str]:
    """The commit the benchmarked code came from: GPU_CHECK_COMMIT where set (a device machine may
    get the working tree without .git), else this checkout's HEAD, marked when the tree has
    uncommitted changes; None outside a git checkout."""
    named = os.environ.get("GPU_CHECK_COMMIT", "").strip()
    if named:
        return named
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=30)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


if __name__ == "__main__":  # bench/gpu_check.sh's "commit" line
    print(source_commit() or "unknown (no .git; set GPU_CHECK_COMMIT)")
