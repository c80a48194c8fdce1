"""The tiny LM: a Llama-architecture decoder (RMSNorm, RoPE, SwiGLU FFN) from `transformers`.

Sizes: "small" (~10.7 M parameters: 6 layers, hidden 384, SwiGLU FFN 384 -> 1024 -> 384,
6 heads of 64) is the reference model; "mini" (~0.9 M: 4 layers, hidden 128, FFN 384) is the one
trained for the measurements when only minutes of a shared CPU are at hand; "tiny" (2 layers,
hidden 32) trains in seconds in tests.
Checkpoints are safetensors plus a JSON config; no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

from actsparse.errors import ActsparseError
from actsparse.lm.data import BOS, EOS, VOCAB_SIZE

SIZES = {
    "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
                  intermediate_size=1024),
    "mini": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=384),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=64),
}
MAX_POSITIONS = 512


def lm_config(size: str = "small", hidden_act: str = "silu"):
    """A `transformers.LlamaConfig` for `size` ("small" or "tiny") over the byte vocabulary."""
    import transformers

    if size not in SIZES:
        raise ActsparseError(f"unknown LM size {size!r}; sizes: {', '.join(SIZES)}")
    return transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_POSITIONS, hidden_act=hidden_act,
        bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=True, rms_norm_eps=1e-5,
        attn_implementation="eager", **SIZES[size],
    )


def build_lm(size: str = "small", seed: int = 0):
    """A freshly initialized LM; the same `seed` gives the same weights."""
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(lm_config(size))


def parameter_count(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_lm(model, directory: str | Path, prefix: str = "model") -> None:
    """Write `prefix.safetensors` and `prefix.config.json` into `directory` (atomically each)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tmp = directory / f".{prefix}.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(directory / f"{prefix}.safetensors")
    _write_json(directory / f"{prefix}.config.json", model.config.to_dict())


def load_lm(directory: str | Path, prefix: str = "model"):
    """The LM saved by `save_lm` (in eval mode)."""
    import transformers
    from safetensors.torch import load_file

    directory = Path(directory)
    weights, config_file = directory / f"{prefix}.safetensors", directory / f"{prefix}.config.json"
    if not weights.exists() or not config_file.exists():
        raise ActsparseError(f"{directory}: no LM checkpoint {prefix}.safetensors (train one with "
                             f"`python -m actsparse.lm.train --out {directory}`)")
    config = transformers.LlamaConfig.from_dict(json.loads(config_file.read_text()))
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ActsparseError(f"{weights}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    return model.eval()


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    tmp.replace(path)
