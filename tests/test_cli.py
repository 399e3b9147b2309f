"""End-to-end runs through the command line: a tiny random model, and the real SmolLM2-135M."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from cllora.cli import main
from tests.conftest import tiny_run_overrides


def test_cli_run_tiny_model(tmp_path, capsys):
    code = main(["run", *tiny_run_overrides(tmp_path, run_name="cli")])
    out = capsys.readouterr().out
    assert code == 0
    assert "global_loss" in out and "loss[language]" in out and "run directory" in out
    run = tmp_path / "cli"
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4


def test_cli_reads_a_yaml_file_and_overrides(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("fed:\n  rounds: 5\ntrain:\n  local_steps: 9\n")
    assert main(["config", str(cfg), "fed.rounds=1"]) == 0
    out = capsys.readouterr().out
    assert "rounds: 1" in out and "local_steps: 9" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'"),
        (["model.dtype=fp8"], "model.dtype"),
        (["data.path=/no/such/file.jsonl"], "/no/such/file.jsonl"),
        (["model.name=nobody/nothing"], "never downloads"),
    ],
)
def test_cli_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, args, message):
    code = main(["run", *tiny_run_overrides(tmp_path), *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_malformed_data_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "a?", "answer": "b", "source": "x"}\n{"question": oops}\n')
    code = main(["run", *tiny_run_overrides(tmp_path), f"data.path={data}"])
    assert code == 2
    assert f"{data}:2" in capsys.readouterr().err


def test_console_entry_point_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cllora", "config", "seed=3"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "seed: 3" in proc.stdout


@pytest.mark.slow
def test_cli_run_real_smollm2_short(tmp_path, capsys):
    """The real embedded SmolLM2-135M for a couple of steps at a short context (runs in CI)."""
    args = tiny_run_overrides(
        tmp_path,
        model__name="smollm2-135m",
        data__max_length=96,
        fed__rounds=1,
        train__local_steps=2,
        partition__max_train_per_client=4,
        partition__max_test_per_client=2,
        lora__r=8,
        train__lr=1e-3,
        run_name="smol",
    )
    assert main(["run", *args]) == 0
    rows = list(csv.DictReader((tmp_path / "smol" / "summary.csv").open()))
    first, last = float(rows[0]["global_loss"]), float(rows[-1]["global_loss"])
    assert 0.5 < first < 6.0  # a trained model, far below ln(49152) = 10.8 of a random one
    assert last < first  # two steps at lr 1e-3 on 5 clients already help


def test_cli_plan_is_wired_and_bad_input_is_one_line(capsys):
    assert main(["plan", "--providers", "cllora-4bit", "--contexts", "1024", "--gpu", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "cllora plan: error: unknown GPU 'nope'; use one of h100, h200, a100, l40s, l4, rtx4090"
    ]
