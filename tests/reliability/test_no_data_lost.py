"""No data lost: outputs appear whole or not at all, inputs are never overwritten, and an
interrupted `optimize`/`compile` (SIGINT or SIGTERM) leaves the previous output intact and no
temp files.

The interrupt tests run the CLI in a subprocess with a test hook that pauses right after the
output's temp file (or the artifact's staging folder) is written, then send the signal there:
the worst moment, hit every time.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

from actsparse import cli
from actsparse.frontend import zoo
from actsparse.errors import ActsparseError
from actsparse.frontend import onnx_file
from actsparse.frontend.onnx_file import load_model, save_model
from tests.reliability.harness import listing

REPO = Path(__file__).resolve().parents[2]

# Runs `actsparse <argv>` with `module.function` wrapped: after the real call, it writes the
# file READY and sleeps, so the parent can signal the process at exactly that point.
_HOOKED_CLI = r"""
import importlib, sys, time
from pathlib import Path
module_name, function_name, ready = sys.argv[1:4]
module = importlib.import_module(module_name)
real = getattr(module, function_name)
def paused(*args, **kwargs):
    result = real(*args, **kwargs)
    Path(ready).write_text("ready")
    time.sleep(60)
    return result
setattr(module, function_name, paused)
from actsparse.cli import main
sys.exit(main(sys.argv[4:]))
"""


def _small_model(path: Path, seed: int = 0) -> Path:
    onnx.save(zoo.swiglu_stack(layers=1, d=16, f=32, seed=seed), path)
    return path


def _run_until_ready_then_signal(hook: tuple[str, str], argv: list, folder: Path, signum: int):
    ready = folder.parent / f"ready-{folder.name}"
    process = subprocess.Popen(
        [sys.executable, "-c", _HOOKED_CLI, *hook, str(ready), *map(str, argv)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert process.poll() is None, f"exited early: {process.communicate()}"
            assert time.monotonic() < deadline, "the hook was never reached"
            time.sleep(0.05)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, stderr


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_optimize_keeps_the_previous_output(tmp_path, signum, status):
    folder = tmp_path / "work"
    folder.mkdir()
    model = _small_model(folder / "model.onnx")
    previous = b"previous output, must survive"
    (folder / "out.onnx").write_bytes(previous)
    before = listing(folder)
    code, stderr = _run_until_ready_then_signal(
        ("onnx", "save_model"), ["optimize", model, "-o", folder / "out.onnx", "--passes", "cleanup"], folder, signum)
    assert code == status, stderr
    assert stderr.strip().splitlines() == [
        "actsparse: interrupted; no partial output was left" if signum == signal.SIGINT
        else "actsparse: terminated; no partial output was left"]
    assert (folder / "out.onnx").read_bytes() == previous
    assert listing(folder) == before  # the temp file the hook paused after is gone


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_compile_keeps_the_previous_artifact(tmp_path, signum, status):
    folder = tmp_path / "work"
    folder.mkdir()
    model = _small_model(folder / "model.onnx")
    old_artifact = folder / "out"
    assert cli.main(["compile", str(model), "-o", str(old_artifact)]) == 0
    manifest = (old_artifact / "manifest.json").read_bytes()
    before = listing(folder)
    code, stderr = _run_until_ready_then_signal(
        ("actsparse.codegen.package", "_save_params"), ["compile", model, "-o", old_artifact], folder, signum)
    assert code == status, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert (old_artifact / "manifest.json").read_bytes() == manifest
    assert listing(folder) == before  # the staging folder is gone


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_at_a_random_moment_leaves_old_or_new_output(tmp_path, signum):
    """No hook: signal a real run part-way. The output is then the old file or a complete
    new one (loadable), and nothing else is left in the folder."""
    folder = tmp_path / "work"
    folder.mkdir()
    model = folder / "model.onnx"
    onnx.save(zoo.swiglu_stack(layers=4, d=256, f=704), model)
    (folder / "out.onnx").write_bytes(b"old")
    before = listing(folder)
    for delay in (0.5, 1.5, 3.0):
        process = subprocess.Popen([sys.executable, "-m", "actsparse.cli", "optimize", str(model), "-o",
                                    str(folder / "out.onnx"), "--passes", "cleanup,relufy"],
                                   cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
        # -2 was seen once, after main() had printed the interrupt message: CPython may still end
        # by the signal. The promises below (old or whole new output, nothing else) hold either way.
        assert process.returncode in (0, 130, 143, -signal.SIGINT, -signal.SIGTERM), stderr
        assert "Traceback" not in stderr
        content = (folder / "out.onnx").read_bytes()
        if process.returncode in (130, 143):
            assert stderr.strip().splitlines()[-1].endswith("; no partial output was left"), stderr
            if content == b"old":  # interrupted before the output was renamed into place: one line
                assert len(stderr.strip().splitlines()) == 1, stderr
        assert content == b"old" or load_model(folder / "out.onnx") is not None
        assert listing(folder) == before


def test_sigterm_handler_is_installed_only_while_main_runs():
    assert cli.main(["passes"]) == 0
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)


# ---------------------------------------------------------------- the input is never the output

def _optimize_error(argv) -> str:
    err = io.StringIO()
    with redirect_stderr(err):
        status = cli.main([str(a) for a in argv])
    assert status == 2, err.getvalue()
    return err.getvalue()


@pytest.mark.parametrize("command", ["optimize", "compile"])
@pytest.mark.parametrize("alias", ["same", "dot_slash", "symlink", "hardlink", "absolute"])
def test_output_equal_to_the_input_is_refused(tmp_path, monkeypatch, command, alias):
    monkeypatch.chdir(tmp_path)
    model = _small_model(tmp_path / "model.onnx")
    original = model.read_bytes()
    output = {"same": "model.onnx", "dot_slash": "./model.onnx", "absolute": str(model),
              "symlink": "link.onnx", "hardlink": "hard.onnx"}[alias]
    if alias == "symlink":
        os.symlink(model, tmp_path / "link.onnx")
    if alias == "hardlink":
        os.link(model, tmp_path / "hard.onnx")
    before = listing(tmp_path)
    message = _optimize_error([command, "model.onnx", "-o", output])
    assert "refusing to overwrite the input model" in message
    assert model.read_bytes() == original
    assert listing(tmp_path) == before


def test_save_model_refuses_the_source_itself(tmp_path):
    model = _small_model(tmp_path / "model.onnx")
    with pytest.raises(ActsparseError, match="refusing to overwrite the input model"):
        save_model(load_model(model), tmp_path / "." / "model.onnx", source=model)


# ---------------------------------------------------------------- external data written atomically

@pytest.fixture()
def tiny_threshold(monkeypatch):
    """Make every model "large", so save_model takes its external-data branch."""
    monkeypatch.setattr(onnx_file, "EXTERNAL_DATA_THRESHOLD", 1)


def test_external_data_round_trip(tmp_path, tiny_threshold):
    source = _small_model(tmp_path / "model.onnx")
    save_model(load_model(source), tmp_path / "out.onnx", source=source)
    assert sorted(listing(tmp_path)) == ["model.onnx", "out.onnx", "out.onnx.data"]
    proto = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert load_model(tmp_path / "out.onnx") is not None


def test_failed_external_data_save_keeps_the_previous_pair(tmp_path, tiny_threshold, monkeypatch):
    source = _small_model(tmp_path / "model.onnx")
    save_model(load_model(source), tmp_path / "out.onnx", source=source)
    old = {name: (tmp_path / name).read_bytes() for name in ("out.onnx", "out.onnx.data")}
    other = load_model(_small_model(tmp_path / "other.onnx", seed=1))
    before = listing(tmp_path)
    real_save = ir.save  # large models are written by onnx_ir, tensor by tensor

    def save_then_interrupt(*args, **kwargs):  # both files fully written, then Ctrl-C
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ir, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_model(other, tmp_path / "out.onnx", source=tmp_path / "other.onnx")
    assert {name: (tmp_path / name).read_bytes() for name in old} == old
    assert listing(tmp_path) == before


def test_output_data_file_that_is_the_inputs_data_is_refused(tmp_path, tiny_threshold):
    # model.onnx keeps its tensors in "out.onnx.data": writing -o out.onnx would replace them.
    proto = zoo.swiglu_stack(layers=1, d=16, f=32)
    onnx.save_model(proto, str(tmp_path / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="out.onnx.data", size_threshold=0)
    data = (tmp_path / "out.onnx.data").read_bytes()
    with pytest.raises(ActsparseError, match="the input model's data; refusing to overwrite it"):
        save_model(load_model(tmp_path / "model.onnx"), tmp_path / "out.onnx", source=tmp_path / "model.onnx")
    assert (tmp_path / "out.onnx.data").read_bytes() == data
    assert sorted(listing(tmp_path)) == ["model.onnx", "out.onnx.data"]


def test_model_file_round_trips_through_ir(tmp_path):
    """The plain (no external data) branch: temp file + rename, nothing else left."""
    source = _small_model(tmp_path / "model.onnx")
    save_model(ir.serde.deserialize_model(onnx.load(str(source))), tmp_path / "out.onnx", source=source)
    assert sorted(listing(tmp_path)) == ["model.onnx", "out.onnx"]
