"""`actsparse bench LM.actsparse`: tokens/s of a causal-LM artifact, against baselines on the same
Hugging Face folder, prompt and threads; clear errors for what cannot run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

pytest.importorskip("tvm")
pytest.importorskip("transformers")

from actsparse.benchmark.generate import parse_baselines  # noqa: E402
from actsparse.errors import ActsparseError  # noqa: E402
from actsparse.lm.compile import compile_causal_lm  # noqa: E402

from tests.lm.test_generate import hf_folder  # noqa: E402,F401 (fixture)

CLI = [sys.executable, "-m", "actsparse.cli"]


@pytest.fixture(scope="module")
def artifact(hf_folder, tmp_path_factory):  # noqa: F811
    folder, _ = hf_folder
    return compile_causal_lm(folder, "host", output=tmp_path_factory.mktemp("bench") / "lm.actsparse",
                             max_context=64).path


def _bench(artifact, *args, cwd=None):
    return subprocess.run(CLI + ["bench", str(artifact), *args], capture_output=True, text=True, cwd=cwd)


def test_baselines_parse_with_default_and_named_precisions():
    assert parse_baselines("torch, llama.cpp:q8_0,onnxruntime-genai") == [
        ("torch", "fp32"), ("llama.cpp", "q8_0"), ("onnxruntime-genai", "fp32")]
    assert parse_baselines("none") == parse_baselines(None) == []
    with pytest.raises(ActsparseError, match="unknown engine"):
        parse_baselines("vllm")
    with pytest.raises(ActsparseError, match="q8_0"):
        parse_baselines("llama.cpp:q3_k")


@pytest.mark.slow
def test_an_lm_artifact_is_timed_against_torch_on_its_own_folder(artifact, tmp_path):
    out = tmp_path / "bench.json"
    done = _bench(artifact, "--against", "torch", "--prompt-tokens", "8", "--new-tokens", "4", "--rounds", "2",
                  "--json", str(out), cwd=tmp_path)  # the folder comes from the manifest, from any directory
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert [row["engine"] for row in results["rows"]] == ["actsparse", "torch fp32"]
    torch_row = results["rows"][1]
    assert torch_row["decode_tps"] > 0 and torch_row["actsparse_decode_speedup"] > 0
    assert results["prompt_tokens"] == 8 and results["rounds"] == 2 and results["threads"] >= 1
    assert "torch fp32" in done.stdout and "round 2/2 torch fp32" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("engine,package,hint", [("llama.cpp:q8_0", "llama_cpp", "llama-cpp-python"),
                                                 ("onnxruntime-genai:int4", "onnxruntime_genai", "onnxruntime-genai")])
def test_a_baseline_that_is_not_installed_names_what_to_install(artifact, engine, package, hint):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    done = _bench(artifact, "--against", engine, "--new-tokens", "4", "--rounds", "1")
    error = done.stderr.strip().splitlines()[-1]  # after the progress lines
    assert done.returncode == 2 and error.startswith("actsparse: error:") and hint in error, done.stderr


@pytest.mark.slow
def test_bad_bench_requests_are_one_line_errors(artifact, tmp_path):
    cases = [(["--prompt-tokens", "60", "--new-tokens", "10"], "exceed the artifact's context of 64"),
             (["--prompt-tokens", "63"], "--new-tokens >= 2"),  # the default leaves 1 new token
             (["--against", "torch", "--model", str(tmp_path)], "no config.json"),
             (["--against", "vllm"], "unknown engine")]
    for args, message in cases:
        done = _bench(artifact, *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)


@pytest.mark.slow
def test_generate_on_an_artifact_that_is_not_an_lm_is_refused(tmp_path):
    import onnx

    import actsparse
    from actsparse.frontend import zoo

    onnx.save(zoo.swiglu_stack(layers=1, d=32, f=64), tmp_path / "ffn.onnx")
    art = actsparse.compile(str(tmp_path / "ffn.onnx"), output=tmp_path / "ffn.actsparse")
    done = _bench(art.path, "--generate")
    assert done.returncode == 2 and "causal-LM artifact" in done.stderr, done.stderr
