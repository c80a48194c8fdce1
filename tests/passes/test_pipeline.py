"""Pipeline strings, recipes and typed options."""

import json

import pytest

from actsparse.errors import ActsparseError
from actsparse.passes import PassSpec, load_recipe, make_pass, parse_pipeline


def test_parse_pipeline_with_options():
    specs = parse_pipeline("relufy, sparsify{method=teal,sparsity=0.5} ,cleanup")
    assert specs == [
        PassSpec("relufy"),
        PassSpec("sparsify", {"method": "teal", "sparsity": "0.5"}),
        PassSpec("cleanup"),
    ]


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("relufy,,cleanup", "empty pass name"),
    ("sparsify{method=teal", "unbalanced"),
    ("sparsify}", "unbalanced"),
    ("sparsify{method}", "key=value"),
    ("sparsify{a={b}}", "nested"),
    ("bad name!", "bad pass name"),
])
def test_parse_pipeline_errors(text, message):
    with pytest.raises(ActsparseError, match=message):
        parse_pipeline(text)


def test_options_are_typed_and_validated():
    p = make_pass("sparsify", {"method": "wina", "sparsity": "0.7", "overrides": "a:0.1;b.c:0.9"})
    assert p.options.method == "wina" and p.options.sparsity == 0.7
    assert p.options.overrides == {"a": 0.1, "b.c": 0.9}
    assert make_pass("cleanup", {"fold_constants": "false"}).options.fold_constants is False


@pytest.mark.parametrize("name, options, message", [
    ("nosuch", {}, "unknown pass 'nosuch'; available: .*cleanup"),
    ("sparsify", {"methd": "teal"}, "no option 'methd'; valid options: method"),
    ("sparsify", {"method": "magic"}, "'magic' is not one of teal, wina, cats"),
    ("sparsify", {"sparsity": "lots"}, "expected float"),
    ("sparsify", {"sparsity": "1.5"}, r"must be in \[0, 1\]"),
    ("sparsify", {"sparsity": "nan"}, "expected float"),
    ("cleanup", {"fold_constants": "maybe"}, "expected true/false"),
    ("relufy", {"shift": "0.1"}, "only to act=shifted_relu"),
])
def test_bad_options_are_clear_errors(name, options, message):
    with pytest.raises(ActsparseError, match=message):
        make_pass(name, options)


def test_recipe_forms(tmp_path):
    yaml_recipe = tmp_path / "r.yaml"
    yaml_recipe.write_text("passes:\n  - relufy\n  - sparsify: {method: wina, sparsity: 0.3}\n"
                           "  - name: cleanup\n    options: {shape_inference: false}\n")
    assert load_recipe(yaml_recipe) == [
        PassSpec("relufy"), PassSpec("sparsify", {"method": "wina", "sparsity": 0.3}),
        PassSpec("cleanup", {"shape_inference": False}),
    ]
    report = tmp_path / "report.json"  # an `optimize --report` file replays as a recipe
    report.write_text(json.dumps({"passes": [{"name": "sparsify", "options": {"sparsity": 0.5}, "result": {}}]}))
    assert load_recipe(report) == [PassSpec("sparsify", {"sparsity": 0.5})]


@pytest.mark.parametrize("content, message", [("[]", "non-empty"), ("passes: 3", "non-empty"),
                                              ("- {a: 1, b: 2}", "bad recipe entry"), (": :\n\t-", "not a YAML")])
def test_bad_recipes(tmp_path, content, message):
    path = tmp_path / "r.yaml"
    path.write_text(content)
    with pytest.raises(ActsparseError, match=message):
        load_recipe(path)
