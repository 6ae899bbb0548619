"""The examples run end to end (shortened), print what they promise and save their plots."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT


def run_example(name, *args, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_sequence_classifier(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = run_example("sequence_classifier.py", "--epochs", "2", "--out", "curves.png",
                      tmp_path=tmp_path)
    assert "nn.RNN: final loss" in out and "fused_rnn.RNN: final loss" in out
    diff = float(out.split("max difference of the per-epoch losses: ")[1].split(";")[0])
    assert diff < 1e-4, out  # the two implementations train alike
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_char_lm(tmp_path):
    pytest.importorskip("matplotlib")
    out = run_example("char_lm.py", "--steps", "8", "--chars", "20000", "--hidden", "64",
                      "--bptt", "30", "--sample", "40", "--out", "loss.png", tmp_path=tmp_path)
    assert "sample:\nThe " in out
    assert (tmp_path / "loss.png").stat().st_size > 1000
