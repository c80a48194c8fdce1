"""A few fuzz-style cases through a real process (the installed entry point's code path):
exit status 2, exactly one stderr line, no traceback, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from actsparse.frontend import zoo
from tests.reliability.harness import COUNTS, listing

REPO = Path(__file__).resolve().parents[2]


def _cases(folder: Path) -> dict[str, list[str]]:
    good = folder / "good.onnx"
    onnx.save(zoo.swiglu_stack(layers=1, d=8, f=16), good)
    data = good.read_bytes()
    (folder / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (folder / "garbage.onnx").write_bytes(b"\x00\xff" * 100)
    (folder / "calib.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (folder / "model.tar").write_bytes(b"\x1f\x8b" + b"\x00" * 50)
    out = str(folder / "out.onnx")
    return {
        "inspect truncated": ["inspect", str(folder / "truncated.onnx")],
        "optimize garbage": ["optimize", str(folder / "garbage.onnx"), "-o", out],
        "bad pipeline": ["optimize", str(good), "-o", out, "--passes", "sparsify{sparsity=2}"],
        "unknown pass": ["optimize", str(good), "-o", out, "--passes", "nosuch"],
        "bad calibration": ["optimize", str(good), "-o", out, "--calib", str(folder / "calib.npz")],
        "output is input": ["optimize", str(good), "-o", str(folder / "." / "good.onnx")],
        "bad target": ["compile", str(good), "-o", str(folder / "art"), "--target", "{nope"],
        "corrupt tar": ["run", str(folder / "model.tar")],
        "missing file": ["inspect", str(folder / "missing.onnx")],
        "usage error": ["optimize", str(good)],
    }


@pytest.mark.slow
def test_bad_input_through_a_real_process(tmp_path):
    names = list(_cases(tmp_path))
    before = listing(tmp_path)
    for name in names:
        argv = _cases(tmp_path)[name]
        COUNTS["subprocess: bad input"] += 1
        done = subprocess.run([sys.executable, "-m", "actsparse.cli", *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (name, done.stderr)
        assert len(lines) == 1 and lines[0].startswith("actsparse: error: "), (name, done.stderr)
        assert listing(tmp_path) == before, name


def test_control_characters_in_error_messages_are_escaped(tmp_path, capsys):
    """A hostile name must not split the one-line error or send escape codes to the terminal."""
    from actsparse import cli

    name = tmp_path / "evil\r\n\x1b[2Jname\x85.onnx"
    assert cli.main(["inspect", str(name)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "\r" not in err and len(err.splitlines()) == 1
    assert "evil\\r\\n\\x1b[2Jname\\x85.onnx: no such file" in err
