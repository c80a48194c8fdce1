"""Bad pass strings, pass options, recipes and numeric flags fed to `optimize`.

Most cases are parse errors (fast); the well-formed ones run the real passes on a tiny
model, so option values reach the passes themselves.
"""

from __future__ import annotations

import json

import onnx
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from actsparse.passes.base import available_passes, option_docs
from tests.reliability.harness import fuzz_settings, run_cli

PASSES = available_passes()
PASS_NAMES = list(PASSES)
OPTION_NAMES = sorted({doc["name"] for cls in PASSES.values() for doc in option_docs(cls)})
# Values around the edges of every option's range, and text that looks like a number.
VALUES = ["0", "1", "-1", "0.5", "1.5", "1e308", "-1e308", "nan", "inf", "-inf", "1e-320", "true", "false",
          "none", "", " ", "2**64", "99999999999999999999", "0x10", "1_000", "teal", "wina", "cats", "gptq",
          "qdq", "a:0.1;b:0.2", "a:x", ":", ";", "layers.0.mlp.down_proj:1.5", "relu2", "shifted_relu"]

pipeline_chars = st.sampled_from(list("{}=,; :") + ["sparsify", "relufy", "cleanup", "measure", "quantize",
                                                    "prune", "method", "sparsity", "0.5", "x"])
option_value = st.sampled_from(VALUES) | st.text(max_size=10).filter(lambda t: not set(t) & set("{},="))
option = st.tuples(st.sampled_from(OPTION_NAMES) | st.text(min_size=1, max_size=6), option_value)
pass_item = st.tuples(st.sampled_from(PASS_NAMES) | st.text(min_size=1, max_size=8), st.lists(option, max_size=3))


def _pipeline(items) -> str:
    return ",".join(name + ("{" + ",".join(f"{k}={v}" for k, v in opts) + "}" if opts else "") for name, opts in items)


@pytest.fixture(scope="module")
def tiny_path(tiny_models, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "swiglu.onnx"
    onnx.save(tiny_models["swiglu"], path)
    return path


def _optimize(cases, tiny_path, extra, category):
    with cases.new() as folder:
        argv = ["optimize", tiny_path, "-o", folder / "out.onnx", "--samples", "2", *extra]
        return run_cli(argv, folder, category=category, outputs=("out.onnx",))


@fuzz_settings(300)
@given(text=st.text(max_size=40) | st.lists(pipeline_chars, max_size=12).map("".join))
def test_random_pipeline_text(cases, tiny_path, text):
    _optimize(cases, tiny_path, [f"--passes={text}", "--no-verify"], "optimize: pipeline text")


@fuzz_settings(200)
@given(items=st.lists(pass_item, min_size=1, max_size=3), verify=st.booleans())
def test_structured_pipelines_with_bad_options(cases, tiny_path, items, verify):
    extra = [f"--passes={_pipeline(items)}"] + ([] if verify else ["--no-verify"])
    _optimize(cases, tiny_path, extra, "optimize: pass options")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
    | st.sampled_from(PASS_NAMES + VALUES),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(PASS_NAMES + OPTION_NAMES + ["name", "options", "passes"]) | st.text(max_size=5), children,
        max_size=3),
    max_leaves=12,
)


@fuzz_settings(150)
@given(content=json_values, as_yaml=st.booleans(), raw=st.none() | st.binary(max_size=64))
def test_recipes(cases, tiny_path, content, as_yaml, raw):
    with cases.new() as folder:
        recipe = folder / "recipe.yaml"
        if raw is not None:
            recipe.write_bytes(raw)
        else:
            recipe.write_text(yaml.safe_dump(content) if as_yaml else json.dumps(content))
        argv = ["optimize", tiny_path, "-o", folder / "out.onnx", "--recipe", recipe, "--samples", "2", "--no-verify"]
        run_cli(argv, folder, category="optimize: recipes", outputs=("out.onnx",))


small_or_huge = st.integers(-3, 8) | st.sampled_from([0, 2**31, 2**40, 10**12, -(2**63)])


@fuzz_settings(100)
@given(samples=small_or_huge, seq_len=small_or_huge, seed=st.integers(-(2**70), 2**70),
       passes=st.sampled_from(["cleanup", "measure", "sparsify{sparsity=0.3}"]))
def test_numeric_flags(cases, tiny_path, samples, seq_len, seed, passes):
    with cases.new() as folder:
        argv = ["optimize", tiny_path, "-o", folder / "out.onnx", f"--passes={passes}", f"--samples={samples}",
                f"--seq-len={seq_len}", f"--seed={seed}"]
        run_cli(argv, folder, category="optimize: numeric flags", outputs=("out.onnx",))
