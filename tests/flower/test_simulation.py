"""Flower's simulation engine against ``cllora run``: same config and seed, same metrics.

Tolerance: every number of every record (losses, per-sample loss sums, weights, bytes) within
1e-5 relative (the only admitted difference is the order of float sums when the nodes' test
losses are combined); the record kinds, their order and every other field exactly equal."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr")
pytest.importorskip("ray")

from cllora.config import load_config
from cllora.fed.runner import run_experiment
from cllora.flower.pool import FlowerSettings
from cllora.flower.simulation import simulate
from tests.conftest import tiny_run_overrides
from tests.flower.conftest import REL, assert_close


def _records(run_dir) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("seconds", None)  # wall-clock times differ
        out.append(record)
    return out


def test_simulation_matches_cllora_run(tmp_path):
    overrides = tiny_run_overrides(
        tmp_path, partition__method="iid", partition__num_clients=2, train__threads=1,
        fed__weighting="tokens",
    )  # fmt: skip
    ref = run_experiment(load_config(None, [*overrides, "run_name=ref"]))
    sim = simulate(load_config(None, [*overrides, "run_name=sim"]))
    a, b = _records(ref.run_dir), _records(sim.run_dir)
    assert [r["kind"] for r in a] == [r["kind"] for r in b]
    for k, (x, y) in enumerate(zip(a, b, strict=True)):
        assert_close(x, y, f"record {k} ({x['kind']})")
    assert (sim.run_dir / "summary.csv").read_text().splitlines()[0] == (
        (ref.run_dir / "summary.csv").read_text().splitlines()[0]
    )
    assert_close(ref.rows, sim.rows, "rows")
    for name in ("clients.csv", "sample_losses.csv"):
        assert (sim.run_dir / name).is_file(), name
    weights = "adapter/adapter_model.safetensors"
    mine, theirs = load_file(sim.run_dir / weights), load_file(ref.run_dir / weights)
    assert set(mine) == set(theirs)
    for k, t in mine.items():
        torch.testing.assert_close(t, theirs[k], rtol=REL, atol=1e-7)
    rounds = [r for r in b if r["kind"] == "round"]
    assert [r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rounds] == [True, True]


def test_secagg_in_the_simulation_engine_is_the_run_to_its_quantization(tmp_path):
    """SecAgg+ (Flower's SecAggPlusWorkflow and secaggplus_mod) under Ray: the server sees only
    the masked sum, and the run is ``cllora run``'s up to Flower's quantization of the updates."""
    overrides = tiny_run_overrides(
        tmp_path, partition__method="iid", partition__num_clients=2, train__threads=1,
        fed__weighting="tokens", fed__rounds=1,
    )  # fmt: skip
    ref = run_experiment(load_config(None, [*overrides, "run_name=ref"]))
    sec = simulate(load_config(None, [*overrides, "run_name=sec"]), FlowerSettings(secagg=True))
    a, b = _records(ref.run_dir), _records(sec.run_dir)
    assert [r["kind"] for r in a] == [r["kind"] for r in b]
    (mine,) = [r for r in b if r["kind"] == "round"]
    (theirs,) = [r for r in a if r["kind"] == "round"]
    assert mine["secagg"] and (mine["secagg_num_shares"], mine["succeeded"]) == (2, 2)
    assert mine["weights"] == theirs["weights"]
    assert mine["global_loss"] == pytest.approx(theirs["global_loss"], rel=1e-4)
    step = 2 * 8.0 / 2**22  # Flower's quantization step at the default ranges
    for k, t in ref.global_state.items():  # two stochastic roundings, summed
        torch.testing.assert_close(sec.global_state[k], t, rtol=0, atol=5 * step)
    assert json.loads((sec.run_dir / "flower.json").read_text())["settings"]["secagg"]
