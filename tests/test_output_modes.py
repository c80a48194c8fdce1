"""Outputs get the mode a plain write would give them: 0666 less the umask for a new file, the
existing file's mode when one is replaced (temp files are 0600 and used to keep that mode)."""

from __future__ import annotations

import os
import stat

import numpy as np
import onnx
import pytest

from actsparse.frontend import zoo
from actsparse.atomic import write_json_atomic
from actsparse.cli import main
from actsparse.runtime.run_command import save_npz_atomic


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_outputs_follow_the_umask(tmp_path, umask_022):
    onnx.save(zoo.swiglu_stack(layers=1, d=16, f=32), tmp_path / "in.onnx")
    assert main(["optimize", str(tmp_path / "in.onnx"), "-o", str(tmp_path / "out.onnx"),
                 "--report", str(tmp_path / "report.json")]) == 0
    assert _mode(tmp_path / "out.onnx") == 0o644 and _mode(tmp_path / "report.json") == 0o644
    save_npz_atomic(str(tmp_path / "y.npz"), {"y": np.zeros(3)})
    assert _mode(tmp_path / "y.npz") == 0o644


def test_a_replaced_file_keeps_its_mode(tmp_path, umask_022):
    for path, write in ((tmp_path / "r.json", lambda p: write_json_atomic(p, {"a": 1})),
                        (tmp_path / "o.npz", lambda p: save_npz_atomic(str(p), {"y": np.zeros(2)}))):
        path.write_text("old")
        os.chmod(path, 0o640)
        write(path)
        assert _mode(path) == 0o640
