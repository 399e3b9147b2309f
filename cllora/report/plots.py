"""Plots of runs and sweeps (matplotlib, headless), each saved as a PNG.

Usage::

    from cllora.report.plots import plot_rounds, plot_knob
    plot_rounds(records, out_dir / "rounds.png")        # records of a metrics.jsonl

Every function takes plain records or rows (as read from ``metrics.jsonl`` / ``results.csv``) and
a path, draws one figure and returns the path. Used by :mod:`cllora.report.html`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from cllora.report.records import GLOBAL, OWN, Kind


def _integer_x(*axes: Any) -> None:
    """Rounds and steps are whole numbers: ticks only there."""
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rounds(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Left: the global model's loss vs round (global test set bold, each client's test thin).
    Right: local models after local training on their own test set (per client) and the mean of
    the local models on the global test set, with the global model's line for comparison."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    glob: dict[str, list] = defaultdict(list)
    for r in records:
        if r["kind"] == Kind.GLOBAL_EVAL:
            glob[r["client"]].append((r["round"], r["loss"]))
    for name, pts in sorted(glob.items()):
        x, y = zip(*pts, strict=True)
        bold = name == GLOBAL
        ax1.plot(
            x,
            y,
            "k-o" if bold else "-",
            lw=2.5 if bold else 1,
            label=name,
            alpha=1 if bold else 0.7,
        )
    ax1.set(title="global model", xlabel="round", ylabel="test loss (nats per token)")
    ax1.legend(fontsize=7)
    own: dict[str, list] = defaultdict(list)
    on_global: dict[int, list] = defaultdict(list)
    for r in records:
        if r["kind"] == Kind.LOCAL_EVAL:
            if r["test"] == OWN:
                own[r["client"]].append((r["round"], r["loss"]))
            else:
                on_global[r["round"]].append(r["loss"])
    for name, pts in sorted(own.items()):
        x, y = zip(*pts, strict=True)
        ax2.plot(x, y, "--o", lw=1, ms=4, label=f"{name} (own test)")  # a marker: one round
    if on_global:
        xs = sorted(on_global)
        ax2.plot(
            xs, [np.mean(on_global[x]) for x in xs], "r-s", lw=2, label="mean local, global test"
        )
    if GLOBAL in glob:
        x, y = zip(*glob[GLOBAL], strict=True)
        ax2.plot(x, y, "k-o", lw=2.5, label="global model")
    ax2.set(title="local models (before aggregation)", xlabel="round")
    ax2.legend(fontsize=7)
    _integer_x(ax1, ax2)
    return _save(fig, path)


def plot_train_loss(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Train loss of every local step, per client, steps of all rounds in order."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    per: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r["kind"] == Kind.CLIENT_TRAIN:
            per[r["client"]].extend(r["losses"])
    for name, losses in sorted(per.items()):
        ax.plot(range(1, len(losses) + 1), losses, lw=1, label=name)
    ax.set(title="train loss per local step", xlabel="local step (all rounds)", ylabel="loss")
    ax.legend(fontsize=7)
    _integer_x(ax)
    return _save(fig, path)


def plot_buckets(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Loss per length bucket on the global test set: the global model at the first and last
    round, and the mean of the last round's local models."""
    evals = [r for r in records if r["kind"] == Kind.GLOBAL_EVAL and r["client"] == GLOBAL]
    locals_ = [r for r in records if r["kind"] == Kind.LOCAL_EVAL and r["test"] == GLOBAL]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    if not evals:
        return _save(fig, path)
    first, last = evals[0], evals[-1]
    labels = list(last["buckets"])
    series = {f"global, round {first['round']}": first, f"global, round {last['round']}": last}
    x = np.arange(len(labels))
    width = 0.8 / (len(series) + bool(locals_))
    for j, (name, rec) in enumerate(series.items()):
        ax.bar(
            x + j * width,
            [rec["buckets"].get(b, {}).get("loss", np.nan) for b in labels],
            width,
            label=name,
        )
    if locals_:
        final = [r for r in locals_ if r["round"] == locals_[-1]["round"]]
        means = [
            np.nanmean([r["buckets"].get(b, {}).get("loss", np.nan) for r in final]) for b in labels
        ]
        ax.bar(
            x + len(series) * width, means, width, label=f"mean local, round {final[0]['round']}"
        )
    ax.set_xticks(x + width * (len(series) - 1 + bool(locals_)) / 2, labels)
    heights = [p.get_height() for p in ax.patches if np.isfinite(p.get_height())]
    if heights:  # zoom on the differences: losses sit far from zero
        lo, hi = min(heights), max(heights)
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
    ax.set(
        title="global test loss by length bucket",
        xlabel=f"measured length ({'sentences' if 'sent' in ''.join(labels) else 'tokens'})",
        ylabel="loss",
    )
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_knob(
    points: dict[Any, dict[str, list[float]]],
    knob: str,
    path: Path,
    log_x: bool = False,
    what: str = "final loss",
    ylabel: str = "test loss (nats per token)",
) -> Path:
    """Final metrics vs one knob: ``points[value][series]`` = values over seeds; mean +- std.
    Ticks sit at the knob's values (numbers), or the values are categories (anything else)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    keys = list(points)
    numeric = all(isinstance(x, int | float) for x in keys)
    xs = sorted(keys) if numeric else keys
    names = sorted({s for v in points.values() for s in v})
    for name in names:
        vals = [points[x].get(name, []) for x in xs]
        mean = [np.mean(v) if v else np.nan for v in vals]
        std = [np.std(v) if v else np.nan for v in vals]
        n = max(len(v) for v in vals)
        at = xs if numeric else list(range(len(xs)))
        ax.errorbar(at, mean, yerr=std, marker="o", capsize=4, label=f"{name} (n={n})")
    if log_x:
        ax.set_xscale("log")
    ax.set_xticks(xs if numeric else range(len(xs)), [str(x) for x in xs])
    ax.minorticks_off()
    ax.set(title=f"{what} vs {knob}\n(mean +- std over seeds)", xlabel=knob, ylabel=ylabel)
    ax.legend(fontsize=7)
    return _save(fig, path)


def forest_plot(rows: Sequence[Any], path: str | Path, title: str = "") -> Path:
    """A forest plot: one line per row, top to bottom in order, the effect as a dot and its 95%
    interval as a bar, a vertical line at 0; resolved rows coloured (green: better, i.e. lower
    loss or, on rows labelled "higher = better", a higher score; red: worse), the others grey and
    hollow. Returns the path (a PNG)."""
    from cllora.report.effects import higher_is_better, row_label

    path = Path(path)
    n = max(1, len(rows))
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.3 * n))
    for y, row in enumerate(rows):
        better = row.effect > 0 if higher_is_better(row) else row.effect < 0
        colour = ("tab:green" if better else "tab:red") if row.resolved else "0.55"
        ax.plot([row.lo, row.hi], [y, y], "-", color=colour, lw=2.2 if row.resolved else 1.2)
        face = colour if row.resolved else "white"
        ax.plot(row.effect, y, "o", color=colour, markerfacecolor=face, ms=6, zorder=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), [row_label(r) for r in rows], fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)
    xlabel = "loss difference (nats per token), negative = better"
    if any(higher_is_better(r) for r in rows):
        xlabel += "; rows marked (higher = better): score difference"
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=7))  # labels that do not run into each other
    default = "paired effects, 95% intervals\n(filled: excludes 0; (1 seed): sample noise only)"
    ax.set_title(title or default, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
