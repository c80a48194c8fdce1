"""Calibration feeds from real text: lines of a text file tokenized with a Hugging Face
tokenizer (a folder with tokenizer.json / vocab files, e.g. a packaged model's folder).

Token ids from text give realistic activation statistics; random ids (the default
generator) are a fallback when no text or tokenizer is at hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from actsparse.calibrate.data import Feeds, model_inputs
from actsparse.errors import ActsparseError


def text_calibration(model: ir.Model, text_file: str | Path, tokenizer: str | Path, *,
                     num_samples: int = 32, sequence_length: int = 16) -> list[Feeds]:
    """One sample per non-empty line (up to `num_samples`), padded/truncated to the model's
    sequence length (its static dim, else `sequence_length`)."""
    lines = _read_lines(Path(text_file), num_samples)
    tok = _load_tokenizer(Path(tokenizer))
    inputs = {v.name: v for v in model_inputs(model)}
    if not any("input_ids" in name for name in inputs):
        raise ActsparseError(f"text calibration needs a model input named like 'input_ids'; inputs: {list(inputs)}")
    length = _sequence_length(inputs, sequence_length)
    batch = tok(lines, padding="max_length", truncation=True, max_length=length, return_tensors="np")
    samples = []
    for row in range(len(lines)):
        feeds = {}
        for name, value in inputs.items():
            key = next((k for k in ("input_ids", "attention_mask", "token_type_ids") if k in name), None)
            if key is None or key not in batch:
                raise ActsparseError(f"text calibration cannot fill input {name!r}; give an .npz with --calib")
            dtype = value.dtype.numpy() if value.dtype is not None else np.int64
            feeds[name] = batch[key][row:row + 1].astype(dtype)
        samples.append(feeds)
    return samples


def _read_lines(path: Path, limit: int) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ActsparseError(f"{path}: no such text file") from None
    except (UnicodeDecodeError, IsADirectoryError) as exc:
        raise ActsparseError(f"{path}: not a UTF-8 text file ({type(exc).__name__})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()][:limit]
    if not lines:
        raise ActsparseError(f"{path}: no non-empty lines to calibrate on")
    return lines


def _load_tokenizer(path: Path):
    try:
        import transformers
    except ImportError:
        raise ActsparseError("text calibration needs the transformers package (pip install transformers)") from None
    if not path.is_dir():
        raise ActsparseError(f"{path}: not a tokenizer folder")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ActsparseError(f"{path}: cannot load a tokenizer ({str(exc).splitlines()[0][:200]})") from None


def _sequence_length(inputs: dict[str, ir.Value], default: int) -> int:
    for name, value in inputs.items():
        if "input_ids" in name and value.shape is not None and len(value.shape) >= 2 and isinstance(value.shape[-1], int):
            return value.shape[-1]
    return default
