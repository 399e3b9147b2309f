"""The benchmark's figure: tokens/s and peak memory against context length, failures marked.

Usage::

    from cllora.bench.figure import figure, plot

    png = plot(Path("benchmarks/results/e2e-cpu-20261126T100512Z.csv"))   # the PNG beside it
    fig = figure(rows)        # rows of that CSV (csv.DictReader), a matplotlib Figure

One column per workload (``fixed``, ``real``), one line per provider; a cell that did not finish
is a cross at the foot of each panel, marked ``OOM``, ``error`` or ``timeout``, with every failed
cell's one-line error printed under the panels.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

WORKLOADS = ("fixed", "real")


def plot(csv_path: Path) -> Path:
    """The CSV's :func:`figure` as a PNG next to it."""
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        fig = figure(list(csv.DictReader(f)))
    png = csv_path.with_suffix(".png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def figure(rows: list[dict]) -> Any:
    """Tokens/s and peak memory against context length (ticks at the contexts measured, in
    tokens), one line per provider, one column per workload. A cell that did not finish is a
    cross at the foot of each panel, marked ``OOM``, ``error`` or ``timeout``; every failed
    cell's one-line error is printed under the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["workload"] in WORKLOADS and r["context"]]
    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in rows)]
    fails = _failures(rows)
    fig, axes = plt.subplots(2, max(len(workloads), 1), figsize=(6 * max(len(workloads), 1), 8),
                             squeeze=False)  # fmt: skip
    for j, w in enumerate(workloads):
        contexts = sorted({int(r["context"]) for r in rows if r["workload"] == w})
        for i, (metric, label) in enumerate((("tokens_per_s", "tokens/s"),
                                             ("peak_mem", "peak memory (GiB)"))):  # fmt: skip
            ax = axes[i][j]
            for p in dict.fromkeys(r["provider"] for r in rows):
                pts = sorted(
                    (int(r["context"]), float(r["value"]))
                    for r in rows
                    if (r["workload"], r["provider"], r["metric"]) == (w, p, metric)
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=p)
            _mark_failures(ax, [f for f in fails if f["workload"] == w])
            ax.set_xscale("log", base=2)
            ax.set_xticks(contexts, [str(c) for c in contexts])
            ax.minorticks_off()
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(label)
            ax.set_title(f"{w}: {label}")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
    notes = [f"{f['provider']} {f['workload']} {f['context']}: {f['status']}"
             + (f": {f['error']}" if f["error"] else "") for f in fails]  # fmt: skip
    if notes:
        fig.text(0.01, 0.005, "\n".join(n[:160] for n in notes), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.03 * len(notes), 1, 1))
    return fig


def _failures(rows: list[dict]) -> list[dict]:
    """The cells whose status is not ok: provider, workload, context, status, error (or "")."""
    key = lambda r: (r["provider"], r["workload"], r["context"])  # noqa: E731
    errors = {key(r): r["value"] for r in rows if r["metric"] == "error"}
    return [
        {"provider": r["provider"], "workload": r["workload"], "context": int(r["context"]),
         "status": r["value"], "error": errors.get(key(r), "")}
        for r in rows
        if r["metric"] == "status" and r["value"] != "ok"
    ]  # fmt: skip


def _mark_failures(ax: Any, fails: list[dict]) -> None:
    """A cross at each failed cell's context, at the foot of the panel, with the providers that
    failed there and how (one line each)."""
    at: dict[int, list[str]] = {}
    for f in fails:
        status = "OOM" if f["status"] == "oom" else f["status"]
        at.setdefault(f["context"], []).append(f"{f['provider']}: {status}")
    for context, lines in at.items():
        ax.plot([context], [0.04], "x", color="tab:red", ms=9, transform=ax.get_xaxis_transform())
        ax.annotate("\n".join(lines), (context, 0.08), xycoords=ax.get_xaxis_transform(),
                    fontsize=7, color="tab:red", ha="center", va="bottom")  # fmt: skip
