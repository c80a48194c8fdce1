"""Corpus and tokenizer of the tiny LM: the Python standard library's own source files.

Every Python install carries them, so the corpus is available offline everywhere. The file
list is deterministic (sorted relative paths; `test/`, `idlelib/` and installed packages left
out) and the split is fixed by a hash of each relative path: about 1 file in 20 is held out.

Tokenizer: bytes. Token ids 0..255 are the bytes of the UTF-8 text, then BOS and EOS, padded
to a vocabulary of 260 (a multiple of 4). No training, no files, nothing to download.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import numpy as np

from actsparse.errors import ActsparseError

BOS, EOS = 256, 257
VOCAB_SIZE = 260
HELD_OUT_EVERY = 20  # a file is held out when crc32(relative path) % 20 == 0
_EXCLUDED_DIRS = {"test", "idlelib", "site-packages", "dist-packages", "__pycache__"}


def encode(text: str) -> np.ndarray:
    """Text -> token ids (uint16): its UTF-8 bytes."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)


def decode(ids) -> str:
    """Token ids -> text; BOS/EOS/padding ids are dropped."""
    data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if int(i) < 256)
    return data.decode("utf-8", errors="replace")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(split: str, root: Path | None = None) -> list[Path]:
    """The stdlib `.py` files of `split` ("train" or "heldout"), sorted by relative path."""
    if split not in ("train", "heldout"):
        raise ActsparseError(f"split must be 'train' or 'heldout', got {split!r}")
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        relative = path.relative_to(root)
        if _EXCLUDED_DIRS & set(relative.parts[:-1]):
            continue
        held_out = zlib.crc32(relative.as_posix().encode()) % HELD_OUT_EVERY == 0
        if held_out == (split == "heldout"):
            files.append(path)
    if not files:
        raise ActsparseError(f"no Python standard-library files found under {root}")
    return files


def corpus_tokens(split: str, cache_dir: Path | None = None, root: Path | None = None) -> np.ndarray:
    """All files of `split`, each as BOS + bytes + EOS, concatenated (uint16). Cached as .npy
    in `cache_dir` (keyed by the file list) when given."""
    files = corpus_files(split, root)
    key = zlib.crc32("\n".join(f"{p}:{p.stat().st_size}" for p in files).encode())
    cache = Path(cache_dir) / f"corpus-{split}-{key:08x}.npy" if cache_dir else None
    if cache is not None and cache.exists():
        return np.load(cache, allow_pickle=False)
    pieces = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        pieces += [np.array([BOS], np.uint16), encode(text), np.array([EOS], np.uint16)]
    tokens = np.concatenate(pieces)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, tokens, allow_pickle=False)
        tmp.replace(cache)
    return tokens


def eval_windows(tokens: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """`count` non-overlapping windows of seq_len + 1 tokens, evenly spread over `tokens`
    (deterministic): inputs are w[:, :-1], targets w[:, 1:]."""
    span = seq_len + 1
    available = len(tokens) // span
    if available < 1:
        raise ActsparseError(f"corpus of {len(tokens)} tokens is shorter than one window of {span}")
    starts = np.linspace(0, available - 1, num=min(count, available)).astype(np.int64) * span
    return np.stack([tokens[s:s + span] for s in starts]).astype(np.int64)


def batch_iterator(tokens: np.ndarray, seq_len: int, batch: int, seed: int, start_step: int = 0):
    """Random training windows, reproducible per step: step s draws from a generator seeded
    with (seed, s), so a resumed run sees the same batches as an uninterrupted one."""
    span = seq_len + 1
    high = len(tokens) - span
    if high <= 0:
        raise ActsparseError(f"corpus of {len(tokens)} tokens is shorter than one window of {span}")
    step = start_step
    while True:
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, high, size=batch)
        yield np.stack([tokens[s:s + span] for s in starts]).astype(np.int64)
        step += 1
