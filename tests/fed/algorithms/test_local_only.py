"""``local_only``: each client continues from its own adapter, the global adapter never moves,
nothing travels; its client state is checkpointed (resume bit-exact) and exported."""

from __future__ import annotations

import shutil

import pytest
import torch

from cllora.config import ConfigError, load_config
from cllora.fed.algorithms import make_algorithm
from cllora.fed.algorithms.base import ClientResult
from cllora.fed.algorithms.local_only import LocalOnly
from cllora.fed.checkpoint import load_checkpoint
from cllora.fed.runner import run_experiment
from cllora.model.adapter import read_adapter
from tests.conftest import metrics_without_times, records_of, tiny_run_overrides


def _cfg(tmp_path, **extra):
    return load_config(
        None, tiny_run_overrides(tmp_path, run_name="lo", fed__strategy="local_only", **extra)
    )


def _adapter(rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "m.lora_A": torch.randn(rank, 6, generator=g),
        "m.lora_B": torch.randn(5, rank, generator=g),
    }


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_client_continues_from_its_own_adapter_and_the_global_stays(tmp_path):
    algo = make_algorithm(_cfg(tmp_path))
    assert isinstance(algo, LocalOnly)
    initial = _adapter(4, 0)
    trained = {0: _adapter(4, 1), 1: _adapter(4, 2)}
    ups = {}
    for i in (0, 1):  # round 1: clients 0 and 1 start from the initial adapter
        down = algo.downlink(i, initial)
        assert _equal(down.adapter, initial) and down.nbytes() == 0
        ups[i] = algo.uplink(i, down, trained[i])
        assert ups[i].adapter == {} and ups[i].nbytes() == 0 and algo.state == {}  # pure
    for i in (0, 1):  # where each client lives (the in-process pool)
        algo.keep(i, ups[i].kept)
    agg = algo.aggregate(initial, [ClientResult(i, ups[i], 0.5) for i in (0, 1)])
    assert _equal(agg.state, initial)
    assert agg.info["clients_with_own_adapter"] == 2
    # round 2: each trained client's downlink is its own round-1 adapter; client 2 never trained
    assert _equal(algo.downlink(0, agg.state).adapter, trained[0])
    assert _equal(algo.downlink(1, agg.state).adapter, trained[1])
    assert _equal(algo.downlink(2, agg.state).adapter, initial)
    # round 2 trains only client 1: client 0 keeps its round-1 adapter
    again = _adapter(4, 3)
    up = algo.uplink(1, algo.downlink(1, agg.state), again)
    algo.keep(1, up.kept)
    algo.aggregate(agg.state, [ClientResult(1, up, 1.0)])
    assert _equal(algo.downlink(0, initial).adapter, trained[0])
    assert _equal(algo.downlink(1, initial).adapter, again)


def test_heterogeneous_ranks_start_at_the_clients_rank(tmp_path):
    algo = make_algorithm(_cfg(tmp_path, lora__client_ranks="[2,4]"))
    initial = _adapter(4, 0)
    assert algo.downlink(0, initial).adapter["m.lora_A"].shape == (2, 6)
    assert _equal(algo.downlink(1, initial).adapter, initial)


def test_refuses_a_run_without_local_evaluation(tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.local=true"):
        make_algorithm(_cfg(tmp_path, eval__local="false"))


def test_a_run_counts_no_bytes_keeps_the_global_and_resumes_bit_exact(tmp_path):
    a = run_experiment(_cfg(tmp_path, fed__rounds=3, fed__sample_fraction=0.5)).run_dir
    rounds = records_of(a, "round")
    assert [(r["bytes_down"], r["bytes_up"]) for r in rounds] == [(0, 0)] * 3
    # the global model is the initial adapter: every round's global loss is round 0's
    ckpt = load_checkpoint(a / "checkpoint")
    assert len({row["global_loss"] for row in ckpt.rows}) == 1
    assert all(row["local_own"] == row["local_own"] for row in ckpt.rows[1:])  # measured
    _, exported = read_adapter(a / "adapter")
    assert _equal(exported, ckpt.global_state)
    # each client's own adapter is checkpointed and exported under adapter/clients/<name>
    names = ckpt.server_state["names"]
    trained = {r["client"] for r in records_of(a, "client_train")}
    assert {names[i] for i in ckpt.server_state["clients"]} == trained
    for i, state in ckpt.server_state["clients"].items():
        _, own = read_adapter(a / "adapter" / "clients" / names[i])
        assert _equal(own, state) and not _equal(own, ckpt.global_state)
    # resume: re-run round 3 from the round-2 checkpoint
    b = tmp_path / "resumed"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoint" / "round-0003")
    shutil.rmtree(b / "adapter")
    (b / "summary.csv").unlink()
    run_experiment(None, resume=b)
    assert (b / "summary.csv").read_bytes() == (a / "summary.csv").read_bytes()
    assert metrics_without_times(a) == metrics_without_times(b)
    for sub in ["", *(f"clients/{names[i]}" for i in ckpt.server_state["clients"])]:
        assert _equal(read_adapter(a / "adapter" / sub)[1], read_adapter(b / "adapter" / sub)[1])
