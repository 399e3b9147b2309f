"""Strategies, ranks, weightings and client failures through the real server loop (tiny Llama)."""

from __future__ import annotations

import json

import pytest
import torch

from cllora.config import ConfigError, load_config
from cllora.fed.algorithms import algorithm_class, algorithm_names
from cllora.fed.algorithms._fedopt import FedOpt
from cllora.fed.algorithms.base import b_part
from cllora.fed.checkpoint import load_checkpoint
from cllora.fed.server import TooFewClientsError, run_experiment
from cllora.model.lora import state_nbytes
from tests.conftest import tiny_run_overrides

SERVER_OPTIMIZERS = [n for n in algorithm_names() if issubclass(algorithm_class(n), FedOpt)]
# the algorithms on the FedAvg family's maths (the others have end-to-end tests of their own)
STRATEGIES = ["fedavg", "fedprox", *SERVER_OPTIMIZERS, "exact", "frozen_a"]


def _run(tmp_path, name, **extra):
    cfg = load_config(None, tiny_run_overrides(tmp_path, run_name=name, **extra))
    return run_experiment(cfg)


def _records(result, kind):
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_from_the_config(tmp_path, strategy):
    result = _run(tmp_path, strategy, fed__strategy=strategy, fed__rounds=2, train__local_steps=2)
    losses = [row["global_loss"] for row in result.rows]
    assert all(torch.isfinite(torch.tensor(losses)))
    rounds = _records(result, "round")
    assert [r["strategy"] for r in rounds] == ["fedavg" if strategy == "fedprox" else strategy] * 2
    assert result.global_state != {}
    if strategy == "frozen_a":  # A never moves
        ckpt = load_checkpoint(result.run_dir / "checkpoint")
        a_keys = [k for k in ckpt.global_state if k.endswith("lora_A")]
        first = _run(
            tmp_path, "frozen_init", fed__strategy="frozen_a", fed__rounds=1, train__local_steps=1
        )
        for k in a_keys:
            torch.testing.assert_close(ckpt.global_state[k], first.global_state[k])
        b_bytes = state_nbytes(b_part(result.global_state))  # only B travels, both ways
        assert b_bytes < state_nbytes(result.global_state)
        for r in rounds:
            assert r["bytes_up"] == r["bytes_down"] == len(r["clients"]) * b_bytes


def test_fedprox_with_mu_zero_equals_fedavg(tmp_path):
    a = _run(tmp_path, "avg", fed__strategy="fedavg")
    b = _run(tmp_path, "prox0", fed__strategy="fedprox", fed__prox_mu=0.0)
    c = _run(tmp_path, "prox", fed__strategy="fedprox", fed__prox_mu=10.0)
    assert a.rows == b.rows
    for k in a.global_state:
        torch.testing.assert_close(a.global_state[k], b.global_state[k], rtol=0, atol=0)
    assert a.rows != c.rows  # the proximal term does act


def test_heterogeneous_ranks(tmp_path):
    avg = _run(tmp_path, "het-avg", lora__client_ranks="[2, 6]", lora__r=4)
    exact = _run(
        tmp_path, "het-exact", lora__client_ranks="[2, 6]", lora__r=4, fed__strategy="exact"
    )
    for result, method in ((avg, "zero-padding"), (exact, "stacked-factors-svd")):
        rounds = _records(result, "round")
        assert all(r["rank_method"] == method for r in rounds)
        a = next(v for k, v in result.global_state.items() if k.endswith("lora_A"))
        assert a.shape[0] == 6  # the global rank is the largest
        ranks = {r["client"]: r["rank"] for r in _records(result, "client_train")}
        assert sorted(set(ranks.values())) == [2, 6]
        adapter = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
        assert adapter["r"] == 6
    assert "discarded_energy_total" in _records(exact, "round")[0]


def test_frozen_a_refuses_mixed_ranks(tmp_path):
    with pytest.raises(ConfigError, match="frozen_a"):
        _run(tmp_path, "bad", fed__strategy="frozen_a", lora__client_ranks="[2, 4]")


@pytest.mark.parametrize("weighting", ["tokens", "quality", "uniform"])
def test_weightings(tmp_path, weighting):
    result = _run(tmp_path, weighting, fed__weighting=weighting, fed__rounds=1)
    stats = {r["client"]: r for r in _records(result, "client_stats")}
    (round1,) = _records(result, "round")
    names = round1["clients"]
    if weighting == "uniform":
        expected = [1 / len(names)] * len(names)
    else:
        values = [stats[n][weighting] for n in names]
        expected = [v / sum(values) for v in values]
    assert round1["weights"] == pytest.approx(expected)
    if weighting == "quality":
        assert all(0 < s["quality"] < 1 for s in stats.values())


def test_failing_clients_do_not_stop_the_round(tmp_path):
    result = _run(tmp_path, "flaky", fed__client_failure_rate=0.4, fed__rounds=3)
    failed = _records(result, "client_failed")
    assert failed and all("SimulatedClientFailure" in f["error"] for f in failed)
    rounds = _records(result, "round")
    assert len(rounds) == 3
    assert sum(r["succeeded"] for r in rounds) == 3 * 5 - len(failed)


def test_too_few_clients_stops_with_a_checkpoint(tmp_path):
    cfg = load_config(
        None,
        tiny_run_overrides(
            tmp_path,
            run_name="stop",
            fed__rounds=4,
            fed__client_failure_rate=0.5,
            fed__min_clients=5,
        ),
    )
    with pytest.raises(TooFewClientsError, match=r"fewer than fed\.min_clients=5") as err:
        run_experiment(cfg)
    ckpt = load_checkpoint(tmp_path / "stop" / "checkpoint")
    stopped_at = int(str(err.value).split(":")[0].removeprefix("round "))
    assert ckpt.round == stopped_at - 1
    assert len(ckpt.rows) == stopped_at  # round 0 .. the last complete round


@pytest.mark.parametrize(
    ("strategy", "moments"), [("fedadam", ["m", "v"]), ("fedamsgrad", ["m", "v", "v_hat"])]
)
def test_server_optimizer_state_is_checkpointed(tmp_path, strategy, moments):
    result = _run(tmp_path, strategy, fed__strategy=strategy)
    ckpt = load_checkpoint(result.run_dir / "checkpoint")
    server = ckpt.server_state["server"]  # the algorithm's state: its server optimizer's
    assert ckpt.round == 2 and server["step"] == 2 and server["strategy"] == strategy
    assert sorted(server) == sorted(["strategy", "step", *moments])
    for moment in moments:
        assert server[moment].keys() == result.global_state.keys()
    for k, v in result.global_state.items():
        torch.testing.assert_close(ckpt.global_state[k], v)
