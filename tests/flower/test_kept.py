"""What a client keeps between rounds stays on its SuperNode (:mod:`cllora.flower.kept`): stored
by round in the node's ``Context.state``, never sent; a node that lost it refuses in one line; a
run that keeps client state is not resumed on Flower (new node state). That SCAFFOLD on Flower
has the in-process numbers, kept state included, is tests/flower/test_equality.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Message, MessageType, RecordDict

from cllora.config import ConfigError, load_config
from cllora.flower.kept import KEEP, KeptStore
from cllora.flower.pool import FlowerSettings, run_federation
from tests.conftest import tiny_run_overrides
from tests.flower.grid import InProcessGrid


def _kept(r: int) -> dict[str, dict[str, torch.Tensor]]:
    return {"c": {"m.lora_A": torch.full((2, 3), float(r)), "m.lora_B": torch.full((3, 2), -r)}}


def test_the_store_keeps_the_last_rounds_and_refuses_one_it_no_longer_holds():
    store = KeptStore(RecordDict())
    assert store.load(0, "a", "scaffold") is None  # never aggregated: nothing to train from
    for r in range(1, KEEP + 2):
        store.save(r, _kept(r))
    for r in range(2, KEEP + 2):
        got = store.load(r, "a", "scaffold")
        assert got is not None and set(got) == {"c"}
        for k, t in _kept(r)["c"].items():
            assert torch.equal(got["c"][k], t), (r, k)
    with pytest.raises(ConfigError, match=r"after round 1 .*holds rounds: 2, 3, 4"):
        store.load(1, "a", "scaffold")
    assert len(store.state.array_records) == KEEP  # one record per round: the oldest is gone


class _Restarting(InProcessGrid):
    """Node 2 restarts (its state is lost) right after the first round's training."""

    def _answer(self, msg: Message) -> Message:
        reply = super()._answer(msg)
        if msg.metadata.message_type == MessageType.EVALUATE and msg.metadata.group_id == "1":
            self.contexts[2].state = RecordDict()
        return reply


def _scaffold(tmp_path, name: str) -> list[str]:
    overrides = tiny_run_overrides(
        tmp_path, partition__method="iid", partition__num_clients=2, train__threads=1,
        partition__max_train_per_client=8, partition__max_test_per_client=2,
        train__local_steps=2, eval__local=False, fed__strategy="scaffold",
    )  # fmt: skip
    return [*overrides, f"run_name={name}"]


def test_a_node_that_lost_its_clients_state_fails_that_client_in_one_line(tmp_path, task_identity):
    result = run_federation(_Restarting(2), load_config(None, _scaffold(tmp_path, "lost")),
                            FlowerSettings(nodes=2))  # fmt: skip
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    failed = [line for line in lines if '"client_failed"' in line]
    assert len(failed) == 1 and '"round": 2' in failed[0], failed
    assert "no longer holds what the client kept after round 1" in failed[0]
    rounds = [line for line in lines if '"kind": "round"' in line]
    assert '"succeeded": 1' in rounds[-1]  # the other client's update still counts


def test_a_run_that_keeps_client_state_is_not_resumed_on_flower(tmp_path, task_identity):
    cfg = load_config(None, _scaffold(tmp_path, "once"))
    done = run_federation(InProcessGrid(2), cfg, FlowerSettings(nodes=2))
    with pytest.raises(ConfigError, match="keeps each client's state on its SuperNode"):
        run_federation(InProcessGrid(2), None, FlowerSettings(nodes=2, resume=str(done.run_dir)))
