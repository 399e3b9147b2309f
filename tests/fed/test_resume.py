from __future__ import annotations

import json

import pytest
import torch

from cllora.config import ConfigError, load_config, save_config
from cllora.fed.checkpoint import save_checkpoint
from cllora.fed.resume import config_diff, open_resume, truncate_metrics


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
    save_checkpoint(tmp_path / "checkpoint", 2, {"m.lora_A": torch.ones(2, 3)}, {}, [])
    saved, ckpt = open_resume(tmp_path)
    assert saved == cfg and ckpt.round == 2
    assert (
        open_resume(tmp_path, load_config(None, ["fed.rounds=4", "progress=false"]))[1].round == 2
    )
    with pytest.raises(ConfigError, match=r"differing keys: fed\.rounds, seed"):
        open_resume(tmp_path, load_config(None, ["fed.rounds=5", "seed=1"]))
    with pytest.raises(ConfigError, match="not a cllora run directory"):
        open_resume(tmp_path / "checkpoint")
