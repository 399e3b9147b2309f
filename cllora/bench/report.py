"""Markdown tables (with ratios against a baseline provider) from ``cllora bench`` CSVs.

Usage::

    python -m cllora.bench.report benchmarks/results/e2e-cpu-*.csv            # print
    python -m cllora.bench.report --baseline hf-peft-4bit a.csv b.csv
    python -m cllora.bench.report --doc docs/gpu.md benchmarks/results/e2e-*.csv  # docs' table
    python benchmarks/report_e2e.py ...                  # the same, from the checkout's script

    from cllora.bench.report import markdown_tables
    text = markdown_tables([path], baseline="hf-peft")

Every (workload, context, batch) cell gets one row per provider (with the commit measured) with
tokens/s, peak memory and
both as a ratio to the baseline provider measured in the same CSV (the same invocation, so the
same machine state as far as a shared machine allows). The default baseline ``auto`` is
``hf-peft-4bit`` for 4-bit providers and ``hf-peft`` for the others. A cell that did not finish
shows its status (``oom``, ``timeout``, or ``error: `` and the one-line error) in place of its
numbers. ``max_context`` rows form a
second table. ``--doc FILE`` writes the tables between the lines
``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->`` of FILE instead of printing them
(``--readme`` is the same option's old name). The published table is :data:`DOC`'s, built from
every ``benchmarks/results/e2e-*.csv`` (tests/bench/test_bench.py checks it).
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from cllora.bench.providers import parse_provider


def _load(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        with open(p) as f:
            rows += [{**r, "file": p.name} for r in csv.DictReader(f)]
    return rows


START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
DOC = Path("docs/gpu.md")  # the page that publishes the tables (relative to the repository)


def _baseline(provider: str, baseline: str) -> str:
    return parse_provider(provider).baseline if baseline == "auto" else baseline


def markdown_tables(paths: list[Path], baseline: str = "auto") -> str:
    """The step table and the max-context table as markdown."""
    rows = _load(paths)
    cells: dict[tuple, dict[str, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    commits = {r["file"]: r.get("commit") or "?" for r in rows}
    for r in rows:
        if r["workload"] in ("fixed", "real") and r["metric"] != "max_context" and r["context"]:
            key = (r["file"], r["device"], r["workload"], int(r["context"]), int(r["batch"]))
            cells[key][r["provider"]][r["metric"]] = r["value"]
    out = [
        "| device | commit | workload | context | batch | provider | tokens/s | peak GiB | tok/s "
        "vs baseline | memory vs baseline |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for key in sorted(cells, key=lambda k: (k[1], k[2], k[3], k[0])):
        file, device, workload, context, batch = key
        lead = f"| {device} | {commits[file]} | {workload} | {context} | {batch} |"
        for provider, m in cells[key].items():
            if m.get("status") != "ok":
                why = m.get("status", "") + (f": {m['error']}" if m.get("error") else "")
                out.append(f"{lead} {provider} | {why.replace('|', '/')} | | | |")
                continue
            tps, mem = float(m["tokens_per_s"]), float(m["peak_mem"])
            name = _baseline(provider, baseline)
            base = cells[key].get(name, {})
            rt = rm = ""
            if base.get("status") == "ok":
                rt = f"{tps / float(base['tokens_per_s']):.2f}x vs {name}"
                rm = f"{mem / float(base['peak_mem']):.2f}x"
            out.append(f"{lead} {provider} | {tps:.1f} | {mem:.2f} | {rt} | {rm} |")
    maxes = [r for r in rows if r["metric"] == "max_context"]
    if maxes:
        out += ["", "| device | commit | provider | max context | budget |",
                "|---|---|---|---:|---|"]  # fmt: skip
        out += [
            f"| {r['device']} | {r['commit']} | {r['provider']} | {r['value']} | {r['unit']} |"
            for r in maxes
        ]
    return "\n".join(out)


def write_tables(doc: Path, tables: str) -> None:
    """Replace the text between the START and END marker lines of ``doc`` by ``tables``."""
    text = doc.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{doc} has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{START}\n{tables}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    """Print the tables of the CSVs given, or write them into ``--doc``'s file."""
    ap = argparse.ArgumentParser(description="markdown tables from bench_e2e CSVs")
    ap.add_argument("csv", nargs="+", type=Path)
    ap.add_argument("--baseline", default="auto")
    ap.add_argument(
        "--doc",
        "--readme",
        dest="doc",
        type=Path,
        default=None,
        help=f"write the tables between the markers of this file (the published one: {DOC})",
    )
    args = ap.parse_args(argv)
    tables = markdown_tables(args.csv, args.baseline)
    if args.doc:
        write_tables(args.doc, tables)
        print(f"updated the benchmark table in {args.doc}")
    else:
        print(tables)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
