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
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cllora.report.records import GLOBAL, OWN, Kind, of_kind

FILE_NAME = "sample_losses.csv"
COLUMNS = ("round", "model", "client", "test", "sample", "length", "tokens", "loss_sum")


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
        for sid, length, tokens, loss_sum in zip(
            part["samples"], part["lengths"], part["tokens"], sums, strict=True
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
