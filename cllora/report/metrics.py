"""Run outputs: ``metrics.jsonl`` (one JSON object per event), ``summary.csv``, results table.

Usage::

    log = MetricsLog(run_dir / "metrics.jsonl")
    log.write(kind="global_eval", round=0, client="__global__", loss=2.1, ppl=8.2, tokens=900)
    write_summary(run_dir / "summary.csv", rows)
    print(format_table(rows))

Kinds written by the server: ``client_train`` (one per client per round), ``client_failed``,
``global_eval`` (one per client test set per round, plus ``client="__global__"`` for the global
test set: the union of the clients' test sets, or the held-out set of
``partition.global_test_fraction``) and ``round`` (bytes sent, seconds). ``summary.csv`` has one
row per round: the global model's test loss/perplexity and its loss on each client's test set.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSON-lines writer (flushed per line, so a killed run keeps what it logged).

    ``path=None`` writes nothing (ranks other than 0 of a distributed run); ``keep=True`` also
    keeps every record in ``kept``, tagged with the current ``client_idx`` (a rank collects its
    clients' records for rank 0 to write in client order).
    """

    def __init__(self, path: Path | None, keep: bool = False) -> None:
        self.path = path
        self._fh = path.open("a", encoding="utf-8") if path is not None else None
        self.keep, self.kept, self.client_idx = keep, [], -1

    def write(self, **record: Any) -> None:
        if self.keep:
            self.kept.append({**record, "_client_idx": self.client_idx})
        if self._fh is not None:
            self._fh.write(json.dumps(record, sort_keys=False) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_summary(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One CSV row per round (columns from the first row)."""
    if not rows:
        return
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return (
            "nan" if math.isnan(value) else f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
        )
    return str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of summary rows, aligned, one line per round. Columns that are NaN in
    every row (the local-model columns when ``eval.local`` is off) are left out."""
    if not rows:
        return "(no rows)"

    def empty(h: str) -> bool:
        return all(isinstance(r.get(h), float) and math.isnan(r[h]) for r in rows)

    headers = [h for h in rows[0] if not empty(h)]
    cells = [[_fmt(r.get(h, "")) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, rule, *body])
