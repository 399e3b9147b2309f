"""scaffold: the control-variate maths by hand, what travels, and a bit-exact resume."""

from __future__ import annotations

import pytest
import torch

from cllora.config import ConfigError, load_config
from cllora.fed.algorithms import make_algorithm
from cllora.fed.algorithms.base import ClientResult
from cllora.fed.algorithms.scaffold import (
    StepCorrection,
    client_control,
    correction,
    server_control,
    server_model,
)
from cllora.fed.checkpoint import load_checkpoint
from cllora.model.lora import state_nbytes
from tests.conftest import tiny_run_overrides
from tests.fed.algorithms.test_fedsa import round_records, run_and_resume


def _t(*values: float) -> dict[str, torch.Tensor]:
    return {"m.lora_A": torch.tensor([list(values)])}


def test_client_control_option_ii_by_hand():
    c_i, c = _t(1.0, -2.0), _t(0.5, 0.5)
    x, y = _t(1.0, 1.0), _t(0.75, 1.25)
    # (x - y) / (K lr) = [0.25, -0.25] / (2 * 0.125) = [1, -1]
    new = client_control(c_i, c, x, y, steps=2, lr=0.125)
    assert torch.equal(new["m.lora_A"], torch.tensor([[1.5, -3.5]]))  # 1 - .5 + 1, -2 - .5 - 1
    assert torch.equal(correction(c, c_i)["m.lora_A"], torch.tensor([[-0.5, 2.5]]))


def test_server_updates_by_hand():
    c = _t(0.5, 0.5)
    deltas = [_t(0.5, -1.5), _t(1.5, 0.5)]
    # c + (|S| / N) mean(delta) = c + (1/4) * [2, -1]
    assert torch.equal(server_control(c, deltas, 4)["m.lora_A"], torch.tensor([[1.0, 0.25]]))
    x, ys, w = _t(1.0, 0.0), [_t(2.0, 1.0), _t(4.0, -3.0)], [0.75, 0.25]
    assert torch.equal(server_model(x, ys, w, 1.0)["m.lora_A"], torch.tensor([[2.5, 0.0]]))
    # x + 0.5 * (0.75 * [1, 1] + 0.25 * [3, -3]) = [1, 0] + 0.5 * [1.5, 0]
    assert torch.equal(server_model(x, ys, w, 0.5)["m.lora_A"], torch.tensor([[1.75, 0.0]]))


def test_two_rounds_of_control_variates_through_the_algorithm(tmp_path):
    cfg = load_config(None, tiny_run_overrides(tmp_path, fed__strategy="scaffold",
                                               train__local_steps=2, train__lr=0.125))  # fmt: skip
    algo = make_algorithm(cfg)
    algo.num_clients = 4
    x = {"m.lora_A": torch.tensor([[1.0, 1.0]]), "m.lora_B": torch.tensor([[0.0], [0.0]])}
    down = algo.downlink(0, x)
    assert down.nbytes() == 2 * state_nbytes(x)  # x and c
    assert torch.equal(down.extra["c"]["m.lora_A"], torch.zeros(1, 2))
    (rule,) = algo.local_rules(0, down)
    assert isinstance(rule, StepCorrection)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in rule.correction.values())
    y0 = {"m.lora_A": torch.tensor([[0.75, 1.25]]), "m.lora_B": torch.tensor([[0.25], [0.0]])}
    y1 = {"m.lora_A": torch.tensor([[1.25, 1.25]]), "m.lora_B": torch.tensor([[0.0], [0.5]])}
    up0, up1 = algo.uplink(0, down, y0), algo.uplink(1, algo.downlink(1, x), y1)
    assert algo.state == {}  # uplink is pure
    assert up0.nbytes() == 2 * state_nbytes(x)  # y and delta_c
    # c_0+ = 0 - 0 + (x - y0) / (2 * 0.125) = 4 (x - y0)
    assert torch.equal(up0.kept["c"]["m.lora_A"], torch.tensor([[1.0, -1.0]]))
    assert torch.equal(up0.kept["c"]["m.lora_B"], torch.tensor([[-1.0], [0.0]]))
    assert torch.equal(up0.extra["delta_c"]["m.lora_A"], torch.tensor([[1.0, -1.0]]))
    algo.keep(0, up0.kept)  # where each client lives (the pool, or its Flower node)
    algo.keep(1, up1.kept)
    agg = algo.aggregate(x, [ClientResult(0, up0, 0.5), ClientResult(1, up1, 0.5)])
    assert torch.equal(agg.state["m.lora_A"], torch.tensor([[1.0, 1.25]]))  # fedavg(y)
    # c = (1/4) (delta_0 + delta_1) = (1/4) ([1, -1] + [-1, -1]) = [0, -0.5]
    assert torch.equal(algo.state["c"]["m.lora_A"], torch.tensor([[0.0, -0.5]]))
    assert torch.equal(algo.state["c"]["m.lora_B"], torch.tensor([[-0.25], [-0.5]]))
    (rule,) = algo.local_rules(0, algo.downlink(0, agg.state))  # round 2: c - c_0
    assert torch.equal(rule.correction["m.lora_A"], torch.tensor([[-1.0, 0.5]]))
    assert torch.equal(rule.correction["m.lora_B"], torch.tensor([[0.75], [-0.5]]))
    (rule,) = algo.local_rules(3, algo.downlink(3, agg.state))  # never trained: c_3 = 0
    assert torch.equal(rule.correction["m.lora_A"], torch.tensor([[0.0, -0.5]]))


def test_mixed_ranks_are_refused(tmp_path):
    cfg = load_config(None, tiny_run_overrides(tmp_path, fed__strategy="scaffold",
                                               lora__client_ranks="[2, 4]"))  # fmt: skip
    with pytest.raises(ConfigError, match="one rank"):
        make_algorithm(cfg)


def test_scaffold_run_resumes_bit_exactly_and_counts_both_variates(tmp_path):
    a = run_and_resume(tmp_path, fed__strategy="scaffold")
    ckpt = load_checkpoint(a / "checkpoint")
    adapter_bytes = state_nbytes(ckpt.global_state)
    rounds = round_records(a)
    for rec in rounds:
        n = len(rec["clients"])
        assert rec["bytes_down"] == rec["bytes_up"] == n * 2 * adapter_bytes
    c, kept = ckpt.server_state["c"], ckpt.server_state["clients"]
    assert len(kept) == len(rounds[-1]["clients"])
    for k, t in c.items():  # c stays the mean of every client's c_i
        mean = sum(kept[i]["c"][k] for i in kept) / len(kept)
        torch.testing.assert_close(t, mean, rtol=1e-5, atol=1e-5)
    assert any(float(t.abs().max()) > 0 for t in c.values())


def test_a_round_stopped_for_too_few_finishers_leaves_the_kept_state_as_the_round_before(tmp_path):
    """What clients keep is stored when their round is aggregated: a round that stops the run
    (too few finishers) must not leak its finisher's control variate into the previous round's
    checkpoint, which is what a resume starts from."""
    from cllora.config import load_config
    from cllora.fed.checkpoint import load_checkpoint
    from cllora.fed.guards import TooFewClientsError
    from cllora.fed.runner import run_experiment
    from tests.conftest import tiny_run_overrides

    # seed 0: both clients finish round 1; in round 2 one of the two crashes (min_clients=2)
    common = dict(partition__method="iid", partition__num_clients=2, train__threads=1,
                  fed__strategy="scaffold", fed__client_failure_rate=0.5, fed__min_clients=2,
                  seed=0, eval__local=False)  # fmt: skip

    def config(rounds: int, name: str):
        overrides = tiny_run_overrides(tmp_path, **common, fed__rounds=rounds)
        return load_config(None, [*overrides, f"run_name={name}"])

    once = run_experiment(config(1, "a"))
    with pytest.raises(TooFewClientsError):
        run_experiment(config(2, "b"))
    want = load_checkpoint(once.run_dir / "checkpoint").server_state
    got = load_checkpoint(tmp_path / "b" / "checkpoint")
    assert got.round == 1
    assert set(got.server_state["clients"]) == set(want["clients"]) == {"0", "1"}
    for i, kept in want["clients"].items():
        for k, t in kept["c"].items():
            assert torch.equal(got.server_state["clients"][i]["c"][k], t), (i, k)
