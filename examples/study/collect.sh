#!/usr/bin/env bash
# Copy the study's result files into docs/findings/study and make their reports there:
#   bash examples/study/collect.sh [RUNS_DIR [SWEEP...]]
# RUNS_DIR defaults to runs (where the study sweeps write); SWEEP names which of calibrated, confirm and crn
# (the study of docs/findings.md and its pilot) and the earlier length, quality, sentences,
# sentences-confirm, references to collect (default: all; a report takes seconds to minutes).
# For each of them that has finished cells: the sweep's sweep.yaml, study.yaml (a study's frozen
# declaration) and results.csv, and per finished cell the files the statistics and the report read
# (cell.json, config.yaml, metrics.jsonl, sample_losses.csv, summary.csv, clients.csv,
# timing.json; no checkpoints, no adapters); then `cllora report` on the copy, which writes
# report/effects.{csv,md,png} (and a study's report/study.{md,csv}) beside them; last, the study
# tables embedded in docs/findings.md (<!-- study:SWEEP:NAME --> blocks) are refilled from the
# copies of every study sweep (those with a study.yaml: calibrated, confirm, crn).
# tests/test_findings.py recomputes every committed effect from the committed per-sample losses
# and fails when the embedded tables differ from what the files give.
set -euo pipefail
RUNS="${1:-runs}"
shift || true
if [ $# -gt 0 ]; then SWEEPS=("$@"); else SWEEPS=(calibrated confirm crn length quality sentences sentences-confirm references); fi
cd "$(dirname "$0")/../.."
DEST=docs/findings/study
FILES=(cell.json config.yaml metrics.jsonl sample_losses.csv summary.csv clients.csv timing.json)
for s in "${SWEEPS[@]}"; do
  src="$RUNS/study/$s"
  [ -f "$src/results.csv" ] || continue  # no finished cell yet
  rm -rf "${DEST:?}/$s"
  mkdir -p "$DEST/$s/cells"
  cp "$src/sweep.yaml" "$src/results.csv" "$DEST/$s/"
  if [ -f "$src/study.yaml" ]; then cp "$src/study.yaml" "$DEST/$s/"; fi
  for cell in "$src"/cells/*/; do
    [ -f "$cell/summary.csv" ] || continue  # unfinished: it is redone when the sweep resumes
    name="$(basename "$cell")"
    mkdir -p "$DEST/$s/cells/$name"
    for f in "${FILES[@]}"; do cp "$cell/$f" "$DEST/$s/cells/$name/"; done
  done
  cllora report "$DEST/$s"
done
# the reference points against length.yaml's FedAvg cells (examples/study/references.py)
if [ -f "$DEST/references/results.csv" ] && [ -f "$DEST/length/results.csv" ]; then
  python examples/study/references.py "$DEST"
fi
# the studies' tables in docs/findings.md, from the committed copies
python - <<'EOF'
from pathlib import Path
from cllora.report.study import analyse_study, fill_blocks, named_blocks
doc = Path("docs/findings.md")
studies = [analyse_study(p.parent) for p in sorted(Path("docs/findings/study").glob("*/study.yaml"))]
doc.write_text(fill_blocks(doc.read_text(), named_blocks(*studies)))
EOF
