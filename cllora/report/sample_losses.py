"""Per-sample losses of a run as one long table, ``sample_losses.csv``, for paired effects.

Usage::

    from cllora.report.metrics import read_metrics
    from cllora.report.sample_losses import write_sample_losses
    write_sample_losses(read_metrics(run_dir / "metrics.jsonl"), run_dir / "sample_losses.csv")

One row per (round, evaluated model, test set, sample), columns :data:`COLUMNS`: ``model`` is
``global`` (``client`` empty) or ``local`` (``client``: the local model's owner); ``test`` is the
test set the row was evaluated on (a client's name, or ``__global__``); ``sample`` the sample's
id (``file:line``, the same in every cell of a sweep that shares the data and the seed);
``length`` its length measure (tokens, or sentences with ``partition.length_measure=sentences``),
``tokens`` its target tokens, ``loss_sum`` its summed loss (the loss of a set is
``sum(loss_sum) / sum(tokens)``). Read by :mod:`cllora.report.effects`.
Written at the end of every run from the ``test_samples`` record and the ``loss_sums`` of the
evaluation records (:mod:`cllora.report.records`); a run from before them gets no table.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cllora.errors import DataError
from cllora.report.records import GLOBAL, OWN, Kind, of_kind

FILE_NAME = "sample_losses.csv"
COLUMNS = ("round", "model", "client", "test", "sample", "length", "tokens", "loss_sum")
MODELS = ("global", "local")


def sample_loss_rows(records: Iterable[dict[str, Any]]) -> Iterator[tuple]:
    """The table's rows (tuples in :data:`COLUMNS` order) from a run's metrics records."""
    records = list(records)
    (samples,) = of_kind(records, Kind.TEST_SAMPLES) or [None]
    if samples is None:
        return
    sets = samples["sets"]
    for rec in records:
        if rec.get("kind") == Kind.GLOBAL_EVAL:
            model, client, test = "global", "", rec["client"]
        elif rec.get("kind") == Kind.LOCAL_EVAL:
            model, client = "local", rec["client"]
            test = rec["client"] if rec["test"] == OWN else GLOBAL
        else:
            continue
        part, sums = sets[test], rec.get("loss_sums")
        if not sums:  # not recorded
            continue
        n = len(sums)  # a local model on the first eval.local_global_samples of the set
        if n > len(part["samples"]):
            raise ValueError(f"round {rec['round']}: {n} loss_sums for the {test} test set of "
                             f"{len(part['samples'])} samples")  # fmt: skip
        for sid, length, tokens, loss_sum in zip(
            part["samples"][:n], part["lengths"][:n], part["tokens"][:n], sums, strict=True
        ):
            yield (rec["round"], model, client, test, sid, length, tokens, loss_sum)


def write_sample_losses(records: Iterable[dict[str, Any]], path: Path) -> Path | None:
    """Write ``sample_losses.csv`` (atomically); None, and nothing written, when the records
    hold no per-sample losses (a run from before schema version 2)."""
    rows = list(sample_loss_rows(records))
    if not rows:
        return None
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class SampleLosses:
    """The rows of one ``sample_losses.csv``, column by column (``line``: each row's line)."""

    path: Path
    round: np.ndarray  # int64
    model: list[str]
    client: list[str]
    test: list[str]
    sample: list[str]
    length: np.ndarray  # int64
    tokens: np.ndarray  # int64
    loss_sum: np.ndarray  # float64
    line: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.round)

    def rounds(self) -> set[int]:
        return {int(r) for r in np.unique(self.round)}


def _int(text: str, column: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(f"{where}: column {column!r}: {text!r} is not an integer") from None


def _float(text: str, column: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: column {column!r}: {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise DataError(f"{where}: column {column!r}: {text!r} is not a finite number >= 0")
    return value


def _parse_row(fields_: list[str], where: str) -> tuple:
    rnd, model, client, test, sample, length, tokens, loss = fields_
    if model not in MODELS:
        raise DataError(f"{where}: column 'model': {model!r} is neither 'global' nor 'local'")
    if (model == "global") == bool(client):
        need = "empty for the global model" if client else "the local model's client"
        raise DataError(f"{where}: column 'client': {client!r}; it must be {need}")
    if not test or not sample:
        raise DataError(f"{where}: columns 'test' and 'sample' must not be empty")
    n_tokens = _int(tokens, "tokens", where)
    if n_tokens < 0:
        raise DataError(f"{where}: column 'tokens': {tokens!r} is negative")
    parsed = (_int(rnd, "round", where), model, client, test, sample, _int(length, "length", where))
    return (*parsed, n_tokens, _float(loss, "loss_sum", where))


def _read_rows(path: Path) -> tuple[list[tuple], list[int]]:
    rows: list[tuple] = []
    lines: list[int] = []
    seen: dict[tuple, int] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}:1: empty file; expected the header {','.join(COLUMNS)}")
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise DataError(
                f"{path}:1: the header lacks {', '.join(missing)}; expected {','.join(COLUMNS)}"
            )
        order = [header.index(c) for c in COLUMNS]
        for raw in reader:
            if not raw:
                continue
            where = f"{path}:{reader.line_num}"
            if len(raw) != len(header):
                raise DataError(f"{where}: {len(raw)} fields, the header has {len(header)}")
            row = _parse_row([raw[i] for i in order], where)
            key = row[:5]
            if key in seen:
                raise DataError(
                    f"{where}: duplicate row for round {row[0]}, model {row[1]}, client "
                    f"{row[2]!r}, test {row[3]!r}, sample {row[4]!r} (first at line {seen[key]})"
                )
            seen[key] = reader.line_num
            rows.append(row)
            lines.append(reader.line_num)
    return rows, lines


def read_sample_losses(path: str | Path) -> SampleLosses:
    """Read a ``sample_losses.csv`` (columns in any order, extra columns ignored); raise
    :class:`~cllora.data.readers.DataError` naming ``file:line`` on a malformed line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (the run wrote no per-sample losses)")
    rows, lines = _read_rows(path)
    cols = list(zip(*rows, strict=True)) if rows else [()] * len(COLUMNS)
    return SampleLosses(
        path=path,
        round=np.asarray(cols[0], dtype=np.int64),
        model=list(cols[1]),
        client=list(cols[2]),
        test=list(cols[3]),
        sample=list(cols[4]),
        length=np.asarray(cols[5], dtype=np.int64),
        tokens=np.asarray(cols[6], dtype=np.int64),
        loss_sum=np.asarray(cols[7], dtype=np.float64),
        line=np.asarray(lines, dtype=np.int64),
    )
