"""docs/findings.md quotes the study's committed effects: recompute every one of them from the
committed per-sample losses (docs/findings/study/<sweep>/cells/*/sample_losses.csv, collected by
examples/study/collect.sh) and check that report/effects.csv holds exactly those rows, that the
study's tables embedded in the markdown are what the files give, and that no template
placeholder is left in it."""

from __future__ import annotations

import csv
import importlib.util
import math
import re
from pathlib import Path

import pytest
import yaml

from cllora.report.effects import write_effects_csv
from cllora.report.html import sweep_effect_rows
from cllora.report.study import analyse_study, embedded_blocks, named_blocks, write_study

DOCS = Path(__file__).resolve().parents[1] / "docs"
FINDINGS = DOCS / "findings.md"
STUDY = DOCS / "findings" / "study"
SWEEPS = sorted(p.parent for p in STUDY.glob("*/sweep.yaml"))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _same(a: str, b: str) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return a == b
    return math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-7) or (math.isnan(x) and math.isnan(y))


STUDIES = sorted(p.parent for p in STUDY.glob("*/study.yaml"))  # declared studies


def test_the_study_is_committed():
    assert {p.name for p in SWEEPS} >= {"confirm", "crn", "length", "quality", "sentences",
                                        "sentences-confirm", "references"}  # fmt: skip
    assert {p.name for p in STUDIES} == {"calibrated", "confirm", "crn"}


def test_the_study_tables_in_findings_are_what_the_files_give():
    fresh = named_blocks(*(analyse_study(p) for p in STUDIES))
    embedded = embedded_blocks(FINDINGS.read_text(encoding="utf-8"))
    assert set(embedded) == set(fresh), "embed every block: bash examples/study/collect.sh"
    for name, text in fresh.items():
        assert embedded[name] == text, f"docs/findings.md block {name!r} is stale: collect.sh"


@pytest.mark.parametrize("root", STUDIES, ids=[p.name for p in STUDIES])
def test_the_committed_study_report_is_recomputed(root, tmp_path):
    study = analyse_study(root)
    fresh = _rows(write_study(study, tmp_path)[1])
    committed = _rows(root / "report" / "study.csv")
    assert [r["id"] for r in fresh] == [r["id"] for r in committed]
    for f, c in zip(fresh, committed, strict=True):
        assert all(_same(f[k], c[k]) for k in c), (f, c)
    controls = embedded_blocks(FINDINGS.read_text(encoding="utf-8"))[f"{root.name}:controls"]
    assert study.instrument_ok == ("The instrument is calibrated" in controls)


def test_findings_hold_no_template_placeholder():
    text = FINDINGS.read_text(encoding="utf-8")
    left = re.findall(r"\{[A-Za-z_]+\}", text)
    assert not left, f"docs/findings.md has unfilled placeholders {left}"
    # the study's summaries (README, measurement.md) describe the crn/confirm design, not the
    # first study's "three sweeps of 12 cells"
    for page in (DOCS.parent / "README.md", DOCS / "measurement.md"):
        assert "three sweeps of" not in page.read_text(encoding="utf-8"), page


@pytest.mark.parametrize("root", SWEEPS, ids=[p.name for p in SWEEPS])
def test_committed_effects_are_recomputed_from_committed_losses(root, tmp_path):
    spec = yaml.safe_load((root / "sweep.yaml").read_text())
    finished = [c for c in spec["cells"] if (root / "cells" / c["name"] / "summary.csv").is_file()]
    assert finished, f"{root} holds no finished cell"
    _same_rows(sweep_effect_rows(root, finished), root / "report" / "effects.csv", tmp_path)


def test_reference_points_are_recomputed_from_committed_losses(tmp_path):
    """local_only and centralized against length.yaml's FedAvg cells (references.py)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "study" / "references.py"
    spec = importlib.util.spec_from_file_location("study_references", path)
    references = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(references)
    rows = references.reference_rows(STUDY)
    assert {r.value for r in rows} == {"local_only", "centralized"}
    assert {r.n_seeds for r in rows} == {4}
    _same_rows(rows, STUDY / "references" / "report" / "vs-fedavg.csv", tmp_path)


def _same_rows(rows, committed_csv: Path, tmp_path: Path) -> None:
    fresh = _rows(write_effects_csv(rows, tmp_path / "effects.csv"))
    committed = _rows(committed_csv)
    assert len(fresh) == len(committed)
    for f, c in zip(fresh, committed, strict=True):
        bad = {k: (f[k], c[k]) for k in c if not _same(f[k], c[k])}
        where = f"{committed_csv}: {c['knob']}={c['value']} {c['model']} {c['scope']}"
        assert not bad, f"{where}: {bad}"
