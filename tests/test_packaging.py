"""Packaging: one version, typed package, docstrings, and a CPU-only sdist → wheel that works."""

from __future__ import annotations

import glob
import importlib.metadata
import os
import subprocess
import sys

import pytest

import fused_rnn

from conftest import ROOT


def test_version_in_one_place():
    ns = {}
    with open(os.path.join(ROOT, "fused_rnn", "_version.py")) as f:
        exec(f.read(), ns)
    assert fused_rnn.__version__ == ns["__version__"]
    for path in ("setup.py", "pyproject.toml"):
        with open(os.path.join(ROOT, path)) as f:
            assert ns["__version__"] not in f.read(), f"version repeated in {path}"


def test_typed_and_documented():
    assert os.path.exists(os.path.join(ROOT, "fused_rnn", "py.typed"))
    for name in fused_rnn.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(fused_rnn, name)
        assert obj.__doc__ and obj.__doc__.strip(), f"{name} has no docstring"


def _installed(distribution: str) -> bool:
    """Whether a distribution is installed. (importlib.util.find_spec("build") is not that: it
    also finds the setuptools build/ folder of the checkout, on sys.path as the current folder,
    as a namespace package.)"""
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _installed("build"), reason="needs the 'build' package")
def test_cpu_only_sdist_and_wheel(tmp_path):
    """`python -m build --no-isolation` with CUDA switched off: the wheel is built from the sdist
    (so the sdist is complete), installs, and runs the fused CPU kernels."""
    env = dict(os.environ, FUSED_RNN_CUDA="0")
    res = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
                          str(tmp_path / "dist"), ROOT], capture_output=True, text=True, env=env,
                         timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert glob.glob(str(tmp_path / "dist" / "*.tar.gz"))
    (wheel,) = glob.glob(str(tmp_path / "dist" / "*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
                    str(target), wheel], check=True, capture_output=True, timeout=600)
    code = ("import fused_rnn, torch; m = fused_rnn.RNN(3, 4); o, h = m(torch.randn(5, 2, 3)); "
            "print(fused_rnn.__file__, fused_rnn.backend('cpu'), "
            "fused_rnn._ops._C.has_cuda_kernels(), tuple(o.shape))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(target)), cwd=str(tmp_path),
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert str(target) in out.stdout and "fused False (5, 2, 4)" in out.stdout, out.stdout
