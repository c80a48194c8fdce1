"""Names from a model file never reach the terminal raw: ESC, newlines and rich markup in node and
input names are escaped in `inspect` (and every table the CLI prints)."""

from __future__ import annotations

import subprocess
import sys

import onnx

from actsparse.frontend import zoo


def test_inspect_escapes_control_characters_and_markup(tmp_path):
    model = zoo.swiglu_stack(layers=1, d=16, f=32)
    evil = "x\x1b[2J\nname[bold]"
    model.graph.input[0].name = evil
    for node in model.graph.node:
        node.input[:] = [evil if i == "x" else i for i in node.input]
    model.graph.node[0].name = "gate\r\x07[red]"
    onnx.save(model, tmp_path / "evil.onnx")
    done = subprocess.run([sys.executable, "-m", "actsparse.cli", "inspect", str(tmp_path / "evil.onnx")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout and "\r" not in done.stdout
    assert "\\x1b" in done.stdout and "\\n" in done.stdout  # shown escaped, and the markup shown as text
    assert "[bold]" in done.stdout.replace("\n", "").replace(" ", "").replace("│", "")
