"""Run outputs: ``metrics.jsonl`` (one JSON object per event), ``summary.csv``, results table.

Usage::

    log = MetricsLog(run_dir / "metrics.jsonl")      # a new file starts with the schema record
    log.write(GlobalEval(round=0, client=GLOBAL, loss=2.1, ppl=8.2, tokens=900, buckets={}))
    write_summary(run_dir / "summary.csv", rows)
    print(format_table(rows))

The kinds and fields of the records are defined once in :mod:`cllora.report.records`.
``summary.csv`` has one row per round: the global model's test loss/perplexity and its loss on
each client's test set.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cllora.report.records import Record, SchemaRecord, check_schema


class MetricsLog:
    """Append-only JSON-lines writer (flushed per line, so a killed run keeps what it logged).

    ``path=None`` writes nothing (ranks other than 0 of a distributed run). ``records``: how
    many records the file holds (a checkpoint keeps it, so a resume can tell lost records).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        new = path is not None and (not path.exists() or path.stat().st_size == 0)
        self.records = count_records(path) if path is not None and not new else 0
        self._fh = path.open("a", encoding="utf-8") if path is not None else None
        if new:
            self.write(SchemaRecord())

    def write(self, record: Record | None = None, **fields: Any) -> None:
        """Append ``record`` (a :mod:`cllora.report.records` dataclass) or a record given as
        fields."""
        record = record.as_dict() if record is not None else fields
        if self._fh is not None:
            self._fh.write(json.dumps(record, sort_keys=False) + "\n")
            self._fh.flush()
            self.records += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def count_records(path: Path) -> int:
    """The number of records (non-blank lines) of a ``metrics.jsonl``, without parsing them."""
    with Path(path).open(encoding="utf-8", errors="replace") as fh:
        return sum(1 for line in fh if line.strip())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file. A last line cut by a kill is left out with a
    warning; any other line that is not a record is a
    :class:`~cllora.data.readers.DataError` naming ``file:line``."""
    from cllora.errors import DataError

    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines):
                logging.getLogger("cllora").warning("%s:%d: a cut last record, left out", path, i)
                continue
            raise DataError(f"{path}:{i}: not a metrics record ({err.msg})") from None
        if not isinstance(record, dict) or "kind" not in record:
            raise DataError(f"{path}:{i}: not a metrics record (no 'kind')")
        records.append(record)
    try:
        check_schema(records, str(path))
    except ValueError as err:
        raise DataError(str(err)) from None
    return records


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
