"""``cllora sweep`` (grid, resume, long CSV, early errors) and ``cllora report`` (tiny Llama)."""

from __future__ import annotations

import csv
import json
import re

import pytest
import yaml

from cllora.cli import main
from cllora.config import ConfigError, parse_overrides
from cllora.sweep import load_sweep
from tests.conftest import tiny_run_overrides


def _sweep_file(tmp_path, grid: dict, **extra) -> str:
    base = parse_overrides(
        tiny_run_overrides(tmp_path, fed__rounds=1, train__local_steps=1, **extra)
    )
    base["partition"].update(method="iid", num_clients=2)
    base["sweep"] = {"name": "sw", "grid": grid}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(base))
    return str(path)


def test_sweep_runs_every_cell_resumes_and_reports(tmp_path, capsys):
    path = _sweep_file(tmp_path, {"train.lr": [0.001, 0.01]})
    assert main(["sweep", path]) == 0
    root = tmp_path / "sw"
    cells = sorted(p.name for p in (root / "cells").iterdir())
    assert cells == ["train.lr=0.001", "train.lr=0.01"]
    for c, lr in zip(cells, (0.001, 0.01), strict=True):
        assert json.loads((root / "cells" / c / "cell.json").read_text())["values"] == {
            "train.lr": lr
        }
    rows = list(csv.DictReader((root / "results.csv").open()))
    assert {r["cell"] for r in rows} == {"train.lr=0.001", "train.lr=0.01"}
    assert {r["model"] for r in rows} == {"global", "local"}
    assert {r["round"] for r in rows} == {"0", "1"}
    assert "all" in {r["bucket"] for r in rows} and len({r["bucket"] for r in rows}) > 2
    metrics = {c: (root / "cells" / c / "metrics.jsonl").stat().st_mtime_ns for c in cells}

    (root / "cells" / "train.lr=0.01" / "summary.csv").unlink()  # as if killed before the end
    assert main(["sweep", path]) == 0
    new = {c: (root / "cells" / c / "metrics.jsonl").stat().st_mtime_ns for c in cells}
    assert new[cells[0]] == metrics[cells[0]] and new[cells[1]] != metrics[cells[1]]
    assert len(list(csv.DictReader((root / "results.csv").open()))) == len(rows)

    assert main(["report", str(root)]) == 0
    page = (root / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "train.lr=0.01" in page
    assert "2 of 2 cells finished" in page and "paired effects are resolved" in page
    effects = list(csv.DictReader((root / "report" / "effects.csv").open()))
    glob = next(r for r in effects if r["model"] == "global" and r["scope"] == "all")
    assert (glob["knob"], glob["value"], glob["reference"]) == ("train.lr", "0.01", "0.001")
    assert glob["method"] == "bootstrap-samples-1seed" and int(glob["n_samples"]) == 8
    assert float(glob["lo"]) <= float(glob["effect"]) <= float(glob["hi"])
    effects_md = (root / "report" / "effects.md").read_text()
    assert effects_md.startswith("| comparison | effect | 95% interval |")
    assert len(effects_md.splitlines()) == len(effects) + 2
    assert "| train.lr=0.001 |" in (root / "report" / "cells.md").read_text()
    assert (root / "report" / "knob_train_lr.png").stat().st_size > 1000
    cell_page = (root / "cells" / cells[0] / "report" / "report.html").read_text()
    assert cell_page.count("data:image/png;base64,") == 3
    assert "<b>Ran:</b> tiny-llama with LoRA r=4, 2 clients (iid partition)" in cell_page
    assert "<b>Result:</b> The global model's test loss went from" in cell_page
    assert "length skew (TV distance)" in cell_page and ">tv_len<" not in cell_page
    widest = max(row.count("<th>") for row in re.findall(r"<tr>(.*?)</tr>", cell_page))
    assert widest <= 10  # wide tables are turned: a client per column, a field per row
    assert "change since round 0" in page and ">global_change<" not in page
    for png in ("rounds.png", "train_loss.png", "buckets.png"):
        assert (root / "cells" / cells[0] / "report" / png).stat().st_size > 1000


def test_a_sweep_key_that_does_not_exist_is_an_error(tmp_path, capsys):
    path = _sweep_file(tmp_path, {"partition.alpah_len": [1.0]})
    with pytest.raises(ConfigError, match=r"sweep\.grid key 'partition\.alpah_len'"):
        load_sweep(path)
    assert main(["sweep", path]) == 2
    assert "is not a config key" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


def test_a_bad_cell_stops_the_sweep_before_any_training(tmp_path, capsys):
    path = _sweep_file(tmp_path, {"partition.num_clients": [2, 5000]})
    assert main(["sweep", path]) == 2
    err = capsys.readouterr().err
    assert "sweep cell partition.num_clients=5000" in err and "5000 clients" in err
    assert not (tmp_path / "sw" / "cells").exists()
    bad_value = _sweep_file(tmp_path, {"quality.mean_rate": [0.5, 2.0]})
    with pytest.raises(ConfigError, match=r"quality.mean_rate=2.0: .*\[0, 1\]"):
        load_sweep(bad_value)


def test_run_refuses_a_sweep_file_and_report_a_missing_dir(tmp_path, capsys):
    path = _sweep_file(tmp_path, {"seed": [0]})
    assert main(["run", path]) == 2
    assert "cllora sweep" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "neither a run" in capsys.readouterr().err
