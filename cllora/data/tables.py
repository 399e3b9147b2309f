"""Per-client tables: what each data owner holds, and how far it is from the others.

Usage::

    from cllora.data.tables import client_table, heterogeneity_summary, write_csv
    rows = client_table(clients, edges, tokenizer, quality={"client-00": 0.08, ...})
    rows = client_table(clients, edges, tokenizer, measure="sentences")  # sentence buckets
    write_csv(run_dir / "clients.csv", rows)
    heterogeneity_summary(rows)   # {"mean_tv_len": .., "cv_samples": .., "std_corruption": ..}

Columns of a row: ``client``, ``train_samples``, ``test_samples``, ``train_tokens``,
``len_mean``/``len_median``/``len_p90`` (measured token length of the training samples, before
corruption and windows), ``sentences`` (in the training responses as trained, i.e. decoded after
corruption and windows, by :func:`cllora.data.sentences.count_sentences`),
``sentences_per_sample``, ``window``, ``truncated``, ``dropped``, ``corruption_rate`` (asked),
``corrupted`` (fraction actually corrupted), ``discarded`` (corrupted samples dropped,
``quality.drop``), ``operators``, ``quality`` (1 / base-model ppl of
the responses; empty when not scored), ``tv_len`` (total-variation distance between the client's
length-bucket histogram and the global one: 0 = same mix, 1 = disjoint) and ``hist`` (the
client's bucket shares, ``bucket_counts`` its samples per bucket; ``tv_asked`` the skew the
allocation asked for, only where one was asked, :mod:`cllora.data.pool`). ``tv_len`` and
``hist`` use the buckets of ``measure``
(``partition.length_measure``: token lengths, or the responses' sentence counts as measured
before corruption and windows; labels ``<3sent``, ...); the ``len_*`` columns are always tokens.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cllora.data.formatting import IGNORE_INDEX
from cllora.data.partition import Client, bucket_index, bucket_labels, sample_length
from cllora.data.sentences import count_sentences


def _histogram(lengths: Sequence[int], edges: Sequence[int]) -> np.ndarray:
    counts = np.bincount([bucket_index(n, edges) for n in lengths], minlength=len(edges) + 1)
    return counts / max(1, counts.sum())


def client_table(
    clients: Sequence[Client],
    edges: Sequence[int],
    tokenizer: Any,
    quality: dict[str, float] | None = None,
    measure: str = "tokens",
) -> list[dict[str, Any]]:
    """One row per client (see the module docstring for the columns); ``edges`` are in the
    unit of ``measure`` (tokens or sentences)."""
    all_measures = [sample_length(s, measure) for c in clients for s in c.train]
    global_hist = _histogram(all_measures, edges)
    labels = bucket_labels(edges, measure)
    rows = []
    for c in clients:
        lengths = [sample_length(s) for s in c.train]
        responses = [[t for t in s.labels if t != IGNORE_INDEX] for s in c.train]
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        sentences = sum(count_sentences(t) for t in texts)
        hist = _histogram([sample_length(s, measure) for s in c.train], edges)
        n_bad = sum(c.corrupted.values())
        rows.append(
            {
                "client": c.name,
                "train_samples": len(c.train),
                "test_samples": len(c.test),
                "train_tokens": c.train_tokens,
                "len_mean": float(np.mean(lengths)),
                "len_median": float(np.median(lengths)),
                "len_p90": float(np.percentile(lengths, 90)),
                "sentences": sentences,
                "sentences_per_sample": sentences / len(c.train),
                "window": c.window,
                "truncated": c.truncated,
                "dropped": c.dropped,
                "corruption_rate": c.corruption_rate,
                "corrupted": n_bad / (len(c.train) + c.discarded),
                "discarded": c.discarded,
                "operators": " ".join(f"{k}:{v}" for k, v in c.corrupted.items() if v),
                "quality": (quality or {}).get(c.name, float("nan")),
                "tv_len": float(0.5 * np.abs(hist - global_hist).sum()),
                **({} if c.tv_asked is None else {"tv_asked": c.tv_asked}),
                "hist": " ".join(f"{lab}:{h:.2f}" for lab, h in zip(labels, hist, strict=True)),
                "bucket_counts": " ".join(
                    f"{lab}:{round(h * len(c.train))}" for lab, h in zip(labels, hist, strict=True)
                ),
            }
        )
    return rows


def heterogeneity_summary(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Run-level heterogeneity: mean length-histogram distance, spread of sizes and quality."""
    samples = np.array([r["train_samples"] for r in rows], dtype=float)
    rates = np.array([r["corrupted"] for r in rows], dtype=float)
    return {
        "mean_tv_len": float(np.mean([r["tv_len"] for r in rows])),
        "cv_samples": float(samples.std() / samples.mean()),
        "mean_corrupted": float(rates.mean()),
        "std_corrupted": float(rates.std()),
    }


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows as CSV (columns from the union of the rows' keys, in first-seen order)."""
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
