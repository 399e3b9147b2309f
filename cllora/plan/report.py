"""Planned points as a table, as rows of the benchmark's CSV format, as a plot; the max-context
search.

Usage::

    from cllora.plan.gpus import gpu
    from cllora.plan.report import csv_rows, find_max_context, plot, table, write_csv
    from cllora.plan.step import PlanSpec, plan_step

    card = gpu("h200")
    points = [plan_step(PlanSpec(provider=p)) for p in ("cllora-4bit", "hf-peft-4bit")]
    print(table(points, card))
    best, probes = find_max_context(PlanSpec(provider="cllora-4bit"), budget_gib=24.0)
    write_csv("plan.csv", csv_rows(points, card))
    plot("plan.csv")                           # plan.png: memory and roofline tokens/s

The CSV is ``cllora bench``'s long format (provider, workload, context, batch,
metric, value, unit, device, dtype, commit, timestamp); ``device`` reads ``plan: <GPU>`` and the
units say ``predicted``, so planned rows are never mistaken for measured ones.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from cllora.plan.gpus import GPU, launch_floor_s, roofline_by_kind, roofline_s
from cllora.plan.search import bisect_max
from cllora.plan.step import CATEGORIES, PlanPoint, PlanSpec, plan_step

FIELDS = ("provider", "workload", "context", "batch", "metric", "value", "unit", "device",
          "dtype", "commit", "timestamp")  # fmt: skip
ROOT = Path(__file__).resolve().parents[2]


def find_max_context(
    spec: PlanSpec,
    budget_gib: float,
    step: int = 256,
    hi: int = 131072,
    log: Callable[[str], None] | None = None,
) -> tuple[int, list[PlanPoint]]:
    """The longest context (a multiple of ``step`` up to ``hi``) whose predicted peak fits
    ``budget_gib``, by the benchmark's binary search; returns it (0: none) and the probes."""
    probes: list[PlanPoint] = []

    def fits(units: int) -> bool:
        point = plan_step(dataclasses.replace(spec, context=units * step))
        probes.append(point)
        ok = point.peak_gib <= budget_gib
        if log:
            log(f"  probe {spec.provider} {units * step}: {point.peak_gib:.2f} GiB "
                f"{'fits' if ok else 'over'}")  # fmt: skip
        return ok

    return bisect_max(fits, hi // step) * step, probes


def tokens_per_s(point: PlanPoint, card: GPU) -> float:
    """The roofline bound on tokens/s of the step on ``card``."""
    return point.tokens / roofline_s(point.parts, card)


def table(points: list[PlanPoint], card: GPU) -> str:
    """A fixed-width table: memory by category, FLOPs, bytes, launches, roofline."""
    head = ("provider", "context", "peak GiB", "base", "lora", "optim", "grads", "activ",
            "transient", "TFLOP", "GB moved", "other GB", "launches", "roofline ms",
            "tok/s bound", f"fits {card.memory_gib:g}")  # fmt: skip
    rows = [head]
    for p in points:
        m = p.memory_gib
        t = roofline_s(p.parts, card)
        rows.append((
            p.spec.provider, str(p.spec.context), f"{p.peak_gib:.2f}",
            *(f"{m[c]:.2f}" for c in CATEGORIES), f"{p.flops / 1e12:.1f}",
            f"{p.bytes_moved / 1e9:.1f}", f"{p.other_bytes() / 1e9:.1f}", str(p.launches),
            f"{t * 1e3:.0f}", f"{p.tokens / t:.0f}",
            "yes" if p.peak_gib <= card.memory_gib else "no",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in rows]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def kinds_table(points: list[PlanPoint], card: GPU) -> str:
    """Per operator kind: GB moved, launches and roofline ms of each point (the "other" work)."""
    kinds = sorted({k for p in points for k in p.by_kind if k != "metadata"})
    lines = ["kind          " + "  ".join(f"{p.spec.provider}@{p.spec.context}".rjust(30)
                                          for p in points)]  # fmt: skip
    for k in kinds:
        cells = []
        for p in points:
            v = p.by_kind.get(k, {"bytes": 0.0, "launches": 0.0})
            ms = roofline_by_kind(p.parts, card).get(k, 0.0) * 1e3
            cells.append(f"{v['bytes'] / 1e9:8.1f} GB {v['launches']:6.0f} L {ms:6.1f} ms")
        lines.append(f"{k:12s}  " + "  ".join(c.rjust(30) for c in cells))
    return "\n".join(lines)


def commit() -> str:
    """Short commit of the checkout: ``CLLORA_COMMIT`` where the tree travels without .git (a
    lent GPU machine), else git's ("unknown" outside git). The benchmark's and the plan's."""
    if os.environ.get("CLLORA_COMMIT"):
        return os.environ["CLLORA_COMMIT"]
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True, stderr=subprocess.DEVNULL
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def csv_rows(
    points: list[PlanPoint], card: GPU, max_contexts: dict[str, tuple[int, float]] | None = None
) -> list[dict]:
    """Long-format rows (see the module docstring); ``max_contexts``: provider -> (context,
    budget GiB) from :func:`find_max_context`."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = {"device": f"plan: {card.name}", "commit": commit(), "timestamp": stamp}
    rows = []
    for p in points:
        row = {**base, "provider": p.spec.provider, "workload": "fixed",
               "context": p.spec.context, "batch": p.spec.batch, "dtype": p.spec.dtype}  # fmt: skip
        t = roofline_s(p.parts, card)
        values = [
            ("status", "ok", ""),
            ("peak_mem", f"{p.peak_gib:.4g}", "GiB (predicted max allocated)"),
            *((f"mem_{c}", f"{p.memory_gib[c]:.4g}", "GiB at the peak") for c in CATEGORIES),
            ("tokens_per_s", f"{p.tokens / t:.4g}", "tokens/s (predicted roofline bound)"),
            ("step_s", f"{t:.4g}", "s (predicted roofline)"),
            ("step_s_launch_floor", f"{launch_floor_s(p.parts, card):.4g}",
             "s (roofline + launches)"),
            ("tokens_per_step", str(p.tokens), "tokens"),
            ("flops", f"{p.flops:.4g}", "FLOP"),
            ("bytes_moved", f"{p.bytes_moved:.4g}", "bytes"),
            ("other_bytes", f"{p.other_bytes():.4g}", "bytes outside GEMMs and attention"),
            ("launches", str(p.launches), "kernels"),
            ("other_launches", str(p.other_launches()), "kernels outside GEMMs and attention"),
            ("plan_s", f"{p.plan_s:.3g}", "s (CPU time to plan)"),
        ]  # fmt: skip
        rows += [{**row, "metric": m, "value": v, "unit": u} for m, v, u in values]
    for provider, (best, budget) in (max_contexts or {}).items():
        rows.append({**base, "provider": provider, "workload": "fixed", "context": best,
                     "batch": points[0].spec.batch if points else 1, "dtype": "bf16",
                     "metric": "max_context", "value": best,
                     "unit": f"tokens under {budget:g} GiB (predicted)"})  # fmt: skip
    return rows


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    return path


def plot(csv_path: str | Path, budget_gib: float | None = None) -> Path:
    """Predicted peak memory and roofline tokens/s against context length, one line per
    provider (PNG next to the CSV)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = Path(csv_path)
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["workload"] == "fixed"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, (metric, label) in zip(axes, (("peak_mem", "predicted peak memory (GiB)"),
                                          ("tokens_per_s", "roofline tokens/s bound")),
                                   strict=True):  # fmt: skip
        for provider in dict.fromkeys(r["provider"] for r in rows):
            pts = sorted((int(r["context"]), float(r["value"])) for r in rows
                         if (r["provider"], r["metric"]) == (provider, metric))  # fmt: skip
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=provider)
        if metric == "peak_mem" and budget_gib:
            ax.axhline(budget_gib, color="grey", linestyle="--", label=f"{budget_gib:g} GiB")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    device = rows[0]["device"] if rows else ""
    fig.suptitle(f"{device}: planned training step (fake tensors, no GPU)")
    fig.tight_layout()
    png = csv_path.with_suffix(".png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
