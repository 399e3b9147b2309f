"""The study's reference points against FedAvg, paired on the same held-out samples.

Usage::

    python examples/study/references.py [STUDY_DIR]      # default: docs/findings/study

``references.yaml``'s cells (``fed.strategy`` local_only and centralized, seeds 0-3) are
``length.yaml``'s reference cells (``alpha_len`` 100) with another strategy, so with
``length.yaml``'s ``alpha_len=100`` cells as the FedAvg point they pair seed by seed: the same
partition, the same steps, the same 100 held-out samples. This writes the effects of the two
strategies against FedAvg (:func:`cllora.report.effects.sweep_effects`, t intervals over the
seeds) to ``STUDY_DIR/references/report/vs-fedavg.{csv,md}``; ``tests/test_findings.py``
recomputes them from the committed per-sample losses. The local_only cells' "global model" is
the initial adapter (nothing is aggregated), so their global rows measure what training gained;
centralized has no local models.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from cllora.report.effects import EffectRow, sweep_effects, write_effects_csv
from cllora.report.html import effects_table, length_buckets, markdown_table

FEDAVG = {"partition.alpha_len": 100.0}  # length.yaml's cells that references.yaml re-runs
KEY = "fed.strategy"


def _finished(root: Path) -> list[tuple[dict, Path]]:
    spec = yaml.safe_load((root / "sweep.yaml").read_text())
    dirs = [(c["values"], root / "cells" / c["name"]) for c in spec["cells"]]
    return [(v, d) for v, d in dirs if (d / "summary.csv").is_file()]


def reference_cells(study: Path) -> list[tuple[dict, Path]]:
    """(values, run directory): FedAvg from length/, the others from references/."""
    fedavg = [({"seed": v["seed"], KEY: "fedavg"}, d) for v, d in _finished(study / "length")
              if all(v.get(k) == x for k, x in FEDAVG.items())]  # fmt: skip
    return fedavg + _finished(study / "references")


def reference_rows(study: Path) -> list[EffectRow]:
    """Every strategy of references/ against FedAvg."""
    cells = reference_cells(study)
    edges, measure = length_buckets(cells[0][1])
    return sweep_effects(cells, reference={KEY: "fedavg"}, edges=edges, measure=measure)


def main(argv: list[str]) -> int:
    study = Path(argv[0] if argv else "docs/findings/study")
    rows = reference_rows(study)
    out = study / "references" / "report"
    out.mkdir(parents=True, exist_ok=True)
    write_effects_csv(rows, out / "vs-fedavg.csv")
    (out / "vs-fedavg.md").write_text(markdown_table(effects_table(rows)), encoding="utf-8")
    print(f"{len(rows)} effects against FedAvg: {out / 'vs-fedavg.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
