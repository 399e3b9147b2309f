"""The builtin corpus: sources of comparable size, deterministic, every record tokenizable."""

from __future__ import annotations

import time
from collections import Counter

from cllora.data.builtin import builtin_records
from cllora.data.formatting import build_samples, detect_shape


def test_sources_and_sizes():
    counts = Counter(r["source"] for r in builtin_records())
    assert len(counts) >= 4
    assert min(counts.values()) >= 30
    assert 200 <= sum(counts.values()) <= 1000


def test_records_are_well_formed_and_unique():
    records = builtin_records()
    for r in records:
        assert set(r) == {"question", "answer", "source", "_where"}
        assert detect_shape(r) == "qa"
        assert r["question"].strip() and r["answer"].strip()
        assert r["_where"].startswith("builtin:")
    assert len({r["_where"] for r in records}) == len(records)
    assert len({r["answer"] for r in records}) == len(records)
    assert any(r["question"] == "What does `json.dumps` do?" for r in records)


def test_deterministic_and_fast():
    start = time.perf_counter()
    first = builtin_records()
    assert time.perf_counter() - start < 1.0
    assert builtin_records() == first


def test_all_records_tokenize(smol_tokenizer):
    records = builtin_records()
    samples, stats = build_samples(records, smol_tokenizer, max_length=256, progress=False)
    assert stats["samples"] == len(records) == len(samples)
    assert stats["dropped_no_target"] == 0
    assert all(s.num_target_tokens > 0 for s in samples)
    assert 0 < stats["truncated"] < len(records)  # varied lengths: some long, most short
