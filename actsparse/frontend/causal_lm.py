"""Read a Hugging Face causal LM (a `transformers` module or a folder with config.json +
safetensors) into a `DecoderSpec`: the architecture facts and the weights as numpy arrays,
in one layout for every supported family.

Families: Llama and its kin with the same block (Mistral, Qwen2, Qwen3, Phi-3 with its
fused `qkv_proj` / `gate_up_proj` split into separate linears, Gemma with its `1 + w` norms
and scaled embeddings), and the LayerNorm families: GPT-NeoX (parallel residual, per-head
interleaved `query_key_value`, partial rotary), OPT (learned positions, fc1/ReLU/fc2, pre- or
post-norm, the `word_embed_proj_dim` projections) and Falcon (parallel attention/MLP with one or
two norms, fused qkv for MHA, MQA and the new architecture's GQA groups; ALiBi refused). Where
each family keeps each weight is one `_Layout`, how its layer is wired one `_Block`. The
rotary tables come from the model's own `*RotaryEmbedding` class, so every RoPE variant
transformers knows (linear, llama3, yarn, longrope, partial, ...) is what the model computes.
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
    rope_cos: np.ndarray | None  # [positions, rotary_dim] float32, the model's own table; None: no RoPE
    rope_sin: np.ndarray | None
    # "layers.0.q_proj.weight" (and ".bias" where the model has one), "embed.weight", "norm.weight" (absent:
    # no final norm), "lm_head.weight" (absent: tied), "project_in.weight" / "project_out.weight" (OPT)
    weights: dict[str, np.ndarray]
    tied_embeddings: bool = False
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w)
    embed_scale: float = 1.0  # Gemma scales the embeddings by sqrt(hidden)
    attention_scale: float | None = None  # None: 1 / sqrt(head_dim)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    sliding_window: int | None = None
    norm: str = "rms"  # "rms": RMSNorm; "layer": LayerNorm with a shift (".bias")
    # sequential:        x += attn(norm1(x)); x += ffn(norm2(x))      (Llama, OPT, Falcon-RW)
    # parallel:          x += attn(norm1(x)) + ffn(norm2(x))         (GPT-NeoX, Falcon-40B)
    # parallel_one_norm: h = norm1(x); x += attn(h) + ffn(h)         (Falcon-7B)
    # post_norm:         x = norm1(x + attn(x)); x = norm2(x + ffn(x)) (OPT-350m)
    residual: str = "sequential"
    position_table: np.ndarray | None = None  # learned absolute positions [positions, hidden] (OPT)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    source: str = ""

    @property
    def max_positions(self) -> int:
        table = self.rope_cos if self.rope_cos is not None else self.position_table
        return int(table.shape[0])

    @property
    def rotary_dim(self) -> int:
        """Head dims RoPE rotates (the first ones; the rest pass through), 0 without RoPE."""
        return 0 if self.rope_cos is None else int(self.rope_cos.shape[1])

    @property
    def gated_ffn(self) -> bool:
        """down(act(gate(x)) * up(x)) (SwiGLU, GeGLU); else down(act(up(x)))."""
        return "layers.0.gate_proj.weight" in self.weights

    def weight_bytes(self) -> int:
        return sum(int(w.nbytes) for w in self.weights.values())

    def describe(self) -> dict[str, Any]:
        """The facts the artifact's manifest records."""
        return {"family": self.family, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "layers": self.layers, "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "intermediate_size": self.intermediate_size, "activation": self.activation,
                "gated_ffn": self.gated_ffn, "norm": self.norm, "residual": self.residual,
                "rotary_dim": self.rotary_dim, "learned_positions": self.position_table is not None,
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


@dataclass(frozen=True)
class _Layout:
    """Where a family keeps its weights: Hugging Face module names for each canonical part of the spec
    (each part's `.weight`, and `.bias` when the module has one). A tuple lists alternatives (the
    first present is read); `qkv` is a fused projection split by `qkv_layout`."""

    embed: str
    final_norm: str
    layer: str  # prefix of layer i's modules, with {i}
    parts: dict[str, str | tuple[str, ...]]
    lm_head: tuple[str, ...] = ("lm_head",)
    positions: str | None = None  # learned absolute positions (OPT)
    project_in: str | None = None  # OPT's word_embed_proj_dim <-> hidden projections
    project_out: str | None = None


_LLAMA_PARTS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                "down_proj": "mlp.down_proj", "input_norm": "input_layernorm",
                "post_attention_norm": "post_attention_layernorm", "q_norm": "self_attn.q_norm",
                "k_norm": "self_attn.k_norm",
                # Phi-3's fused projections
                "qkv": "self_attn.qkv_proj", "gate_up": "mlp.gate_up_proj"}
_LLAMA = _Layout("model.embed_tokens", "model.norm", "model.layers.{i}.", _LLAMA_PARTS)
LAYOUTS = {family: _LLAMA for family in LLAMA_LIKE} | {
    "gpt_neox": _Layout("gpt_neox.embed_in", "gpt_neox.final_layer_norm", "gpt_neox.layers.{i}.",
                        {"qkv": "attention.query_key_value", "o_proj": "attention.dense",
                         "up_proj": "mlp.dense_h_to_4h", "down_proj": "mlp.dense_4h_to_h",
                         "input_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm"},
                        lm_head=("lm_head", "embed_out")),  # embed_out: checkpoints before transformers 5
    "opt": _Layout("model.decoder.embed_tokens", "model.decoder.final_layer_norm", "model.decoder.layers.{i}.",
                   {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                    "o_proj": "self_attn.out_proj", "up_proj": "fc1", "down_proj": "fc2",
                    "input_norm": "self_attn_layer_norm", "post_attention_norm": "final_layer_norm"},
                   positions="model.decoder.embed_positions", project_in="model.decoder.project_in",
                   project_out="model.decoder.project_out"),
    "falcon": _Layout("transformer.word_embeddings", "transformer.ln_f", "transformer.h.{i}.",
                      {"qkv": "self_attention.query_key_value", "o_proj": "self_attention.dense",
                       "up_proj": "mlp.dense_h_to_4h", "down_proj": "mlp.dense_4h_to_h",
                       "input_norm": ("input_layernorm", "ln_attn"),
                       "post_attention_norm": ("post_attention_layernorm", "ln_mlp")}),
}
SUPPORTED = tuple(LAYOUTS)
OPT_POSITION_OFFSET = 2  # OPT's learned position table starts at row 2 (a fairseq padding convention)


@dataclass(frozen=True)
class _Block:
    """How a family's layer is wired: norm kind, residual form, fused-qkv layout."""

    norm: str = "rms"
    residual: str = "sequential"
    qkv_layout: str = "concatenated"  # rows [q heads | k heads | v heads]; "grouped": per kv head, its q's, k, v
    final_norm: bool = True


def _block(family: str, config) -> _Block:
    """The family's block, or a clear error for the variants not supported."""
    if family in LLAMA_LIKE:
        return _Block()
    if family == "gpt_neox":  # [heads, 3, head_dim]: each head's q, k, v together
        residual = "parallel" if _cfg(config, "use_parallel_residual", default=True) else "sequential"
        return _Block("layer", residual, "grouped")
    if family == "opt":
        if not _cfg(config, "do_layer_norm_before", default=True):
            return _Block("layer", "post_norm", final_norm=False)  # OPT-350m
        return _Block("layer", "sequential", final_norm=not getattr(config, "_remove_final_layer_norm", False))
    # falcon
    if _cfg(config, "alibi", default=False):
        raise ActsparseError("Falcon with ALiBi position biases (alibi=True) is not supported yet: only its "
                             "rotary variants are")
    new = bool(_cfg(config, "new_decoder_architecture", default=False))
    parallel = bool(_cfg(config, "parallel_attn", default=True))
    if new and not parallel:
        raise ActsparseError("Falcon's new_decoder_architecture without parallel_attn is not supported "
                             "(transformers cannot run it either)")
    if new:  # Falcon-40B/180B: per kv head, its queries then its key and value
        two_norms = _cfg(config, "num_ln_in_parallel_attn", default=2) == 2  # ln_attn, ln_mlp
        return _Block("layer", "parallel" if two_norms else "parallel_one_norm", "grouped")
    layout = "concatenated" if _cfg(config, "multi_query", default=True) else "grouped"
    return _Block("layer", "parallel_one_norm" if parallel else "sequential", layout)


def _spec(config, tensors: _TensorSource, max_context: int | None, source: str) -> DecoderSpec:
    family = getattr(config, "model_type", None)
    if family not in LAYOUTS:
        raise ActsparseError(f"model type {family!r} is not supported for generation yet; supported: "
                             f"{', '.join(SUPPORTED)}")
    config = getattr(config, "text_config", None) or config
    block = _block(family, config)
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(_cfg(config, "num_key_value_heads", default=heads))
    head_dim = int(_cfg(config, "head_dim", default=hidden // heads))
    act_name = _cfg(config, "hidden_activation", "hidden_act", "activation_function", "activation", default="silu")
    if act_name not in ACTIVATIONS:
        raise ActsparseError(f"activation {act_name!r} is not supported yet; supported: {', '.join(ACTIVATIONS)}")
    limit = int(_cfg(config, "max_position_embeddings", default=max_context or DEFAULT_MAX_CONTEXT))
    if max_context is None:
        max_context = min(DEFAULT_MAX_CONTEXT, limit)
    if max_context > limit:
        raise ActsparseError(f"--max-context {max_context} is above the model's max_position_embeddings {limit}")
    layout = LAYOUTS[family]
    if layout.positions:
        cos = sin = None
        table = tensors(layout.positions + ".weight")
        positions = np.ascontiguousarray(table[OPT_POSITION_OFFSET:OPT_POSITION_OFFSET + max_context])
    else:
        cos, sin = rope_tables(config, max_context, head_dim)
        positions = None
        if cos.shape[1] > head_dim or cos.shape[1] % 2:
            raise ActsparseError(f"a rotary table of {cos.shape[1]} dims for heads of {head_dim} is not supported")
    layers = int(config.num_hidden_layers)
    inter = int(_cfg(config, "intermediate_size", "ffn_dim", "ffn_hidden_size"))
    weights = _weights(layout, block, tensors, layers, heads, kv_heads, head_dim, inter)
    if block.norm == "layer" and not _cfg(config, "layer_norm_elementwise_affine", default=True):
        _plain_layer_norms(weights, layers, hidden, block.final_norm)  # OPT without affine norms
    head = next((name + ".weight" for name in layout.lm_head if name + ".weight" in tensors), None)
    tied = head is None or bool(_cfg(config, "tie_word_embeddings", default=False))
    if not tied:
        weights["lm_head.weight"] = tensors(head)
    eos = _cfg(config, "eos_token_id")
    window = _cfg(config, "sliding_window") if _cfg(config, "use_sliding_window", default=True) else None
    scalar = _cfg(config, "query_pre_attn_scalar")
    eps_default = 1e-6 if block.norm == "rms" else 1e-5  # torch's LayerNorm default, what OPT uses
    return DecoderSpec(
        family=family, vocab_size=int(config.vocab_size), hidden_size=hidden, layers=layers, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, intermediate_size=inter,
        activation=ACTIVATIONS[act_name],
        norm_eps=float(_cfg(config, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", default=eps_default)),
        rope_cos=cos, rope_sin=sin, weights=weights, tied_embeddings=tied,
        norm_offset=1.0 if family == "gemma" else 0.0,
        embed_scale=math.sqrt(hidden) if family == "gemma" else 1.0,
        attention_scale=float(scalar) ** -0.5 if scalar else None,
        qk_norm="layers.0.q_norm.weight" in weights,
        sliding_window=int(window) if window else None,
        norm=block.norm, residual=block.residual, position_table=positions,
        bos_token_id=_cfg(config, "bos_token_id"),
        eos_token_ids=[int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None],
        source=source,
    )


def _weights(layout: _Layout, block: _Block, tensors: _TensorSource, layers: int, heads: int, kv_heads: int,
             head_dim: int, inter: int) -> dict[str, np.ndarray]:
    """Every weight under its canonical name ("layers.0.q_proj.weight", "embed.weight", ...)."""
    out = {"embed.weight": tensors(layout.embed + ".weight")}
    if block.final_norm:
        _read(tensors, out, layout.final_norm, "norm")
    for source, name in ((layout.project_in, "project_in"), (layout.project_out, "project_out")):
        if source and source + ".weight" in tensors:
            _read(tensors, out, source, name)
    for i in range(layers):
        src, dst = layout.layer.format(i=i), f"layers.{i}."
        for part, names in layout.parts.items():
            found = next((src + n for n in ((names,) if isinstance(names, str) else names)
                          if src + n + ".weight" in tensors), None)
            if found is None:
                continue
            if part == "qkv":
                for kind in ("weight", "bias"):
                    if f"{found}.{kind}" in tensors:
                        split = _split_qkv(tensors(f"{found}.{kind}"), block.qkv_layout, heads, kv_heads, head_dim)
                        for proj, rows in zip(("q_proj", "k_proj", "v_proj"), split):
                            out[f"{dst}{proj}.{kind}"] = rows
            elif part == "gate_up":  # Phi-3: rows [gate | up]
                gate_up = tensors(found + ".weight")
                out[dst + "gate_proj.weight"] = np.ascontiguousarray(gate_up[:inter])
                out[dst + "up_proj.weight"] = np.ascontiguousarray(gate_up[inter:])
            else:
                _read(tensors, out, found, dst + part)
    return out


def _read(tensors: _TensorSource, out: dict[str, np.ndarray], source: str, name: str) -> None:
    out[name + ".weight"] = tensors(source + ".weight")
    if source + ".bias" in tensors:
        out[name + ".bias"] = tensors(source + ".bias")


def _split_qkv(fused: np.ndarray, layout: str, heads: int, kv_heads: int, head_dim: int) -> list[np.ndarray]:
    """q, k, v rows of a fused projection's weight [rows, in] or bias [rows]."""
    rest = fused.shape[1:]
    if layout == "concatenated":
        q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
        parts = [fused[:q_rows], fused[q_rows:q_rows + kv_rows], fused[q_rows + kv_rows:]]
    else:  # grouped: [kv_heads, group + 2, head_dim] (GPT-NeoX: group 1, i.e. [heads, 3, head_dim])
        group = heads // kv_heads
        grouped = fused.reshape(kv_heads, group + 2, head_dim, *rest)
        parts = [grouped[:, :group].reshape(heads * head_dim, *rest), grouped[:, group].reshape(-1, *rest),
                 grouped[:, group + 1].reshape(-1, *rest)]
    return [np.ascontiguousarray(p) for p in parts]


def _plain_layer_norms(weights: dict[str, np.ndarray], layers: int, hidden: int, final: bool) -> None:
    """LayerNorms without learned parameters get scale 1 and shift 0."""
    names = ["norm"] * final + [f"layers.{i}.{n}" for i in range(layers) for n in ("input_norm", "post_attention_norm")]
    for name in names:
        weights.setdefault(f"{name}.weight", np.ones(hidden, np.float32))
        weights.setdefault(f"{name}.bias", np.zeros(hidden, np.float32))


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
