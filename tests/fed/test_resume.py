from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cllora.cli import main
from cllora.config import ConfigError, load_config, save_config
from cllora.fed.checkpoint import save_checkpoint
from cllora.fed.resume import config_diff, open_resume, truncate_metrics
from cllora.fed.server import run_experiment
from cllora.model.adapter import read_adapter
from tests.conftest import metrics_without_times, tiny_run_overrides

ROOT = Path(__file__).resolve().parents[2]


def test_config_diff_names_the_keys():
    a = load_config(None, ["fed.rounds=3", "progress=false"])
    b = load_config(None, ["fed.rounds=5", "train.lr=0.1", "progress=true", "run_name=x"])
    assert config_diff(a, b) == ["fed.rounds", "train.lr"]
    assert config_diff(a, a) == []


def test_truncate_metrics_keeps_complete_rounds(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"kind": "client_stats"},
        {"kind": "global_eval", "round": 0},
        {"kind": "round", "round": 1},
        {"kind": "client_train", "round": 2},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"kind": "cli')
    assert truncate_metrics(path, 1) == 3
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:3]


def test_open_resume_refuses_another_config(tmp_path):
    cfg = load_config(None, ["fed.rounds=4"])
    save_config(cfg, tmp_path / "config.yaml")
    (tmp_path / "metrics.jsonl").write_text('{"kind": "schema"}\n')
    save_checkpoint(
        tmp_path / "checkpoint", 2, {"m.lora_A": torch.ones(2, 3)}, {}, [], extra={"rng": []}
    )
    saved, ckpt = open_resume(tmp_path)
    assert saved == cfg and ckpt.round == 2
    assert (
        open_resume(tmp_path, load_config(None, ["fed.rounds=4", "progress=false"]))[1].round == 2
    )
    with pytest.raises(ConfigError, match=r"differing keys: fed\.rounds, seed"):
        open_resume(tmp_path, load_config(None, ["fed.rounds=5", "seed=1"]))
    with pytest.raises(ConfigError, match="not a cllora run directory"):
        open_resume(tmp_path / "checkpoint")


def _kill_mid_round(argv: list[str], metrics: Path, round_idx: int) -> None:
    """Start ``cllora run`` in a process; SIGKILL it once a client of ``round_idx`` trained."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cllora", "run", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if any('"client_train"' in x and f'"round": {round_idx},' in x for x in lines):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "fedamsgrad"])
def test_a_run_killed_mid_round_resumes_to_the_uninterrupted_result(tmp_path, strategy):
    """SIGKILL after a client of round 2 trained (round 2 half done), then ``--resume``: the
    metrics, summary and adapter equal those of a run that was never interrupted. fedadam and
    fedamsgrad (with its running maximum v_hat): the server optimizer's moments travel through
    the checkpoint; client sampling and simulated failures draw from RNGs whose states travel
    too."""
    common = dict(fed__rounds=3, fed__strategy=strategy, fed__sample_fraction=0.6,
                  fed__client_failure_rate=0.2, train__threads=1)  # fmt: skip
    ref = run_experiment(load_config(None, tiny_run_overrides(tmp_path, run_name="ref", **common)))
    run_dir = tmp_path / "killed"
    argv = tiny_run_overrides(tmp_path, run_name="killed", **common)
    _kill_mid_round(argv, run_dir / "metrics.jsonl", 2)
    assert not (run_dir / "summary.csv").exists()  # it really died before the end
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert metrics_without_times(run_dir) == metrics_without_times(ref.run_dir)
    assert (run_dir / "summary.csv").read_text() == (ref.run_dir / "summary.csv").read_text()
    (_, got), (_, want) = read_adapter(run_dir / "adapter"), read_adapter(ref.run_dir / "adapter")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_resume_with_another_config_names_the_keys(tmp_path, capsys):
    over = tiny_run_overrides(tmp_path, run_name="r", fed__rounds=1)
    assert main(["run", *over]) == 0
    run_dir = tmp_path / "r"
    assert main(["run", "--resume", str(run_dir), "train.lr=0.5", "seed=9"]) == 2
    assert "differing keys: seed, train.lr" in capsys.readouterr().err
    # a finished run resumes to itself: nothing trains again, same summary
    before = (run_dir / "summary.csv").read_text()
    assert main(["run", "--resume", str(run_dir), "progress=false"]) == 0
    assert (run_dir / "summary.csv").read_text() == before


def test_resume_falls_back_past_a_truncated_checkpoint(tmp_path, caplog):
    over = tiny_run_overrides(tmp_path, run_name="t", fed__rounds=2)
    ref_cfg = load_config(None, tiny_run_overrides(tmp_path, run_name="u", fed__rounds=2))
    ref = run_experiment(ref_cfg)
    assert main(["run", *over]) == 0
    run_dir = tmp_path / "t"
    newest = run_dir / "checkpoint" / "round-0002" / "adapter.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # damaged on disk
    (run_dir / "summary.csv").unlink()
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert "round-0002" in caplog.text  # the warning names the damaged checkpoint
    assert (run_dir / "summary.csv").read_text() == (ref.run_dir / "summary.csv").read_text()
