"""Sweep cells: distinct names for distinct values, cell records, refused foreign directories,
``sweep.name`` kept inside ``out_dir``, grid mistakes refused before any cell runs."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cllora.cli import main
from cllora.config import ConfigError, parse_overrides, save_config
from cllora.sweep import (
    CLAIMS,
    MAX_NAME,
    cell_dir,
    cell_name,
    cell_state,
    check_cell_dirs,
    is_done,
    load_sweep,
    read_record,
    run_sweep,
    value_text,
)
from tests.conftest import tiny_run_overrides


def _spec_file(tmp_path, grid: dict, name="sw", **extra) -> str:
    base = parse_overrides(
        tiny_run_overrides(tmp_path, fed__rounds=1, train__local_steps=1, **extra)
    )
    base["partition"].update(method="iid", num_clients=2)
    base["sweep"] = {"name": name, "grid": grid}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(base))
    return str(path)


# --- names ------------------------------------------------------------------------------------


def test_a_name_is_the_readable_values_when_they_spell_the_values_exactly():
    assert cell_name({"partition.alpha_len": 0.1, "seed": 0}) == "partition.alpha_len=0.1__seed=0"
    assert cell_name({"train.lr": 1e-05}) == "train.lr=1.0e-05"
    assert cell_name({"partition.alpha_len": None}) == "partition.alpha_len=null"
    assert cell_name({"eval.local": True}) == "eval.local=True"
    assert cell_name({"model.name": "tiny-llama"}) == "model.name=tiny-llama"
    for value in (1e-05, 2.5e20, None, True, 7, "all-linear"):
        assert yaml.safe_load(value_text(value)) == value  # a key=value override of the cell


def test_distinct_values_always_give_distinct_stable_names():
    pairs = [
        ({"data.path": "a/b.jsonl"}, {"data.path": "a_b.jsonl"}),
        ({"model.name": "1"}, {"model.name": 1}),
        ({"x": 1}, {"x": 1.0}),
        ({"x": "None"}, {"x": None}),
        ({"x": "a__b=c", "b": "d"}, {"x": "a", "b": "c__b=d"}),
        ({"x": "v" * 300 + "1"}, {"x": "v" * 300 + "2"}),
        ({"x": "m-deadbeef"}, {"x": "m"}),
        ({"x": ["q_proj", "v_proj"]}, {"x": "q_proj,v_proj"}),
        ({"x": "a..b"}, {"x": "a._b"}),
    ]
    for a, b in pairs:
        na, nb = cell_name(a), cell_name(b)
        assert na != nb, (a, b)
        assert na == cell_name(dict(a)) and nb == cell_name(dict(b))  # the same on every re-run
        for n in (na, nb):
            assert len(n) <= MAX_NAME and "/" not in n and ".." not in n and " " not in n
    assert cell_name({"data.path": "a_b.jsonl"}) == "data.path=a_b.jsonl"  # readable, no hash
    assert cell_name({"data.path": "a/b.jsonl"}).startswith("data.path=a_b.jsonl-")


# --- what load_sweep refuses ------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"seed": [0, 0]}, r"sweep\.grid\.seed lists 0 twice"),
        ({"train.lr": ["1e-3", 0.001]}, r"'1e-3' and 0\.001 are the same value \(0\.001\)"),
        ({"out_dir": ["x", "y"]}, r"sweep\.grid key 'out_dir': the sweep sets"),
        ({"run_name": ["x"]}, r"sweep\.grid key 'run_name': the sweep sets"),
        ({"model": [{"name": "tiny-llama"}]}, r"clash with the 'model' column"),
        ({"fed.rounds.real": [1]}, r"sweep\.grid key 'fed\.rounds\.real' is not a config key"),
        ({"partition.alpah_len": [1.0]}, r"not a config key \(did you mean 'alpha_len'\?\)"),
        ({"partition": [{"num_clients": 2}], "partition.num_clients": [3]}, r"overlap"),
    ],
)
def test_grid_mistakes_are_refused_before_any_cell(tmp_path, grid, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(_spec_file(tmp_path, grid))


@pytest.mark.parametrize("name", ["/tmp/elsewhere", "../../escape", "a/../../b", ".", "link/x"])
def test_a_sweep_name_must_stay_inside_out_dir(tmp_path, capsys, name):
    (tmp_path / "outside").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "link").symlink_to(tmp_path / "outside")
    path = _spec_file(tmp_path, {"seed": [0]}, out_dir=str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match=rf"sweep\.name '{re.escape(name)}' must be a dir"):
        load_sweep(path, [f"sweep.name={name}"])
    assert main(["sweep", path, f"sweep.name={name}"]) == 2
    assert "set out_dir to write elsewhere" in capsys.readouterr().err
    assert load_sweep(path, ["sweep.name=nested/ok"]).root == tmp_path / "runs" / "nested" / "ok"
    with pytest.raises(ConfigError, match="not of the form"):
        load_sweep(path, ["sweep.name"])
    with pytest.raises(ConfigError, match=r"unknown sweep setting\(s\) \['nmae'\]"):
        load_sweep(path, ["sweep.nmae=x"])


# --- cell directories (faked: config.yaml + summary.csv, no training) -------------------------


def _fake_run(cell, finished=True, cfg=None):
    run_dir = cell_dir(cell)
    run_dir.mkdir(parents=True)
    save_config(cfg or cell.cfg, run_dir / "config.yaml")
    if finished:
        (run_dir / "summary.csv").write_text("round,global_loss\n0,1.0\n")
        rounds = (cfg or cell.cfg).fed.rounds
        record = {"kind": "global_eval", "round": rounds, "client": "__global__", "loss": 1.0}
        (run_dir / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    return run_dir


def test_a_cell_directory_that_is_not_the_cells_is_refused(tmp_path):
    sweep = load_sweep(_spec_file(tmp_path, {"seed": [0, 1]}))
    first, second = sweep.cells
    assert cell_state(first) == "new"

    run_dir = _fake_run(first)  # an older sweep's finished cell (no cell.json): adopted
    metrics = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text("")  # summary.csv, but not the last round's evals
    assert cell_state(first) == "unfinished" and read_record(run_dir) is None
    (run_dir / "metrics.jsonl").write_text(metrics)
    assert not is_done(first) and cell_state(first) == "done" and is_done(first)
    assert read_record(run_dir) == {"seed": 0}

    (run_dir / "cell.json").write_text(json.dumps({"name": first.name, "values": {"seed": 5}}))
    with pytest.raises(ConfigError, match=r'seed=0 records the cell values \{"seed": 5\}, this '):
        cell_state(first)
    (run_dir / "cell.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"cell\.json is not a sweep cell record"):
        cell_state(first)

    other = load_sweep(_spec_file(tmp_path, {"seed": [0, 1]}), ["fed.rounds=2"]).cells[1]
    _fake_run(other, cfg=second.cfg)  # finished with fed.rounds=1; the sweep now says 2
    with pytest.raises(ConfigError, match=r"another config \(fed\.rounds: 1 there, 2 here\)"):
        cell_state(other)


def test_an_unfinished_directory_is_removed_only_when_it_is_the_cells(tmp_path):
    sweep = load_sweep(_spec_file(tmp_path, {"seed": [0, 1]}))
    first, second = sweep.cells
    _fake_run(first, finished=False, cfg=second.cfg)  # seed=1's run in seed=0's directory
    with pytest.raises(ConfigError, match=r'unfinished run of the values \{"seed": 1\}'):
        run_sweep(sweep, check=False)
    assert (cell_dir(first) / "config.yaml").is_file()  # left alone
    (cell_dir(first) / "config.yaml").unlink()
    (cell_dir(first) / "mine.txt").write_text("not a run")
    with pytest.raises(ConfigError, match=r"neither cell\.json nor config\.yaml"):
        cell_state(first)
    (cell_dir(first) / "mine.txt").unlink()
    (cell_dir(first) / "run.log").write_text("killed before config.yaml\n")
    assert cell_state(first) == "unfinished"

    os.symlink(tmp_path, cell_dir(second))  # a link where a cell directory would be
    with pytest.raises(ConfigError, match="is a link or a file"):
        cell_state(second)


# --- end to end (two tiny cells) --------------------------------------------------------------


def _qa_file(path, topic: str, n: int = 30) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"question": f"What is {topic} number {i}?", "answer": f"{topic} {i} " * 3})
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")


def test_colliding_values_run_as_two_cells_and_an_edited_record_is_refused(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    _qa_file(tmp_path / "a" / "b.jsonl", "apples")
    _qa_file(tmp_path / "a_b.jsonl", "zebra crossings")
    path = _spec_file(
        tmp_path, {"data.path": ["a/b.jsonl", "a_b.jsonl"]}, eval__local="false",
        partition__max_train_per_client=4, partition__max_test_per_client=2,
    )  # fmt: skip
    assert main(["sweep", path]) == 0
    cells = tmp_path / "sw" / "cells"
    names = sorted(p.name for p in cells.iterdir())
    assert len(names) == 2 and names[0] == "data.path=a_b.jsonl"
    assert names[1].startswith("data.path=a_b.jsonl-")
    for name in names:
        saved = yaml.safe_load((cells / name / "config.yaml").read_text())["data"]["path"]
        assert json.loads((cells / name / "cell.json").read_text())["values"] == {
            "data.path": saved
        }
    rows = list(csv.DictReader((tmp_path / "sw" / "results.csv").open()))
    loss = {
        (r["cell"], r["data.path"]): r["loss"]
        for r in rows
        if r["round"] == "1" and r["test"] == "__global__" and r["bucket"] == "all"
    }
    assert set(loss) == {(names[0], "a_b.jsonl"), (names[1], "a/b.jsonl")}
    assert len(set(loss.values())) == 2  # each cell's own numbers

    record = cells / names[0] / "cell.json"
    record.write_text(json.dumps({"name": names[0], "values": {"data.path": "a/b.jsonl"}}))
    assert main(["sweep", path]) == 2
    err = capsys.readouterr().err
    assert f'{cells / names[0]} records the cell values {{"data.path": "a/b.jsonl"}}' in err
    assert 'this sweep\'s cell is {"data.path": "a_b.jsonl"}' in err

    record.unlink()  # as an older cllora left it: adopted, not run again
    mtime = (cells / names[0] / "metrics.jsonl").stat().st_mtime_ns
    assert main(["sweep", path]) == 0
    assert (cells / names[0] / "metrics.jsonl").stat().st_mtime_ns == mtime
    assert json.loads(record.read_text())["values"] == {"data.path": "a_b.jsonl"}


def test_a_cell_claimed_by_another_process_is_passed_over_until_that_process_dies(tmp_path):
    sweep = load_sweep(_spec_file(tmp_path, {"seed": [0, 1]}, eval__local="false"))
    first, second = sweep.cells
    _fake_run(first, finished=False)  # the other process's run, in progress
    claim_file = sweep.root / CLAIMS / first.name
    claim_file.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
         str(claim_file)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        # mid-start, the other process's directory holds what a foreign one would: not read
        (cell_dir(first) / "config.yaml").rename(cell_dir(first) / "config.yaml.tmp")
        with pytest.raises(ConfigError, match=r"neither cell\.json nor config\.yaml"):
            cell_state(first)
        assert check_cell_dirs(sweep) == {first.name: "running", second.name: "new"}
        (cell_dir(first) / "config.yaml.tmp").rename(cell_dir(first) / "config.yaml")
        results = run_sweep(sweep, check=False)
        assert (cell_dir(first) / "config.yaml").is_file()  # the running cell is left alone
        assert not is_done(first) and is_done(second)
        assert {r["cell"] for r in csv.DictReader(results.open())} == {second.name}
    finally:
        holder.kill()  # killed: its claim goes with it
        holder.wait()
    results = run_sweep(sweep, check=False)
    assert is_done(first)
    assert {r["cell"] for r in csv.DictReader(results.open())} == {first.name, second.name}


def test_a_grid_may_supply_what_the_base_file_lacks(tmp_path):
    """The base file is not validated alone: partition.method=dirichlet with its only
    parameter in the grid builds; a cell that stays invalid is refused, named."""
    path = _spec_file(tmp_path, {"partition.alpha_len": [0.1, 100.0]})
    spec = yaml.safe_load(Path(path).read_text())
    spec["partition"]["method"] = "dirichlet"
    Path(path).write_text(yaml.safe_dump(spec))
    sweep = load_sweep(path)
    assert [c.cfg.partition.alpha_len for c in sweep.cells] == [0.1, 100.0]
    spec["sweep"]["grid"] = {"seed": [0, 1]}
    Path(path).write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"sweep cell seed=0: partition\.method=dirichlet needs"):
        load_sweep(path)
