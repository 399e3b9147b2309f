"""``centralized``: one trainer on every client's pooled training data for the sampled clients'
total steps; its adapter is the new global; nothing federated travels; resume bit-exact."""

from __future__ import annotations

import re
import shutil
from types import SimpleNamespace

import pytest
import torch

from cllora.config import ConfigError, load_config
from cllora.fed.algorithms import make_algorithm
from cllora.fed.algorithms.base import ClientResult
from cllora.fed.algorithms.centralized import POOLED, Centralized
from cllora.fed.checkpoint import load_checkpoint
from cllora.fed.pool import LocalPool
from cllora.fed.runner import run_experiment
from cllora.model.adapter import read_adapter
from tests.conftest import metrics_without_times, records_of, tiny_run_overrides


def _cfg(tmp_path, **extra):
    return load_config(
        None, tiny_run_overrides(tmp_path, run_name="c", fed__strategy="centralized", **extra)
    )


def _adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A": torch.randn(4, 6, generator=g), "m.lora_B": torch.randn(5, 4, generator=g)}


def test_one_trainee_on_the_pool_for_the_sampled_clients_steps(tmp_path):
    algo = make_algorithm(_cfg(tmp_path, train__local_steps=3))
    assert isinstance(algo, Centralized)
    (t,) = algo.trainees([0, 2], ["c0", "c1", "c2"])
    assert (t.index, t.name, t.steps) == (-1, POOLED, 2 * 3)
    assert t.sources == (0, 1, 2)  # every client's data, not only the chosen clients'
    clients = [SimpleNamespace(name=f"c{i}", train=[f"s{i}{j}" for j in range(i + 1)])
               for i in range(3)]  # fmt: skip
    pool = LocalPool.__new__(LocalPool)  # only its data: no model needed to find the samples
    pool.data = SimpleNamespace(clients=clients)
    assert pool.data_of(t) == ["s00", "s10", "s11", "s20", "s21", "s22"]
    assert algo.client_rank(-1) == algo.global_rank() == 4


def test_the_aggregate_of_the_one_uplink_is_that_adapter_and_nothing_travels(tmp_path):
    algo = make_algorithm(_cfg(tmp_path))
    start, trained = _adapter(0), _adapter(1)
    down = algo.downlink(-1, start)
    assert down.adapter is start and down.nbytes() == 0
    up = algo.uplink(-1, down, trained)
    assert up.nbytes() == 0 and algo.state == {}
    agg = algo.aggregate(start, [ClientResult(-1, up, 1.0)])
    assert agg.state.keys() == trained.keys()
    assert all(torch.equal(agg.state[k], trained[k]) for k in trained)
    assert algo.state == {}  # no server state


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"lora__client_ranks": "[2,4]"}, "lora.client_ranks"),
        ({"fed__min_clients": 2}, "fed.min_clients"),
        ({"fed__client_failure_rate": 0.1}, "fed.client_failure_rate"),
    ],
)
def test_refuses_what_one_pooled_trainer_cannot_run(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        make_algorithm(_cfg(tmp_path, **extra))


def test_a_run_trains_the_pool_counts_no_bytes_and_resumes_bit_exact(tmp_path):
    a = run_experiment(_cfg(tmp_path, fed__rounds=3, fed__sample_fraction=0.5)).run_dir
    rounds = records_of(a, "round")
    assert [(r["bytes_down"], r["bytes_up"]) for r in rounds] == [(0, 0)] * 3
    assert [r["weights"] for r in rounds] == [[1.0]] * 3
    pooled = sum(c["samples"] for c in records_of(a, "client_stats"))
    trains = records_of(a, "client_train")
    assert [t["client"] for t in trains] == [POOLED] * 3
    for t, r in zip(trains, rounds, strict=True):  # the sampled clients' steps, on the pool
        assert len(t["losses"]) == len(r["clients"]) * 3 and t["samples"] == pooled
    assert records_of(a, "local_eval") == []
    losses = [row["global_loss"] for row in load_checkpoint(a / "checkpoint").rows]
    assert len(set(losses)) == len(losses)  # the global model moves every round
    b = tmp_path / "resumed"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoint" / "round-0003")
    shutil.rmtree(b / "adapter")
    (b / "summary.csv").unlink()
    run_experiment(None, resume=b)
    assert (b / "summary.csv").read_bytes() == (a / "summary.csv").read_bytes()
    assert metrics_without_times(a) == metrics_without_times(b)
    sa, sb = read_adapter(a / "adapter")[1], read_adapter(b / "adapter")[1]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
