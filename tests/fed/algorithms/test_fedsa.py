"""fedsa (FedSA-LoRA): A averaged, B kept per client and never counted; resume bit-exact.

Also holds :func:`run_and_resume`, the resume check the other algorithm tests share."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cllora.config import ConfigError, load_config
from cllora.fed.algorithms import make_algorithm
from cllora.fed.algorithms.base import ClientResult, a_part, b_part
from cllora.fed.algorithms.fedsa import fedsa_aggregate
from cllora.fed.checkpoint import load_checkpoint
from cllora.fed.runner import run_experiment
from cllora.fed.strategy import fedavg
from cllora.model.adapter import read_adapter
from cllora.model.lora import state_nbytes
from tests.conftest import metrics_without_times, tiny_run_overrides


def round_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "round"]


def run_and_resume(tmp_path: Path, **overrides) -> Path:
    """Run 3 rounds into ``a``; re-run round 3 of a copy from its round-2 checkpoint; assert
    both end identically (summary.csv bytes, adapter tensors, metrics); return ``a``."""
    overrides = {"fed__rounds": 3, "eval__local": False, "train__local_steps": 2,
                 "partition__max_test_per_client": 2, **overrides}  # fmt: skip
    cfg = load_config(None, tiny_run_overrides(tmp_path, run_name="a", **overrides))
    a = run_experiment(cfg).run_dir
    b = tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoint" / "round-0003")
    shutil.rmtree(b / "adapter")
    (b / "summary.csv").unlink()
    run_experiment(None, resume=b)
    assert (a / "summary.csv").read_bytes() == (b / "summary.csv").read_bytes()
    _, state_a = read_adapter(a / "adapter")
    _, state_b = read_adapter(b / "adapter")
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k
    assert metrics_without_times(a) == metrics_without_times(b)
    return a


def _algo(tmp_path, **overrides):
    return make_algorithm(load_config(None, tiny_run_overrides(tmp_path, **overrides)))


def _adapter(a: float, b: float) -> dict[str, torch.Tensor]:
    """Two modules, rank 2, in 3, out 4, constant entries."""
    return {
        "m0.lora_A": torch.full((2, 3), a), "m0.lora_B": torch.full((4, 2), b),
        "m1.lora_A": torch.full((2, 3), -a), "m1.lora_B": torch.full((4, 2), 2 * b),
    }  # fmt: skip


def test_fedsa_aggregate_by_hand():
    A, B = fedsa_aggregate(
        [a_part(_adapter(1.0, 0)), a_part(_adapter(3.0, 0))],
        [b_part(_adapter(0, 2.0)), b_part(_adapter(0, 6.0))],
        [0.25, 0.75],
    )
    assert torch.equal(A["m0.lora_A"], torch.full((2, 3), 2.5))  # 0.25 * 1 + 0.75 * 3
    assert torch.equal(A["m1.lora_A"], torch.full((2, 3), -2.5))
    assert torch.equal(B["m0.lora_B"], torch.full((4, 2), 5.0))  # 0.25 * 2 + 0.75 * 6
    assert torch.equal(B["m1.lora_B"], torch.full((4, 2), 10.0))


def test_b_stays_with_its_client_and_is_never_counted(tmp_path):
    algo = _algo(tmp_path, fed__strategy="fedsa")
    init = _adapter(0.5, 0.0)  # B = 0, as LoRA's init
    a_bytes = state_nbytes(a_part(init))
    assert a_bytes == 2 * (2 * 3) * 4  # two fp32 A of (2, 3)
    down0 = algo.downlink(0, init)
    assert down0.nbytes() == a_bytes
    assert down0.adapter == init
    trained = {0: _adapter(1.0, 2.0), 1: _adapter(3.0, 6.0)}
    ups = {i: algo.uplink(i, down0, t) for i, t in trained.items()}
    assert algo.state == {}  # uplink is pure
    for i, up in ups.items():
        assert up.nbytes() == a_bytes
        assert up.adapter.keys() == a_part(init).keys()
        assert up.kept["B"] == b_part(trained[i])
    for i, up in ups.items():  # where each client lives (the in-process pool)
        algo.keep(i, up.kept)
    agg = algo.aggregate(init, [ClientResult(0, ups[0], 0.25), ClientResult(1, ups[1], 0.75)])
    assert torch.equal(agg.state["m0.lora_A"], torch.full((2, 3), 2.5))
    assert torch.equal(agg.state["m0.lora_B"], torch.full((4, 2), 5.0))  # the measured mean B
    for i in (0, 1):  # round 2: the global A, the client's own trained B
        down = algo.downlink(i, agg.state)
        assert down.nbytes() == a_bytes
        for k, t in down.adapter.items():
            expected = trained[i][k] if k.endswith("lora_B") else agg.state[k]
            assert torch.equal(t, expected), (i, k)
    fresh = algo.downlink(2, agg.state)  # never trained: the initial B
    for k in b_part(init):
        assert torch.equal(fresh.adapter[k], init[k])


def test_mixed_ranks_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="one rank"):
        _algo(tmp_path, fed__strategy="fedsa", lora__client_ranks="[2, 4]")


def test_fedsa_run_resumes_bit_exactly_and_counts_only_a(tmp_path):
    a = run_and_resume(tmp_path, fed__strategy="fedsa")
    ckpt = load_checkpoint(a / "checkpoint")
    a_bytes = state_nbytes(a_part(ckpt.global_state))
    rounds = round_records(a)
    for rec in rounds:
        n = len(rec["clients"])
        assert rec["bytes_down"] == rec["bytes_up"] == n * a_bytes
    kept = ckpt.server_state["clients"]
    assert sorted(kept) == [str(i) for i in range(len(rounds[-1]["clients"]))]
    bs = [kept[str(i)]["B"] for i in range(len(kept))]
    assert not torch.equal(bs[0]["model.layers.0.self_attn.q_proj.lora_B"],
                           bs[1]["model.layers.0.self_attn.q_proj.lora_B"])  # fmt: skip
    mean_b = fedavg(bs, rounds[-1]["weights"])  # every client trained round 3
    for k, t in mean_b.items():
        torch.testing.assert_close(ckpt.global_state[k], t)
