"""Readable lines for run.log (cllora.text)."""

from __future__ import annotations

from cllora.text import counts_line, fields_line


def test_fields_line_reads_as_words():
    line = fields_line({"records": 3000, "dropped_overlong": 0, "length_buckets": [99, 152],
                        "kernels": {"rms_norm": 61}, "malformed_examples": [], "draw": None,
                        "packed": True, "share": 0.123456})  # fmt: skip
    assert line == ("records 3000, dropped overlong 0, length buckets 99/152, kernels (rms norm "
                    "61), packed yes, share 0.1235")  # fmt: skip


def test_counts_line_totals_the_non_zero_counts():
    assert counts_line({"shuffle": 4, "replace": 1, "boilerplate": 0}) == "5 (shuffle 4, replace 1)"
    assert counts_line({"shuffle": 0}) == "none"
    assert counts_line({}) == "none"
