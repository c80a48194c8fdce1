"""Session fixtures: ONNX files of small models, built once and cached between sessions.

Each fixture returns the path of an .onnx file (treat it as read-only: copy it before
changing it). Files live in pytest's cache folder (`.pytest_cache/d/actsparse-models/<key>`),
where the key hashes tests/models.py and the torch/transformers versions, so editing a
builder rebuilds its files. `pytest --cache-clear` rebuilds everything.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import pytest

from actsparse.frontend import zoo
from tests import models


def _versions() -> str:
    found = []
    for package in ("torch", "transformers", "onnx", "onnxscript", "onnx-ir"):
        try:
            found.append(f"{package}={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package}=none")
    return ",".join(found)


@pytest.fixture(scope="session")
def model_dir(request) -> Path:
    """The folder holding the cached model files of this version of tests/models.py."""
    sources = Path(models.__file__).read_bytes() + Path(zoo.__file__).read_bytes()
    key = hashlib.sha256(sources + _versions().encode()).hexdigest()[:16]
    return Path(request.config.cache.mkdir("actsparse-models")) / key


def _model_file(model_dir: Path, name: str) -> Path:
    path = model_dir / f"{name}.onnx"
    if not path.exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        models.BUILDERS[name](path)  # writes atomically: concurrent sessions may both build
    return path


@pytest.fixture(scope="session")
def bert_onnx(model_dir) -> Path:
    """Tiny random BertModel (2 layers, hidden 64, FFN 128, seq 8), dynamo exporter, opset 18."""
    return _model_file(model_dir, "bert")


@pytest.fixture(scope="session")
def bert_torchscript_onnx(model_dir) -> Path:
    """The same BERT through the TorchScript exporter (dynamo=False), opset 14."""
    return _model_file(model_dir, "bert_torchscript")


@pytest.fixture(scope="session")
def gpt2_onnx(model_dir) -> Path:
    """Tiny random GPT2LMHeadModel (2 layers, n_embd 64, FFN 256, seq 8), output `logits`."""
    return _model_file(model_dir, "gpt2")


@pytest.fixture(scope="session")
def llama_onnx(model_dir) -> Path:
    """Tiny random LlamaForCausalLM (2 layers, hidden 64, SwiGLU FFN 176, GQA 4/2, seq 8)."""
    return _model_file(model_dir, "llama")


@pytest.fixture(scope="session")
def minilm_onnx(model_dir) -> Path:
    """The real all-MiniLM-L6-v2, batch 1, seq 16, inputs input_ids + attention_mask."""
    return _model_file(model_dir, "minilm")


@pytest.fixture(scope="session")
def swiglu_stack_onnx(model_dir) -> Path:
    """Hand-built 2-layer SwiGLU FFN stack (d 64, f 176), x: [1, 64] -> y: [1, 64]."""
    return _model_file(model_dir, "swiglu_stack")


@pytest.fixture(scope="session")
def gelu_mlp_stack_onnx(model_dir) -> Path:
    """Hand-built 2-layer GELU MLP stack (d 64, f 128; Gemm fc1, Erf GELU, MatMul+Add fc2)."""
    return _model_file(model_dir, "gelu_mlp_stack")
