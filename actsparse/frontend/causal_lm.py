"""Read a Hugging Face causal LM (a `transformers` module or a folder with config.json +
safetensors) into a `DecoderSpec`: the architecture facts and the weights as numpy arrays,
in one layout for every supported family.

Families: Llama and its kin with the same block (Mistral, Qwen2, Qwen3, Phi-3 with its
fused `qkv_proj` / `gate_up_proj` split into separate linears, Gemma with its `1 + w` norms
and scaled embeddings). The rotary tables come from the model's own `*RotaryEmbedding`
class, so every RoPE variant transformers knows (linear, llama3, yarn, longrope, ...) is
what the model computes.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from actsparse.errors import ActsparseError

DEFAULT_MAX_CONTEXT = 2048  # tokens the KV cache holds unless asked, capped by the model's positions
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")
# hidden_act -> the activation the decode graph spells out (ir/activations.py recognizes each form)
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}


@dataclass
class DecoderSpec:
    """A decoder-only LM, family-independent. Linear weights are [out, in] (torch layout)."""

    family: str
    vocab_size: int
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    activation: str
    norm_eps: float
    rope_cos: np.ndarray  # [positions, head_dim] float32, the model's own table
    rope_sin: np.ndarray
    weights: dict[str, np.ndarray]  # "layers.0.q_proj.weight", "embed.weight", "norm.weight", "lm_head.weight"
    tied_embeddings: bool = False
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w)
    embed_scale: float = 1.0  # Gemma scales the embeddings by sqrt(hidden)
    attention_scale: float | None = None  # None: 1 / sqrt(head_dim)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    source: str = ""

    @property
    def max_positions(self) -> int:
        return int(self.rope_cos.shape[0])

    def weight_bytes(self) -> int:
        return sum(int(w.nbytes) for w in self.weights.values())

    def describe(self) -> dict[str, Any]:
        """The facts the artifact's manifest records."""
        return {"family": self.family, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "layers": self.layers, "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "intermediate_size": self.intermediate_size, "activation": self.activation,
                "tied_embeddings": self.tied_embeddings, "sliding_window": self.sliding_window,
                "bos_token_id": self.bos_token_id, "eos_token_ids": list(self.eos_token_ids)}


def is_causal_lm(model: Any) -> bool:
    """A transformers causal-LM module, or a folder holding a config.json of a decoder LM."""
    if isinstance(model, (str, Path)):
        path = Path(model)
        return path.is_dir() and ((path / "config.json").is_file() or is_actsparse_lm_folder(path))
    config = getattr(model, "config", None)
    return config is not None and hasattr(model, "state_dict") and getattr(config, "model_type", None) is not None \
        and hasattr(model, "get_output_embeddings")


def read_causal_lm(model: Any, max_context: int | None) -> DecoderSpec:
    """The DecoderSpec of a transformers module or a Hugging Face folder."""
    if isinstance(model, (str, Path)) and is_actsparse_lm_folder(Path(model)):
        from actsparse.lm.model import load_lm

        return read_causal_lm(load_lm(Path(model)), max_context)
    if isinstance(model, (str, Path)):
        config, tensors = _folder(Path(model))
        source = str(model)
    else:
        config = model.config
        state = model.state_dict()
        tensors = _TensorSource(lambda name: state[name], set(state))
        source = type(model).__name__
    return _spec(config, tensors, max_context, source)


def is_actsparse_lm_folder(path: Path) -> bool:
    """A checkpoint of the in-repo LM (`actsparse.lm.save_lm`: model.safetensors + model.config.json)."""
    return (path / "model.config.json").is_file() and (path / "model.safetensors").is_file() \
        and not (path / "config.json").is_file()


class _TensorSource:
    """Named float32 numpy weights, read lazily (a folder's shards are memory-mapped)."""

    def __init__(self, get: Callable[[str], Any], names: set[str]):
        self._get, self.names = get, names

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise ActsparseError(f"weight {name!r} missing from the model")
        value = self._get(name)
        if hasattr(value, "detach"):
            value = value.detach().float().cpu().numpy()
        return np.ascontiguousarray(value, dtype=np.float32)


def _folder(path: Path):
    try:
        import transformers
        from safetensors import safe_open
    except ImportError as exc:  # pragma: no cover - the compile extra has both
        raise ActsparseError(f"reading a Hugging Face folder needs transformers and safetensors ({exc})") from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise ActsparseError(f"{path}/config.json: not a model config transformers reads ({exc})") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ActsparseError(f"{path}: no *.safetensors weights (pickled .bin checkpoints are not read: convert them "
                             "with transformers' save_pretrained(safe_serialization=True))")
    where: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    where[name] = file
        except Exception as exc:
            raise ActsparseError(f"{file}: unreadable safetensors file ({exc})") from None

    def get(name: str):
        with safe_open(str(where[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    return config, _TensorSource(get, set(where))


def _cfg(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _spec(config, tensors: _TensorSource, max_context: int | None, source: str) -> DecoderSpec:
    family = getattr(config, "model_type", None)
    if family not in LLAMA_LIKE:
        raise ActsparseError(f"model type {family!r} is not supported for generation yet; supported: "
                             f"{', '.join(LLAMA_LIKE)}")
    config = getattr(config, "text_config", None) or config
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(_cfg(config, "num_key_value_heads", default=heads))
    head_dim = int(_cfg(config, "head_dim", default=hidden // heads))
    act_name = _cfg(config, "hidden_activation", "hidden_act", default="silu")
    if act_name not in ACTIVATIONS:
        raise ActsparseError(f"activation {act_name!r} is not supported yet; supported: {', '.join(ACTIVATIONS)}")
    limit = int(_cfg(config, "max_position_embeddings", default=max_context or DEFAULT_MAX_CONTEXT))
    if max_context is None:
        max_context = min(DEFAULT_MAX_CONTEXT, limit)
    if max_context > limit:
        raise ActsparseError(f"--max-context {max_context} is above the model's max_position_embeddings {limit}")
    cos, sin = rope_tables(config, max_context, head_dim)
    if cos.shape[1] != head_dim:  # e.g. Phi-4-mini's partial_rotary_factor 0.75
        raise ActsparseError(f"partial rotary embeddings ({cos.shape[1]} of {head_dim} head dims) are not supported yet")
    layers = int(config.num_hidden_layers)
    weights = _weights(family, tensors, layers, heads, kv_heads, head_dim, int(config.intermediate_size))
    tied = "lm_head.weight" not in tensors or bool(_cfg(config, "tie_word_embeddings", default=False))
    if not tied:
        weights["lm_head.weight"] = tensors("lm_head.weight")
    eos = _cfg(config, "eos_token_id")
    gen = getattr(config, "generation_config", None)
    window = _cfg(config, "sliding_window") if _cfg(config, "use_sliding_window", default=True) else None
    scalar = _cfg(config, "query_pre_attn_scalar")
    return DecoderSpec(
        family=family, vocab_size=int(config.vocab_size), hidden_size=hidden, layers=layers, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, intermediate_size=int(config.intermediate_size),
        activation=ACTIVATIONS[act_name], norm_eps=float(_cfg(config, "rms_norm_eps", default=1e-6)),
        rope_cos=cos, rope_sin=sin, weights=weights, tied_embeddings=tied,
        norm_offset=1.0 if family == "gemma" else 0.0,
        embed_scale=math.sqrt(hidden) if family == "gemma" else 1.0,
        attention_scale=float(scalar) ** -0.5 if scalar else None,
        qk_norm="model.layers.0.self_attn.q_norm.weight" in tensors,
        sliding_window=int(window) if window else None,
        bos_token_id=_cfg(config, "bos_token_id"),
        eos_token_ids=[int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None],
        source=source,
    )


def _weights(family, tensors, layers, heads, kv_heads, head_dim, inter) -> dict[str, np.ndarray]:
    out = {"embed.weight": tensors("model.embed_tokens.weight"), "norm.weight": tensors("model.norm.weight")}
    for i in range(layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = src + "self_attn.", src + "mlp."
        if family == "phi3":  # fused projections: split so each is a linear of its own (q/k/v; gate/up)
            qkv = tensors(attn + "qkv_proj.weight")
            q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
            out[dst + "q_proj.weight"] = np.ascontiguousarray(qkv[:q_rows])
            out[dst + "k_proj.weight"] = np.ascontiguousarray(qkv[q_rows:q_rows + kv_rows])
            out[dst + "v_proj.weight"] = np.ascontiguousarray(qkv[q_rows + kv_rows:])
            gate_up = tensors(mlp + "gate_up_proj.weight")
            out[dst + "gate_proj.weight"] = np.ascontiguousarray(gate_up[:inter])
            out[dst + "up_proj.weight"] = np.ascontiguousarray(gate_up[inter:])
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                out[dst + f"{name}.weight"] = tensors(attn + f"{name}.weight")
                if attn + f"{name}.bias" in tensors:  # Qwen2
                    out[dst + f"{name}.bias"] = tensors(attn + f"{name}.bias")
            for name in ("gate_proj", "up_proj"):
                out[dst + f"{name}.weight"] = tensors(mlp + f"{name}.weight")
        out[dst + "o_proj.weight"] = tensors(attn + "o_proj.weight")
        out[dst + "down_proj.weight"] = tensors(mlp + "down_proj.weight")
        out[dst + "input_norm.weight"] = tensors(src + "input_layernorm.weight")
        out[dst + "post_attention_norm.weight"] = tensors(src + "post_attention_layernorm.weight")
        for norm in ("q_norm", "k_norm"):  # Qwen3
            if attn + f"{norm}.weight" in tensors:
                out[dst + f"{norm}.weight"] = tensors(attn + f"{norm}.weight")
    return out


def rope_tables(config, positions: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [positions, head_dim] from the model family's own rotary-embedding module."""
    import torch

    family = config.model_type
    try:
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    except ImportError:
        raise ActsparseError(f"transformers has no modeling code for {family!r}") from None
    classes = [getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding") and not n.startswith("_")]
    if not classes:
        raise ActsparseError(f"transformers' {family} has no rotary embedding")
    rotary = classes[0](config=config)
    with torch.no_grad():
        dummy = torch.zeros(1, 1, head_dim)
        cos, sin = rotary(dummy, torch.arange(positions)[None, :])
    return cos[0].float().numpy().copy(), sin[0].float().numpy().copy()


def read_hf_json(path: Path, name: str) -> dict:
    """A JSON file of a Hugging Face folder, {} when absent."""
    file = Path(path) / name
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ActsparseError(f"{file}: unreadable JSON ({exc})") from None
