from __future__ import annotations

import logging

import pytest
import torch

from cllora.fed.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A": torch.randn(4, 9, generator=g), "m.lora_B": torch.randn(6, 4, generator=g)}


def test_round_trip_with_server_state_and_extra(tmp_path):
    server = {"strategy": "fedadam", "step": 2, "m": _state(1), "v": _state(2)}
    save_checkpoint(tmp_path, 2, _state(0), server, [{"round": 0, "loss": 1.5}], {"rng": [1, 2]})
    ckpt = load_checkpoint(tmp_path)
    assert (
        ckpt.round == 2
        and ckpt.rows == [{"round": 0, "loss": 1.5}]
        and ckpt.extra == {"rng": [1, 2]}
    )
    assert ckpt.server_state["strategy"] == "fedadam" and ckpt.server_state["step"] == 2
    for k, v in _state(0).items():
        torch.testing.assert_close(ckpt.global_state[k], v, rtol=0, atol=0)
    torch.testing.assert_close(ckpt.server_state["v"]["m.lora_B"], _state(2)["m.lora_B"])


def test_keeps_two_and_falls_back_past_a_truncated_one(tmp_path, caplog):
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, r, _state(r), {}, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-0002", "round-0003"]
    newest = tmp_path / "round-0003" / "adapter.safetensors"
    newest.write_bytes(newest.read_bytes()[:-17])  # truncated on disk
    with caplog.at_level(logging.WARNING, logger="cllora"):
        ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 2
    torch.testing.assert_close(ckpt.global_state["m.lora_A"], _state(2)["m.lora_A"])
    assert "checksum mismatch" in caplog.text
    (tmp_path / "round-0002" / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        load_checkpoint(tmp_path)


def test_unfinished_write_is_ignored(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1), {}, [])
    (tmp_path / ".tmp-round-0002").mkdir()  # a run killed while writing round 2
    assert load_checkpoint(tmp_path).round == 1
