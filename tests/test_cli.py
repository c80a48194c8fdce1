"""The command line: `inspect`, `passes`, `optimize` (pipelines, recipes, report replay) and
its errors: exit status 2, one line `actsparse: error: ...` on stderr, no traceback, nothing
written, and the input file byte-identical after every command.

Most commands run in-process through `actsparse.cli.main`; two run the installed script."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from actsparse.cli import main
from actsparse.frontend.zoo import swiglu_stack
from tests.onnx_models import run_ort

SCRIPT = Path(sys.executable).parent / "actsparse"
WORKDIR_FILES = {"m.onnx", "random.onnx", "text.onnx", "truncated.onnx", "sub", "link.onnx"}
ERROR_PREFIX = "actsparse: error:"


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


class Workdir:
    """A temp folder holding `m.onnx` (the SwiGLU stack) and some bad files; every command run
    through it checks that the input model is byte-identical afterwards."""

    def __init__(self, path: Path, model: Path, capsys):
        self.path, self.capsys = path, capsys
        self.model = path / "m.onnx"
        shutil.copyfile(model, self.model)
        self.digest = _sha256(self.model)
        (path / "random.onnx").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
        (path / "text.onnx").write_text("this is not a model\n")
        (path / "truncated.onnx").write_bytes(self.model.read_bytes()[: self.model.stat().st_size // 2])
        (path / "sub").mkdir()
        os.symlink(self.model, path / "link.onnx")

    def run(self, *args: str) -> Result:
        self.capsys.readouterr()
        cwd = os.getcwd()
        os.chdir(self.path)  # relative paths as a user types them
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        finally:
            os.chdir(cwd)
        captured = self.capsys.readouterr()
        assert _sha256(self.model) == self.digest, f"input changed by {args}"
        return Result(code, captured.out, captured.err)

    def listing(self) -> set[str]:
        return {str(p.relative_to(self.path)) for p in self.path.rglob("*")}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def work(tmp_path, swiglu_stack_onnx, capsys) -> Workdir:
    return Workdir(tmp_path, swiglu_stack_onnx, capsys)


def _sparsify_ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(path).graph.node if n.domain == "actsparse"]


def _x(seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((1, 64)).astype(np.float32)}


# ------------------------------------------------------------------ inspect

def test_inspect_table(work):
    result = work.run("inspect", "m.onnx")
    assert result.code == 0 and not result.err
    for text in ("m.onnx", "opset 17", "blocks found", "layers.0.mlp", "layers.1.mlp", "gated", "silu",
                 "layers.0.mlp.down_proj (176x64)", "linear layers: 6"):
        assert text in result.out, text


def test_inspect_json(work):
    result = work.run("inspect", "m.onnx", "--json")
    assert result.code == 0
    summary = json.loads(result.out)
    assert summary["opset"] == 17 and summary["linears"] == 6
    assert summary["inputs"] == [{"name": "x", "dtype": "FLOAT", "shape": [1, 64]}]
    assert summary["parameters"] == 2 * 3 * 64 * 176 and summary["parameter_bytes"] == 4 * summary["parameters"]
    assert summary["ops"] == {"MatMul": 6, "Mul": 4, "Sigmoid": 2, "Add": 2, "Identity": 1}
    assert [(b["name"], b["kind"], b["activation"]) for b in summary["ffn_blocks"]] == [
        ("layers.0.mlp", "gated", "silu"), ("layers.1.mlp", "gated", "silu")]
    assert summary["ffn_blocks"][0]["linears"] == [
        "layers.0.mlp.gate_proj (64x176)", "layers.0.mlp.up_proj (64x176)", "layers.0.mlp.down_proj (176x64)"]
    assert summary["attention_blocks"] == [] and summary["activations"]["silu"] == 2


def test_inspect_counts_each_activation_once(work):
    assert json.loads(work.run("inspect", "m.onnx", "--json").out)["activations"] == {"silu": 2}


def test_inspect_names_unnamed_linears_as_the_passes_do(tmp_path, capsys):
    """A graph without node names (valid ONNX) listed its linears as " (64x176)": inspect now shows
    the names passes and reports give them, which sparsify's overrides= accepts."""
    model = onnx.load_from_string(swiglu_stack(layers=1, d=32, f=64).SerializeToString())
    for node in model.graph.node:
        node.name = ""
    onnx.save(model, tmp_path / "unnamed.onnx")
    assert main(["inspect", str(tmp_path / "unnamed.onnx"), "--json"]) == 0
    linears = json.loads(capsys.readouterr().out)["ffn_blocks"][0]["linears"]
    names = [entry.split(" (")[0] for entry in linears]
    assert all(names) and len(set(names)) == 3, linears
    report = tmp_path / "report.json"
    assert main(["optimize", str(tmp_path / "unnamed.onnx"), "-o", str(tmp_path / "out.onnx"), "--report", str(report),
                 "--passes", f"sparsify{{method=teal,sparsity=0.5,scope=down,overrides={names[2]}:0.2}}"]) == 0
    layers = json.loads(report.read_text())["passes"][0]["result"]["report"]["layers"]
    assert [(layer["name"], layer["target"]) for layer in layers] == [(names[2], 0.2)]


def test_inspect_json_tiny_llama(tmp_path, llama_onnx, capsys):
    assert main(["inspect", str(llama_onnx), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [b["name"] for b in summary["ffn_blocks"]] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert [b["name"] for b in summary["attention_blocks"]] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert [len(b["linears"]) for b in summary["attention_blocks"]] == [4, 4]


# ------------------------------------------------------------------ passes

def test_passes_lists_every_pass(work):
    result = work.run("passes")
    assert result.code == 0
    for name in ("cleanup", "measure", "relufy", "sparsify"):
        assert name in result.out
    assert "method=teal" in result.out and "approx" in result.out


def test_passes_shows_one_pass_in_full(work):
    result = work.run("passes", "sparsify")
    assert result.code == 0
    assert "sparsify (approximate)" in result.out
    assert "Before: y = x @ W" in result.out  # the module docstring: the transformation
    for option in ("method", "sparsity", "scope", "allocate", "overrides", "teal|wina|cats"):
        assert option in result.out


# ------------------------------------------------------------------ optimize

def test_optimize_with_passes(work):
    result = work.run("optimize", "m.onnx", "-o", "out.onnx", "--passes", "sparsify{scope=down,sparsity=0.5}")
    assert result.code == 0, result.err
    out = work.path / "out.onnx"
    onnx.checker.check_model(str(out))
    assert _sparsify_ops(out) == ["Sparsify", "Sparsify"]
    assert "wrote out.onnx" in result.err and "sparsify" in result.err  # the pass table
    (y,) = run_ort(out, _x())
    (y_dense,) = run_ort(work.model, _x())
    assert y.shape == y_dense.shape and not np.array_equal(y, y_dense)
    assert work.listing() == WORKDIR_FILES | {"out.onnx"}  # no temp files left behind


def test_optimize_default_pipeline_is_cleanup(work):
    assert work.run("optimize", "m.onnx", "-o", "out.onnx").code == 0
    np.testing.assert_allclose(run_ort(work.path / "out.onnx", _x())[0], run_ort(work.model, _x())[0], rtol=1e-6)
    assert not _sparsify_ops(work.path / "out.onnx")


def test_optimize_with_a_yaml_recipe(work):
    (work.path / "recipe.yaml").write_text(
        "passes:\n  - relufy\n  - sparsify: {method: wina, scope: down, sparsity: 0.3}\n  - cleanup\n")
    result = work.run("optimize", "m.onnx", "-o", "out.onnx", "--recipe", "recipe.yaml")
    assert result.code == 0, result.err
    ops = [n.op_type for n in onnx.load(work.path / "out.onnx").graph.node]
    assert ops.count("Relu") == 2 and ops.count("SparsifyWeighted") == 2 and "Sigmoid" not in ops


def test_report_replays_to_an_identical_model(work):
    pipeline = "relufy,sparsify{method=wina,scope=ffn,allocate=greedy,sparsity=0.6,overrides=layers.1.mlp.down_proj:0.2}"
    first = work.run("optimize", "m.onnx", "-o", "a.onnx", "--passes", pipeline, "--report", "report.json")
    assert first.code == 0, first.err
    report = json.loads((work.path / "report.json").read_text())
    assert report["input"] == "m.onnx" and report["output"] == "a.onnx"
    assert [p["name"] for p in report["passes"]] == ["relufy", "sparsify"]
    sparsify = report["passes"][1]
    assert sparsify["options"]["overrides"] == {"layers.1.mlp.down_proj": 0.2}
    assert {"exact", "modified", "seconds", "accuracy_vs_original", "report"} <= set(sparsify["result"])
    assert 0 < sparsify["result"]["accuracy_vs_original"]["cosine"] < 1
    replay = work.run("optimize", "m.onnx", "-o", "b.onnx", "--recipe", "report.json")
    assert replay.code == 0, replay.err
    assert (work.path / "a.onnx").read_bytes() == (work.path / "b.onnx").read_bytes()


def test_report_replay_keeps_the_calibration_settings(work):
    pipeline = "sparsify{scope=ffn}"
    first = work.run("optimize", "m.onnx", "-o", "a.onnx", "--passes", pipeline, "--samples", "3", "--seed", "7",
                     "--report", "report.json")
    assert first.code == 0, first.err
    assert work.run("optimize", "m.onnx", "-o", "b.onnx", "--recipe", "report.json").code == 0
    assert (work.path / "a.onnx").read_bytes() == (work.path / "b.onnx").read_bytes()


def test_calibration_file_and_no_verify(work):
    rng = np.random.default_rng(3)
    np.savez(work.path / "calib.npz", x=rng.standard_normal((6, 1, 64)).astype(np.float32))
    result = work.run("optimize", "m.onnx", "-o", "out.onnx", "--passes", "sparsify", "--calib", "calib.npz",
                      "--no-verify")
    assert result.code == 0, result.err
    assert len(_sparsify_ops(work.path / "out.onnx")) == 4


def test_version(work):
    result = work.run("--version")
    assert result.code == 0 and result.out.startswith("actsparse ")


# ------------------------------------------------------------------ errors

def _npz(name, **arrays):
    def make(path: Path):
        np.savez(path / name, **arrays)
    return make


def _npy(path: Path):
    np.save(path / "calib.npy", np.ones((1, 64), np.float32))


# (id, argv, expected message, setup)
ERRORS = [
    ("missing file", ["optimize", "nope.onnx", "-o", "out.onnx"], "nope.onnx: no such file", None),
    ("random bytes", ["optimize", "random.onnx", "-o", "out.onnx"], "not a readable ONNX file", None),
    ("text file", ["optimize", "text.onnx", "-o", "out.onnx"], "not a readable ONNX file", None),
    ("truncated", ["optimize", "truncated.onnx", "-o", "out.onnx"], "truncated.onnx: not a", None),
    ("a folder", ["optimize", "sub", "-o", "out.onnx"], "is a directory", None),
    ("unknown pass", ["optimize", "m.onnx", "-o", "out.onnx", "--passes", "bogus"], "unknown pass 'bogus'", None),
    ("bad option value", ["optimize", "m.onnx", "-o", "out.onnx", "--passes", "sparsify{sparsity=2}"],
     r"must be in \[0, 1\]", None),
    ("unknown option", ["optimize", "m.onnx", "-o", "out.onnx", "--passes", "sparsify{methd=teal}"],
     "no option 'methd'", None),
    ("bad pipeline", ["optimize", "m.onnx", "-o", "out.onnx", "--passes", "sparsify{"], "unbalanced", None),
    ("unknown override", ["optimize", "m.onnx", "-o", "out.onnx", "--passes", "sparsify{overrides=nope:0.5}"],
     "override 'nope' names no sparsified layer", None),
    ("-o is the input", ["optimize", "m.onnx", "-o", "m.onnx"], "refusing to overwrite the input", None),
    ("-o spelled differently", ["optimize", "m.onnx", "-o", "sub/../m.onnx"], "refusing to overwrite", None),
    ("-o absolute", ["optimize", "m.onnx", "-o", "{abs}/m.onnx"], "refusing to overwrite", None),
    ("-o symlink to input", ["optimize", "m.onnx", "-o", "link.onnx"], "refusing to overwrite", None),
    ("input via symlink", ["optimize", "link.onnx", "-o", "m.onnx"], "refusing to overwrite", None),
    ("output folder missing", ["optimize", "m.onnx", "-o", "nodir/out.onnx"], "output folder does not exist", None),
    ("-o is a folder", ["optimize", "m.onnx", "-o", "sub"], "is a directory", None),
    ("calib missing", ["optimize", "m.onnx", "-o", "out.onnx", "--calib", "nope.npz"], "no such calibration file",
     None),
    ("calib not npz", ["optimize", "m.onnx", "-o", "out.onnx", "--calib", "text.onnx"], "not a readable .npz", None),
    ("calib wrong names", ["optimize", "m.onnx", "-o", "out.onnx", "--calib", "c.npz"], r"missing inputs \['x'\]",
     _npz("c.npz", y=np.ones((1, 64), np.float32))),
    ("calib NaN", ["optimize", "m.onnx", "-o", "out.onnx", "--calib", "c.npz"], "contains NaN",
     _npz("c.npz", x=np.full((1, 64), np.nan, np.float32))),
    ("calib .npy", ["optimize", "m.onnx", "-o", "out.onnx", "--calib", "calib.npy"], r"calib\.npy: .*\.npz", _npy),
    ("recipe missing", ["optimize", "m.onnx", "-o", "out.onnx", "--recipe", "nope.yaml"], "no such recipe file", None),
    ("passes and recipe", ["optimize", "m.onnx", "-o", "out.onnx", "--passes", "cleanup", "--recipe", "r.yaml"],
     "either passes or a recipe", None),
    ("inspect not onnx", ["inspect", "random.onnx"], "not a readable ONNX file", None),
    ("unknown pass help", ["passes", "bogus"], "unknown pass 'bogus'", None),
    ("argparse: no -o", ["optimize", "m.onnx"], "the following arguments are required: -o", None),
    ("argparse: bad flag", ["optimize", "m.onnx", "-o", "out.onnx", "--bogus"], "unrecognized arguments: --bogus",
     None),
    ("argparse: no command", [], "the following arguments are required: command", None),
]


@pytest.mark.parametrize("argv, message, setup", [pytest.param(a, m, s, id=i) for i, a, m, s in ERRORS])
def test_errors_exit_2_with_one_line_and_write_nothing(work, argv, message, setup):
    if setup:
        setup(work.path)
    before = work.listing()
    result = work.run(*[arg.replace("{abs}", str(work.path)) for arg in argv])
    assert result.code == 2, result.err
    assert result.err.splitlines() == result.err_lines and len(result.err_lines) == 1, result.err  # no blank lines
    assert result.err_lines[0].startswith(ERROR_PREFIX)
    assert re.search(message, result.err_lines[0]), result.err_lines[0]
    assert "Traceback" not in result.err and not result.out
    assert work.listing() == before  # no output, no temp file


def test_report_folder_missing_is_a_user_error(work):
    result = work.run("optimize", "m.onnx", "-o", "out.onnx", "--report", "nodir/report.json")
    assert result.code == 2 and result.err_lines[-1].startswith(ERROR_PREFIX)
    assert not (work.path / "out.onnx").exists()


def test_internal_errors_are_one_line_too(work, monkeypatch):
    """A bug (not the user's input) exits 1 with one line, and a traceback only when asked."""
    import actsparse.passes.cleanup as cleanup

    def broken(self, model):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cleanup.CleanupPass, "call", broken)
    monkeypatch.delenv("ACTSPARSE_DEBUG", raising=False)
    result = work.run("optimize", "m.onnx", "-o", "out.onnx")
    assert result.code == 1
    assert result.err_lines[-1] == ("actsparse: internal error: RuntimeError: boom "
                                    "(set ACTSPARSE_DEBUG=1 for a traceback)")
    assert not (work.path / "out.onnx").exists()
    monkeypatch.setenv("ACTSPARSE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["optimize", str(work.model), "-o", str(work.path / "out.onnx")])


# ------------------------------------------------------------------ the installed script

def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_script_inspect_json(work):
    result = _script("inspect", "--json", "m.onnx", cwd=work.path)
    assert result.returncode == 0, result.stderr
    assert [b["name"] for b in json.loads(result.stdout)["ffn_blocks"]] == ["layers.0.mlp", "layers.1.mlp"]


def test_script_error_is_one_line_without_traceback(work):
    result = _script("optimize", "truncated.onnx", "-o", "out.onnx", cwd=work.path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(ERROR_PREFIX) and not result.stdout
    assert not (work.path / "out.onnx").exists()


def test_bench_times_the_artifact_against_onnxruntime(work):
    """`actsparse bench`: both engines timed in alternating blocks, ratios and GB/s in the JSON."""
    assert work.run("compile", "m.onnx", "-o", "m.actsparse", "--target", "host").code == 0
    result = work.run("bench", "m.actsparse", "--iters", "3", "--json", "bench.json")
    assert result.code == 0, result.err
    report = json.loads((work.path / "bench.json").read_text())
    rows = {row["engine"]: row for row in report["rows"]}
    assert set(rows) == {"actsparse", "onnxruntime"}
    assert rows["onnxruntime"]["speedup_vs_onnxruntime"] == 1.0
    # the median over blocks of onnxruntime's block time / actsparse's block time
    block_ratios = np.array(rows["onnxruntime"]["block_ms"]) / np.array(rows["actsparse"]["block_ms"])
    assert rows["actsparse"]["speedup_vs_onnxruntime"] == pytest.approx(np.median(block_ratios), rel=1e-2, abs=5e-4)  # the report rounds to 3 decimals
    assert rows["actsparse"]["ms"] == pytest.approx(min(rows["actsparse"]["block_ms"]), abs=1e-3)
    assert all(row["weight_gbs"] > 0 for row in rows.values()) and report["copy_bandwidth_gbs"] > 0
    assert "speed vs ORT" in result.out
    assert work.run("bench", "m.actsparse", "--against", "torch").code == 2
