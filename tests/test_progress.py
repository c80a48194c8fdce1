"""Progress on a terminal: per pass, and per calibration sample inside a pass (minutes on real
models); nothing of it when stderr is not a terminal."""

from __future__ import annotations

import os
import subprocess
import sys

import onnx
import pytest

import actsparse
from actsparse.frontend.zoo import gelu_mlp_stack, swiglu_stack


@pytest.mark.parametrize("passes", ["sparsify{method=teal,sparsity=0.5}", "sparsify{method=wina,sparsity=0.5}",
                                    "chess", "quantize{bits=8}", "measure"])
def test_calibrating_passes_report_each_sample(passes):
    calls = []
    actsparse.optimize(swiglu_stack(layers=1, d=32, f=64), passes=passes, verify=False,
                       on_sample=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 8) for i in range(1, 9)]


def test_compile_reports_calibration_samples(tmp_path):
    calls = []
    actsparse.compile(swiglu_stack(layers=1, d=32, f=64), passes="sparsify{method=teal,sparsity=0.5}",
                      output=tmp_path / "m.actsparse", on_sample=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (8, 8)


def test_causal_lm_compile_reports_calibration_samples(tmp_path):
    """A causal LM calibrates on decode steps: each one is a sample of the progress."""
    from tests.lm.test_generate import random_lm

    calls = []
    actsparse.compile(random_lm("llama"), passes="sparsify{method=teal,sparsity=0.5}", max_context=32,
                      output=tmp_path / "lm.actsparse", on_sample=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1][0] == calls[-1][1] == len(calls)


def _run(args: list[str], *, terminal: bool) -> str:
    """The command's stderr (and stdout), as a terminal (a pseudo-terminal) or a pipe shows it."""
    command = [sys.executable, "-m", "actsparse.cli", *args]
    env = {**os.environ, "COLUMNS": "140", "TERM": "xterm"}
    env.pop("FORCE_COLOR", None)
    if not terminal:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stderr
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen(command, stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    output = b""
    while True:
        try:
            data = os.read(leader, 1 << 16)
        except OSError:  # EIO: the command ended and closed the terminal
            break
        if not data:
            break
        output += data
    os.close(leader)
    assert process.wait(timeout=300) == 0, output.decode(errors="replace")
    return output.decode(errors="replace")


def test_optimize_shows_calibration_samples_on_a_terminal_only(tmp_path):
    pytest.importorskip("pty")
    source = tmp_path / "mlp.onnx"
    onnx.save(gelu_mlp_stack(layers=1, d=32, f=64), source)
    args = ["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--passes",
            "sparsify{method=teal,sparsity=0.5}", "--samples", "5"]
    shown = _run(args, terminal=True)
    assert "sparsify: calibration sample" in shown and "5/5" in shown
    assert "calibration sample" not in _run(args, terminal=False)
