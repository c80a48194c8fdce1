"""Timing helpers of actsparse.benchmark.timing: block interleaving and the paired speed-up estimate."""

from __future__ import annotations

import pytest

from actsparse.benchmark import timing as bench


def test_interleaved_blocks_alternate_engines_and_time_every_block(monkeypatch):
    monkeypatch.setattr(bench, "settle", lambda seconds=0: None)
    order = []
    engines = {"a": lambda i: order.append("a"), "b": lambda i: order.append("b")}
    times = bench.interleaved_blocks(engines, {"a": 3, "b": 2}, blocks=4)
    assert [len(t) for t in times.values()] == [4, 4]
    assert all(t >= 0 for t in times["a"] + times["b"])
    # two warm-up calls each, then per block: one untimed wake-up call + the timed iterations
    timed = order[4:]
    assert timed == (["a"] * 4 + ["b"] * 3) * 4
    best = bench.interleaved_best(engines, {"a": 1, "b": 1}, blocks=2)
    assert set(best) == {"a", "b"}


def test_paired_speedup_is_the_median_of_block_ratios():
    reference = [4.0, 4.0, 3.0, 6.0, 4.0]
    engine = [2.0, 4.0, 3.0, 2.0, 1.0]  # ratios 2, 1, 1, 3, 4
    median, q25, q75 = bench.paired_speedup(reference, engine)
    assert median == pytest.approx(2.0)
    assert q25 == pytest.approx(1.0) and q75 == pytest.approx(3.0)
    # one lucky reference block moves a ratio of best blocks (3 / 1 = 3), not the median
    assert min(reference) / min(engine) == pytest.approx(3.0)


def test_weight_copies_are_capped_by_available_memory(monkeypatch, capsys):
    """A CPU reporting a 480 MB L3 made bench_quant ask for 24 GB of copies (OOM-killed)."""
    import actsparse.benchmark.timing as bench

    monkeypatch.setattr(bench, "l3_cache_bytes", lambda: 480 << 20)
    monkeypatch.setattr(bench, "available_memory_bytes", lambda: 8 << 30)
    copies = bench.copies_to_exceed_cache(11_534_336)  # one 2816 x 1024 fp32 matrix
    assert copies * 11_534_336 <= 0.15 * (8 << 30) + 11_534_336
    assert "not fit in memory" in capsys.readouterr().err
    monkeypatch.setattr(bench, "available_memory_bytes", lambda: 1 << 40)
    assert bench.copies_to_exceed_cache(11_534_336) == 175  # ceil(4 x 480 MiB / 11 MB): no cap needed
