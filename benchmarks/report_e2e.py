"""Markdown tables (with ratios against a baseline provider) from bench_e2e CSVs.

Usage::

    python benchmarks/report_e2e.py benchmarks/results/e2e-cpu-*.csv            # print
    python benchmarks/report_e2e.py --baseline hf-peft-4bit a.csv b.csv

    from benchmarks.report_e2e import markdown_tables
    text = markdown_tables([path], baseline="hf-peft")

Every (workload, context, batch) cell gets one row per provider with tokens/s, peak memory and
both as a ratio to the baseline provider measured in the same CSV (the same invocation, so the
same machine state as far as a shared machine allows). ``max_context`` rows form a second table.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path


def _load(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        with open(p) as f:
            rows += [{**r, "file": p.name} for r in csv.DictReader(f)]
    return rows


def markdown_tables(paths: list[Path], baseline: str = "hf-peft") -> str:
    """The step table and the max-context table as markdown."""
    rows = _load(paths)
    cells: dict[tuple, dict[str, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["workload"] in ("fixed", "real") and r["metric"] != "max_context":
            key = (r["file"], r["workload"], int(r["context"]), int(r["batch"]))
            cells[key][r["provider"]][r["metric"]] = r["value"]
    out = [
        f"| workload | context | batch | provider | tokens/s | peak GiB | tok/s vs {baseline} "
        f"| memory vs {baseline} |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for key in sorted(cells, key=lambda k: (k[1], k[2], k[0])):
        _, workload, context, batch = key
        base = cells[key].get(baseline, {})
        for provider, m in cells[key].items():
            if m.get("status") != "ok":
                out.append(f"| {workload} | {context} | {batch} | {provider} | "
                           f"{m.get('status')} | | | |")  # fmt: skip
                continue
            tps, mem = float(m["tokens_per_s"]), float(m["peak_mem"])
            rt = rm = ""
            if base.get("status") == "ok":
                rt = f"{tps / float(base['tokens_per_s']):.2f}x"
                rm = f"{mem / float(base['peak_mem']):.2f}x"
            out.append(f"| {workload} | {context} | {batch} | {provider} | {tps:.1f} | "
                       f"{mem:.2f} | {rt} | {rm} |")  # fmt: skip
    maxes = [r for r in rows if r["metric"] == "max_context"]
    if maxes:
        out += ["", "| provider | max context | budget |", "|---|---:|---|"]
        out += [f"| {r['provider']} | {r['value']} | {r['unit']} |" for r in maxes]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="markdown tables from bench_e2e CSVs")
    ap.add_argument("csv", nargs="+", type=Path)
    ap.add_argument("--baseline", default="hf-peft")
    args = ap.parse_args(argv)
    print(markdown_tables(args.csv, args.baseline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
