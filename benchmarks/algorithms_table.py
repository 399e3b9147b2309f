"""The algorithms sweep as a markdown table: final losses, traffic and time per algorithm, and
each algorithm's paired difference from FedAvg with a 95% interval over the seeds.

Usage::

    cllora sweep examples/algorithms.yaml
    python benchmarks/algorithms_table.py runs/algorithms > table.md

Reads the sweep's ``results.csv`` (final round, bucket ``all``) and every cell's
``metrics.jsonl`` (round records: bytes and seconds). A difference is paired: the algorithm's
cell minus FedAvg's cell of the same seed (the same held-out global test set and client test
sets); its interval is Student t over the seeds (:func:`cllora.report.effects.t975`), the same
method ``cllora report`` uses for per-sample effects. ``resolved`` = the interval excludes 0.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from cllora.report.effects import t975
from cllora.report.records import GLOBAL

REFERENCE = "fedavg"
KEY = "fed.strategy"


def final_losses(rows: list[dict]) -> dict[tuple[str, int], dict[str, float]]:
    """(algorithm, seed) -> global / local_own / local_global loss at the cell's last round."""
    by_cell = defaultdict(list)
    for r in rows:
        if r["bucket"] == "all":
            by_cell[(r[KEY], int(r["seed"]))].append(r)
    out = {}
    for key, rs in by_cell.items():
        last = max(int(r["round"]) for r in rs)
        rs = [r for r in rs if int(r["round"]) == last]
        glob = [float(r["loss"]) for r in rs if r["model"] == "global" and r["test"] == GLOBAL]
        own = [float(r["loss"]) for r in rs if r["model"] == "local" and r["test"] != GLOBAL]
        on_glob = [float(r["loss"]) for r in rs if r["model"] == "local" and r["test"] == GLOBAL]

        def mean(xs: list[float]) -> float:
            return sum(xs) / len(xs) if xs else math.nan

        out[key] = {"global": glob[0], "local_own": mean(own), "local_global": mean(on_glob)}
    return out


def traffic(cell_dir: Path) -> dict[str, float]:
    """Bytes up and down per round and the seconds of the rounds, from the round records."""
    rounds = [
        json.loads(line)
        for line in (cell_dir / "metrics.jsonl").read_text().splitlines()
        if '"kind": "round"' in line
    ]
    n = max(len(rounds), 1)
    return {
        "up_mb": sum(r["bytes_up"] for r in rounds) / n / 1e6,
        "down_mb": sum(r["bytes_down"] for r in rounds) / n / 1e6,
        "seconds": sum(r["seconds"] for r in rounds),
    }


def interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% Student t interval of per-seed paired differences."""
    if not diffs or any(math.isnan(d) for d in diffs):
        return math.nan, math.nan, math.nan
    m = statistics.fmean(diffs)
    if len(diffs) < 2:
        return m, math.nan, math.nan
    half = t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return m, m - half, m + half


def _cell(v: float, lo: float, hi: float) -> str:
    if math.isnan(v):
        return "-"
    mark = " **resolved**" if lo > 0 or hi < 0 else ""
    return f"{v:+.4f} [{lo:+.3f}, {hi:+.3f}]{mark}"


def table(root: Path) -> str:
    rows = list(csv.DictReader((root / "results.csv").open(encoding="utf-8")))
    losses = final_losses(rows)
    algos = list(dict.fromkeys(r[KEY] for r in rows))
    seeds = sorted({s for _, s in losses})
    cells = {(r[KEY], int(r["seed"])): r["cell"] for r in rows}
    lines = [
        f"| algorithm | global loss (seeds {', '.join(map(str, seeds))}) | local own | "
        f"local on global | global - {REFERENCE} (95% CI) | local own - {REFERENCE} (95% CI) | "
        "MB up / round | MB down / round | s of rounds (seed 0) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in algos:
        per = [losses[(a, s)] for s in seeds if (a, s) in losses]
        ref = [losses[(REFERENCE, s)] for s in seeds if (a, s) in losses]
        cols = {}
        for k in ("global", "local_own"):
            diffs = [p[k] - q[k] for p, q in zip(per, ref, strict=True)]
            cols[k] = _cell(*interval(diffs)) if a != REFERENCE else "(reference)"
        t = traffic(root / "cells" / cells[(a, seeds[0])])

        def fmt(xs: list[float]) -> str:
            return " / ".join("-" if math.isnan(x) else f"{x:.4f}" for x in xs)

        lines.append(
            f"| {a} | {fmt([p['global'] for p in per])} | {fmt([p['local_own'] for p in per])} | "
            f"{fmt([p['local_global'] for p in per])} | {cols['global']} | {cols['local_own']} | "
            f"{t['up_mb']:.2f} | {t['down_mb']:.2f} | {t['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table(Path(sys.argv[1])))
