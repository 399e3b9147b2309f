"""Every algorithm that runs on Flower gives ``cllora run``'s numbers on Flower (issue 28).

For each algorithm whose class says it runs on Flower (``runs_on_flower()``; the list is computed,
so a new algorithm is covered without editing this file), the same tiny config and seed run twice:
in-process (:func:`cllora.fed.runner.run_experiment`) and through cllora's ServerApp loop
(:func:`cllora.flower.pool.run_federation`) over an in-process Flower grid
(:class:`tests.flower.grid.InProcessGrid`: the real ClientApp answers each message, each node with
its own ``Context``; no Ray, no SuperLink). Compared: every metrics.jsonl record (kinds in order,
every field; ``seconds`` dropped), the summary rows, the final global adapter (in memory and as
``adapter/adapter_model.safetensors``), and each round's ``bytes_down`` / ``bytes_up`` exactly.

Tolerance: floats within ``REL`` = 1e-5 relative, as tests/flower/test_simulation.py (the only
admitted difference is the order of float sums when the nodes' test losses are combined);
everything else equal.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr")


from cllora.config import load_config
from cllora.fed.algorithms import algorithm_class, algorithm_names
from cllora.fed.runner import run_experiment
from cllora.flower.pool import FlowerSettings, run_federation
from tests.conftest import metrics_without_times, tiny_run_overrides
from tests.flower.conftest import REL, assert_close
from tests.flower.grid import InProcessGrid

NODES = 2

# What each algorithm needs beyond the common tiny config to do something FedAvg does not (an
# algorithm missing here runs the common config). Each is accepted by the algorithm's
# check_config (cllora/fed/algorithms/<name>.py) and by check_flower_config.
SETTINGS: dict[str, dict] = {
    # seeded client failures (seed 1: client-01 crashes halfway through round 1, client-00
    # through round 2) and local evaluation on: the failure draws, the client_failed records,
    # a round aggregated from one uplink, and the local_eval records
    "fedavg": {"fed__client_failure_rate": 0.5, "seed": 1, "eval__local": True},
    # a proximal term large enough to move the local steps away from FedAvg's
    "fedprox": {"fed__prox_mu": 0.1},
    # server momentum (default 0.9) at server_lr 1: round 2 takes round 1's step again; one of
    # the two clients sampled a round: the sampling draw
    "fedavgm": {"fed__server_lr": 1.0, "fed__sample_fraction": 0.5},
    # the adaptive server optimizers: a server step of 1e-2 per element, the size of the
    # clients' own updates (3 AdamW steps at 5e-3), so the step shows in every number after it
    "fedadam": {"fed__server_lr": 0.01},
    "fedyogi": {"fed__server_lr": 0.01},
    "fedadagrad": {"fed__server_lr": 0.01},
    # mixed client ranks: downlinks truncated to rank 2, the stacked factors' truncated SVD back
    # to the global rank 4 (the sum has rank up to 6: energy is discarded and recorded)
    "exact": {"lora__client_ranks": "[2,4]"},
    # mixed client ranks: truncated downlinks, norm-weighted zero-padded averaging; tokens
    # weighting (the weights the norms multiply)
    "hetlora": {"lora__client_ranks": "[2,4]", "fed__weighting": "tokens"},
    # frozen_a refuses mixed ranks (one shared A): the common config; only B travels
    # scaffold: the control variates every client keeps on its own node (Flower: the node's
    # Context.state) steer rounds 2 and 3; one client a round, so a client trains from what it
    # kept rounds ago
    "scaffold": {"fed__rounds": 3, "fed__sample_fraction": 0.5},
}

FLOWER = [n for n in algorithm_names() if algorithm_class(n).runs_on_flower()]


def _overrides(tmp_path, name: str) -> list[str]:
    extra = {
        "partition__method": "iid",
        "partition__num_clients": NODES,
        "partition__max_train_per_client": 8,
        "partition__max_test_per_client": 2,
        "train__local_steps": 2,
        "train__threads": 1,
        "eval__local": False,
        "fed__strategy": name,
        **SETTINGS.get(name, {}),
    }
    return tiny_run_overrides(tmp_path, **extra)


def _exercised(name: str, records: list[dict]) -> None:
    """The settings of ``SETTINGS[name]`` did what its comment says (not a silent no-op)."""
    settings, kinds = SETTINGS.get(name, {}), [r["kind"] for r in records]
    rounds = [r for r in records if r["kind"] == "round"]
    assert ("client_failed" in kinds) == bool(settings.get("fed__client_failure_rate"))
    assert ("local_eval" in kinds) == bool(settings.get("eval__local"))
    if settings.get("fed__sample_fraction", 1) < 1:
        assert {len(r["clients"]) for r in rounds} == {1}
    if "lora__client_ranks" in settings:
        trained = {r["rank"] for r in records if r["kind"] == "client_train"}
        assert trained == {2, 4}, trained


@pytest.mark.parametrize("name", FLOWER)
def test_flower_run_has_the_in_process_numbers(tmp_path, task_identity, name):
    overrides = _overrides(tmp_path, name)
    ref = run_experiment(load_config(None, [*overrides, "run_name=ref"]))
    flower = run_federation(InProcessGrid(NODES), load_config(None, [*overrides, "run_name=fl"]),
                            FlowerSettings(nodes=NODES))  # fmt: skip
    a, b = metrics_without_times(ref.run_dir), metrics_without_times(flower.run_dir)
    assert [r["kind"] for r in a] == [r["kind"] for r in b]
    _exercised(name, a)
    for k, (x, y) in enumerate(zip(a, b, strict=True)):
        assert_close(x, y, f"record {k} ({x['kind']})")
    rounds = [(r["round"], r["bytes_down"], r["bytes_up"]) for r in a if r["kind"] == "round"]
    assert rounds == [(r["round"], r["bytes_down"], r["bytes_up"])
                      for r in b if r["kind"] == "round"]  # fmt: skip
    assert [r for _, *r in rounds if min(r) <= 0] == []  # something travelled each round
    assert_close(ref.rows, flower.rows, "rows")
    assert set(flower.global_state) == set(ref.global_state)
    for k, t in ref.global_state.items():
        torch.testing.assert_close(flower.global_state[k], t, rtol=REL, atol=1e-7, msg=k)
    weights = "adapter/adapter_model.safetensors"
    mine, theirs = load_file(flower.run_dir / weights), load_file(ref.run_dir / weights)
    assert set(mine) == set(theirs)
    for k, t in theirs.items():
        torch.testing.assert_close(mine[k], t, rtol=REL, atol=1e-7, msg=k)
