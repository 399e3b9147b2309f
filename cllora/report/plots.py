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

from cllora.data.partition import bucket_index, bucket_labels, bucket_sort_key
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


def plot_rounds(records: Sequence[dict[str, Any]], path: Path, why_no_local: str = "") -> Path:
    """The loss vs round of the global and local models (see :func:`rounds_figure`)."""
    return _save(rounds_figure(records, why_no_local), path)


def rounds_figure(records: Sequence[dict[str, Any]], why_no_local: str = "") -> Any:
    """Left: the global model's loss vs round (global test set bold, each client's test thin).
    Right: local models after local training on their own test set (per client) and the mean of
    the local models on the global test set, with the global model's line for comparison; with
    no local evaluation recorded, the panel says so (and why: ``why_no_local``, e.g.
    ``"eval.local=false"``)."""
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
    if not own and not on_global:
        note = "local models were not evaluated" + (f": {why_no_local}" if why_no_local else "")
        ax2.text(0.5, 0.5, note, transform=ax2.transAxes, ha="center", va="center", wrap=True,
                 bbox={"facecolor": "#f6f6f0", "edgecolor": "0.6"})  # fmt: skip
    ax2.legend(fontsize=7)
    _integer_x(ax1, ax2)
    fig.tight_layout()
    return fig


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


def bucket_sizes(records: Sequence[dict[str, Any]], first: int = 0) -> dict[str, int]:
    """Samples of the global test set per length bucket (label -> count; every bucket listed),
    from the run's ``test_samples`` and ``partition`` records; ``first`` > 0: of its first
    ``first`` samples only (``eval.local_global_samples``: what the local models were scored
    on). Empty when the run wrote no ``test_samples`` record."""
    part = next((r for r in records if r["kind"] == Kind.PARTITION), {})
    sets = next((r["sets"] for r in records if r["kind"] == Kind.TEST_SAMPLES), {})
    if GLOBAL not in sets:
        return {}
    edges, measure = part.get("length_buckets") or [], part.get("length_measure", "tokens")
    lengths = sets[GLOBAL]["lengths"][:first] if first else sets[GLOBAL]["lengths"]
    labels = bucket_labels(edges, measure)
    sizes = dict.fromkeys(labels, 0)
    for n in lengths:
        sizes[labels[bucket_index(n, edges)]] += 1
    return sizes


def plot_buckets(records: Sequence[dict[str, Any]], path: Path, local_first: int = 0) -> Path:
    """Loss per length bucket on the global test set (see :func:`buckets_figure`)."""
    return _save(buckets_figure(records, local_first), path)


def buckets_figure(records: Sequence[dict[str, Any]], local_first: int = 0) -> Any:
    """Loss per length bucket on the global test set: the global model at the first and last
    round, and the mean of the last round's local models (scored on the first ``local_first``
    samples when > 0); buckets in order of length, each bar labelled with its samples (n)."""
    evals = [r for r in records if r["kind"] == Kind.GLOBAL_EVAL and r["client"] == GLOBAL]
    locals_ = [r for r in records if r["kind"] == Kind.LOCAL_EVAL and r["test"] == GLOBAL]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    if not evals:
        return fig
    first, last = evals[0], evals[-1]
    labels = sorted(last["buckets"], key=bucket_sort_key)
    series = {f"global, round {first['round']}": first, f"global, round {last['round']}": last}
    x = np.arange(len(labels))
    width = 0.8 / (len(series) + bool(locals_))
    sizes = bucket_sizes(records)
    for j, (name, rec) in enumerate(series.items()):
        losses = [rec["buckets"].get(b, {}).get("loss", np.nan) for b in labels]
        _counted(ax, ax.bar(x + j * width, losses, width, label=name), labels, sizes)
    if locals_:
        final = [r for r in locals_ if r["round"] == locals_[-1]["round"]]
        means = [
            np.nanmean([r["buckets"].get(b, {}).get("loss", np.nan) for r in final]) for b in labels
        ]
        label = f"mean local, round {final[0]['round']}"
        bars = ax.bar(x + len(series) * width, means, width, label=label)
        _counted(ax, bars, labels, bucket_sizes(records, local_first) if local_first else sizes)
    ax.set_xticks(x + width * (len(series) - 1 + bool(locals_)) / 2, labels)
    heights = [p.get_height() for p in ax.patches if np.isfinite(p.get_height())]
    if heights:  # zoom on the differences: losses sit far from zero; room for the n labels
        lo, hi = min(heights), max(heights)
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.25 * (hi - lo + 1e-3))
    ax.set(
        title="global test loss by length bucket (n: test samples in the bucket)",
        xlabel=f"measured length ({'sentences' if 'sent' in ''.join(labels) else 'tokens'})",
        ylabel="loss",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _counted(ax: Any, bars: Any, labels: list[str], sizes: dict[str, int]) -> None:
    """Each bar labelled ``n=K``: the samples of its bucket (nothing when not known)."""
    if sizes:
        ax.bar_label(bars, [f"n={sizes.get(b, 0)}" for b in labels], fontsize=7, padding=1)


def series_key(name: str) -> tuple:
    """The legend order of a series: by name, a name ending in a length bucket
    (``"global, <128"``) by the bucket's length (:func:`bucket_sort_key`), not as text."""
    head, _, tail = name.rpartition(", ")
    return (head, bucket_sort_key(tail), tail) if head else (name, (0, 0.0), "")


def plot_knob(
    points: dict[Any, dict[str, list[float]]],
    knob: str,
    path: Path,
    log_x: bool = False,
    what: str = "final loss",
    ylabel: str = "test loss (nats per token)",
) -> Path:
    """Final metrics vs one knob (see :func:`knob_figure`), saved as a PNG."""
    return _save(knob_figure(points, knob, log_x, what, ylabel), path)


def knob_figure(
    points: dict[Any, dict[str, list[float]]],
    knob: str,
    log_x: bool = False,
    what: str = "final loss",
    ylabel: str = "test loss (nats per token)",
) -> Any:
    """Final metrics vs one knob: ``points[value][series]`` = values over seeds; mean +- std.
    Ticks sit at the knob's values (numbers), or the values are categories (anything else).
    Series in the order of :func:`series_key` (a length bucket's by length)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    keys = list(points)
    numeric = all(isinstance(x, int | float) for x in keys)
    xs = sorted(keys) if numeric else keys
    names = sorted({s for v in points.values() for s in v}, key=series_key)
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
    fig.tight_layout()
    return fig


def forest_plot(rows: Sequence[Any], path: str | Path, title: str = "") -> Path:
    """A forest plot of effect rows (see :func:`forest_figure`), saved as a PNG; returns the
    path."""
    path = Path(path)
    fig = forest_figure(rows, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def forest_figure(rows: Sequence[Any], title: str = "") -> Any:
    """One line per row, top to bottom in order, the effect as a dot and its 95% interval as a
    bar, a vertical line at 0; resolved rows coloured (green: better, red: worse), the others
    grey and hollow. Loss rows and score rows (``higher_is_better``: generation scores) sit on
    two panels, each under an axis whose text is true for every row on it: loss difference in
    nats per token, negative = better; score difference, positive = better. The signs are the
    table's (nothing flipped), and the units differ, so the two never share an axis."""
    from cllora.report.effects import higher_is_better

    groups = [
        (
            [r for r in rows if not higher_is_better(r)],
            "loss difference (nats per token): negative = better",
        ),
        (
            [r for r in rows if higher_is_better(r)],
            "score difference (ROUGE-L, token F1 in [0, 1]): positive = better",
        ),
    ]
    groups = [g for g in groups if g[0]] or [([], groups[0][1])]
    heights = [max(1, len(g)) for g, _ in groups]
    fig, axes = plt.subplots(len(groups), 1, squeeze=False, height_ratios=heights,
                             figsize=(10, 1.5 * len(groups) + 0.3 * sum(heights)))  # fmt: skip
    for ax, (group, xlabel) in zip(axes[:, 0], groups, strict=True):
        _forest_panel(ax, group, xlabel)
    default = "paired effects, 95% intervals\n(filled: excludes 0; (1 seed): sample noise only)"
    axes[0, 0].set_title(title or default, fontsize=9)
    fig.tight_layout()
    return fig


def _forest_panel(ax: Any, rows: Sequence[Any], xlabel: str) -> None:
    """The rows of one kind (all loss rows, or all score rows) on one axis."""
    from cllora.report.effects import higher_is_better, row_label

    for y, row in enumerate(rows):
        better = row.effect > 0 if higher_is_better(row) else row.effect < 0
        colour = ("tab:green" if better else "tab:red") if row.resolved else "0.55"
        ax.plot([row.lo, row.hi], [y, y], "-", color=colour, lw=2.2 if row.resolved else 1.2)
        face = colour if row.resolved else "white"
        ax.plot(row.effect, y, "o", color=colour, markerfacecolor=face, ms=6, zorder=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), [row_label(r) for r in rows], fontsize=8)
    ax.set_ylim(max(1, len(rows)) - 0.5, -0.5)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=7))  # labels that do not run into each other
