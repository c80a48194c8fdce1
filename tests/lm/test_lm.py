"""actsparse.lm: corpus split, byte tokenizer, reproducible and resumable training, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from actsparse.errors import ActsparseError
from actsparse.lm import data
from actsparse.lm.data import BOS, EOS, VOCAB_SIZE, batch_iterator, corpus_files, corpus_tokens, decode, encode

TINY = dict(size="tiny", steps=6, seq_len=32, batch=4, lr=3e-3, warmup=2, eval_windows=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small fake stdlib: enough files that both splits are non-empty."""
    root = tmp_path_factory.mktemp("stdlib")
    for i in range(60):
        (root / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i}  # é\n" * 20)
    (root / "test").mkdir()
    (root / "test" / "test_skip.py").write_text("left out\n")
    return root


def test_tokenizer_round_trip_and_specials():
    text = "def f(x):\n    return 'é'\n"
    ids = encode(text)
    assert ids.dtype == np.uint16 and ids.max() < 256
    assert decode(ids) == text
    assert decode(np.concatenate([[BOS], ids, [EOS]])) == text
    assert VOCAB_SIZE > EOS


def test_split_is_fixed_disjoint_and_skips_tests(corpus):
    train, heldout = corpus_files("train", corpus), corpus_files("heldout", corpus)
    assert train and heldout and not set(train) & set(heldout)
    assert len(train) + len(heldout) == 60
    assert corpus_files("train", corpus) == train  # deterministic
    assert all("test" not in p.relative_to(corpus).parts for p in train + heldout)
    with pytest.raises(ActsparseError, match="split"):
        corpus_files("validation", corpus)


def test_real_stdlib_split_is_nonempty():
    train, heldout = corpus_files("train"), corpus_files("heldout")
    assert len(heldout) > 10 and len(train) > 10 * len(heldout) // 2
    assert not set(train) & set(heldout)


def test_corpus_tokens_are_cached(corpus, tmp_path):
    tokens = corpus_tokens("heldout", tmp_path, corpus)
    assert tokens[0] == BOS and tokens[-1] == EOS
    cached = list(tmp_path.glob("corpus-heldout-*.npy"))
    assert len(cached) == 1
    np.testing.assert_array_equal(np.load(cached[0]), tokens)
    np.testing.assert_array_equal(corpus_tokens("heldout", tmp_path, corpus), tokens)


def test_batches_depend_only_on_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    straight = batch_iterator(tokens, 8, 3, seed=1)
    first = [next(straight) for _ in range(5)]
    resumed = batch_iterator(tokens, 8, 3, seed=1, start_step=3)
    np.testing.assert_array_equal(next(resumed), first[3])
    assert not np.array_equal(first[0], first[1])
    assert first[0].shape == (3, 9)
    with pytest.raises(ActsparseError, match="shorter"):
        next(batch_iterator(tokens[:5], 8, 1, seed=0))


def test_eval_windows_are_evenly_spread_and_deterministic():
    tokens = np.arange(100, dtype=np.uint16)
    w = data.eval_windows(tokens, 9, 4)
    assert w.shape == (4, 10)
    np.testing.assert_array_equal(w[:, 1:], w[:, :-1] + 1)


def _weights(directory: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(directory / "model.safetensors"))


def test_train_resume_equals_uninterrupted_and_is_cached(corpus, tmp_path):
    import torch

    from actsparse.lm.train import TrainOptions, train_lm

    torch.set_num_threads(1)
    options = TrainOptions(**TINY)
    straight = train_lm(tmp_path / "a", options, corpus_root=corpus)
    assert straight["finished"] and np.isfinite(straight["heldout_perplexity"])
    assert 1.0 < straight["heldout_perplexity"] < VOCAB_SIZE * 2
    partial = train_lm(tmp_path / "b", options, stop_at=3, corpus_root=corpus)
    assert partial["step"] == 3 and not partial["finished"] and not (tmp_path / "b" / "metrics.json").exists()
    resumed = train_lm(tmp_path / "b", options, corpus_root=corpus)
    assert resumed["step"] == 6
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=key)
    # finished: a second call is served from metrics.json without touching the checkpoint
    stamp = (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns
    assert train_lm(tmp_path / "a", options, corpus_root=corpus) == straight
    assert (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns == stamp
    # nothing pickled: every file is safetensors, JSON or .npy
    assert {p.suffix for p in (tmp_path / "a").iterdir()} <= {".safetensors", ".json", ".npy"}


def test_other_options_in_the_same_directory_refused(corpus, tmp_path):
    from actsparse.lm.train import TrainOptions, main, train_lm

    train_lm(tmp_path, TrainOptions(**TINY), stop_at=1, corpus_root=corpus)
    with pytest.raises(ActsparseError, match="other options"):
        train_lm(tmp_path, TrainOptions(**{**TINY, "lr": 1e-4}), corpus_root=corpus)
    assert main(["--out", str(tmp_path), "--size", "tiny", "--steps", "99"]) == 2


def test_load_lm_round_trip_and_missing(tmp_path):
    import torch

    from actsparse.lm.model import build_lm, load_lm, parameter_count, save_lm

    model = build_lm("tiny", seed=3)
    save_lm(model, tmp_path)
    loaded = load_lm(tmp_path)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert parameter_count(build_lm("small")) > 10_000_000
    with pytest.raises(ActsparseError, match="no LM checkpoint"):
        load_lm(tmp_path / "missing")
    with pytest.raises(ActsparseError, match="unknown LM size"):
        build_lm("huge")
    assert json.loads((tmp_path / "model.config.json").read_text())["hidden_act"] == "silu"
