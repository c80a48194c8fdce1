"""Text <-> token ids for language-model artifacts, on the device.

Two kinds, named in the manifest's `lm.tokenizer`: "bytes" (UTF-8 bytes are the ids, as the
in-repo LM uses; needs nothing) and "huggingface" (a tokenizer.json packed in the artifact,
read with the `tokenizers` package, a small wheel with no torch). Without a tokenizer an LM
artifact still generates from token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from actsparse.errors import ActsparseError


@dataclass
class Tokenizer:
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    kind: str


def make_tokenizer(entry: dict | None, files: dict[str, bytes]) -> Tokenizer:
    """The tokenizer a manifest entry describes; `files` maps artifact paths to their bytes."""
    if entry is None:
        raise ActsparseError("this artifact has no tokenizer: give token ids (--prompt-ids) instead of text")
    kind = entry.get("kind")
    if kind == "bytes":
        limit = 256

        def decode_bytes(ids: list[int]) -> str:
            return bytes(int(i) for i in ids if 0 <= int(i) < limit).decode("utf-8", errors="replace")

        return Tokenizer(lambda text: list(text.encode("utf-8")), decode_bytes, "bytes")
    if kind == "huggingface":
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise ActsparseError("text in/out needs the `tokenizers` package (pip install tokenizers), or give "
                                 "token ids") from None
        data = files.get(entry.get("file", ""))
        if data is None:
            raise ActsparseError(f"artifact: tokenizer file {entry.get('file')!r} missing")
        try:
            tok = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:
            raise ActsparseError(f"artifact: unreadable tokenizer ({exc})") from None
        return Tokenizer(lambda text: tok.encode(text, add_special_tokens=False).ids,
                         lambda ids: tok.decode([int(i) for i in ids], skip_special_tokens=True), "huggingface")
    raise ActsparseError(f"artifact: unknown tokenizer kind {kind!r}")
