"""Markdown tables from ``cllora bench`` CSVs, a script of the checkout: :mod:`cllora.bench.report`.

Usage::

    python benchmarks/report_e2e.py benchmarks/results/e2e-cpu-*.csv            # print
    python benchmarks/report_e2e.py --baseline hf-peft-4bit a.csv b.csv
    python benchmarks/report_e2e.py --doc docs/gpu.md benchmarks/results/e2e-*.csv  # docs' table
"""

from cllora.bench.report import main

if __name__ == "__main__":
    raise SystemExit(main())
