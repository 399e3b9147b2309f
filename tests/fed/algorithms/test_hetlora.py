"""hetlora: norm-weighted zero-padded aggregation and truncation by hand, bytes, resume."""

from __future__ import annotations

import math

import pytest
import torch

from cllora.config import load_config
from cllora.fed.algorithms import make_algorithm
from cllora.fed.algorithms.base import ClientResult, Uplink
from cllora.fed.algorithms.hetlora import norm_weights, truncate_to_rank, update_norm
from cllora.fed.checkpoint import load_checkpoint
from tests.conftest import tiny_run_overrides
from tests.fed.algorithms.test_fedsa import round_records, run_and_resume


def _adapter(r: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "m0.lora_A": torch.randn(r, 5, generator=g), "m0.lora_B": torch.randn(3, r, generator=g),
        "m1.lora_A": torch.randn(r, 4, generator=g), "m1.lora_B": torch.randn(6, r, generator=g),
    }  # fmt: skip


def test_update_norm_against_the_dense_products():
    s = _adapter(3, 0)
    dense = (2.0 * s["m0.lora_B"] @ s["m0.lora_A"], 2.0 * s["m1.lora_B"] @ s["m1.lora_A"])
    expected = math.sqrt(sum(float(d.double().pow(2).sum()) for d in dense))
    assert math.isclose(update_norm(s, 2.0), expected, rel_tol=1e-6)


def test_norm_weights_by_hand():
    assert norm_weights([0.5, 0.5], [1.0, 3.0]) == [0.25, 0.75]
    assert norm_weights([0.2, 0.8], [3.0, 0.5]) == pytest.approx([0.6, 0.4])  # .6 / 1, .4 / 1
    assert norm_weights([0.3, 0.7], [0.0, 0.0]) == [0.3, 0.7]


def test_truncation_keeps_the_leading_components():
    g = _adapter(4, 1)
    small = truncate_to_rank(g, 2, global_scaling=8 / 4, client_scaling=8 / 2)
    for m in ("m0", "m1"):
        A, B = g[m + ".lora_A"], g[m + ".lora_B"]
        torch.testing.assert_close(small[m + ".lora_A"], A[:2] * math.sqrt(0.5))
        torch.testing.assert_close(small[m + ".lora_B"], B[:, :2] * math.sqrt(0.5))
        lead = 2.0 * B[:, :2] @ A[:2]  # the global's first two components, as the client reads
        torch.testing.assert_close(4.0 * small[m + ".lora_B"] @ small[m + ".lora_A"], lead)


def test_aggregate_against_a_direct_computation(tmp_path):
    overrides = {"fed__strategy": "hetlora", "lora__r": 4, "lora__alpha": 8}
    cfg = load_config(None, tiny_run_overrides(tmp_path, lora__client_ranks="[2, 4]", **overrides))
    algo = make_algorithm(cfg)
    g = _adapter(4, 2)
    down = algo.downlink(0, g)  # rank 2
    assert down.nbytes() == 4 * 2 * ((5 + 3) + (4 + 6))
    assert algo.downlink(1, g).adapter is g
    clients = {0: _adapter(2, 3), 1: _adapter(4, 4)}
    w = {0: 0.4, 1: 0.6}
    scal = {0: 8 / 2, 1: 8 / 4}
    agg = algo.aggregate(g, [ClientResult(i, Uplink(c), w[i]) for i, c in clients.items()])
    norms = {}
    for i, c in clients.items():
        sq = sum(float((scal[i] * c[m + ".lora_B"] @ c[m + ".lora_A"]).double().pow(2).sum())
                 for m in ("m0", "m1"))  # fmt: skip
        norms[i] = math.sqrt(sq)
    total = sum(w[i] * norms[i] for i in clients)
    p = {i: w[i] * norms[i] / total for i in clients}
    assert agg.info["norm_weights"] == pytest.approx([p[0], p[1]], rel=1e-6)
    for m in ("m0", "m1"):
        f0 = math.sqrt(scal[0] / 2.0)  # sqrt(s_k / s), s = 8 / 4
        a0 = torch.cat([clients[0][m + ".lora_A"] * f0, torch.zeros(2, g[m + ".lora_A"].shape[1])])
        b0 = torch.cat([clients[0][m + ".lora_B"] * f0, torch.zeros(g[m + ".lora_B"].shape[0], 2)],
                       dim=1)  # fmt: skip
        A = p[0] * a0 + p[1] * clients[1][m + ".lora_A"]
        B = p[0] * b0 + p[1] * clients[1][m + ".lora_B"]
        torch.testing.assert_close(agg.state[m + ".lora_A"], A)
        torch.testing.assert_close(agg.state[m + ".lora_B"], B)
    assert agg.info["strategy"] == "hetlora"


def test_hetlora_run_resumes_bit_exactly_and_counts_client_ranks(tmp_path):
    ranks = [2, 4]
    a = run_and_resume(tmp_path, fed__strategy="hetlora", lora__r=4, lora__client_ranks="[2, 4]")
    ckpt = load_checkpoint(a / "checkpoint")
    mods = sorted(k[: -len(".lora_A")] for k in ckpt.global_state if k.endswith(".lora_A"))
    per_rank = sum(
        ckpt.global_state[m + ".lora_A"].shape[1] + ckpt.global_state[m + ".lora_B"].shape[0]
        for m in mods
    )  # (in + out) summed over modules: one rank component, in fp32 elements
    for rec in round_records(a):
        expected = sum(4 * ranks[i % 2] * per_rank for i in range(len(rec["clients"])))
        assert rec["bytes_down"] == rec["bytes_up"] == expected
        assert math.isclose(sum(rec["norm_weights"]), 1.0, rel_tol=1e-9)
        assert rec["norm_weights"] != rec["weights"]
    assert ckpt.global_state[mods[0] + ".lora_A"].shape[0] == 4
