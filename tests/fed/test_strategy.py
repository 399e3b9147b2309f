"""The aggregation maths of strategy.py: identities, exactness, ranks, scalings, errors, purity.

The server optimizers own their rules: tests/fed/algorithms/test_fedopt.py tests them."""

from __future__ import annotations

import copy

import pytest
import torch

from cllora.fed.lora_algebra import lowrank_svd
from cllora.fed.strategy import (
    check_inputs,
    client_weights,
    exact_aggregate,
    fedavg,
    fedavg_factors,
    frozen_a_aggregate,
    pseudo_gradient,
    to_client_rank,
)

AGGREGATIONS = {"fedavg": fedavg_factors, "exact": exact_aggregate, "frozen_a": frozen_a_aggregate}
SHAPES = {"layers.0.q_proj": (37, 23), "layers.0.v_proj": (11, 23)}  # module: (out, in)


def _adapter(seed: int, r: int, shapes=None, zero_b: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m, (out, n_in) in (shapes or SHAPES).items():
        state[f"{m}.lora_A"] = torch.randn(r, n_in, generator=g)
        b = torch.randn(out, r, generator=g)
        state[f"{m}.lora_B"] = torch.zeros_like(b) if zero_b else b
    return state


def _clone(state):
    return {k: v.clone() for k, v in state.items()}


def _prod(state, m, scaling=1.0):
    return scaling * state[f"{m}.lora_B"].double() @ state[f"{m}.lora_A"].double()  # (out, in)


def _dense_sum(states, coefs, m):
    return sum(c * _prod(s, m) for s, c in zip(states, coefs, strict=True))


def _assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- step zero ---------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", AGGREGATIONS)
def test_step_zero_with_clients_equal_to_global_returns_global(strategy):
    g = _adapter(0, 5)
    w = client_weights([5, 1, 9], "samples")
    res = AGGREGATIONS[strategy](g, [_clone(g), _clone(g), g], w)
    if strategy == "exact":  # re-factored: same update s B A, factors in the SVD's gauge
        for m in SHAPES:
            torch.testing.assert_close(_prod(res.state, m), _prod(g, m), atol=1e-5, rtol=1e-5)
        assert res.info["discarded_energy_total"] < 1e-10
        return
    for k in g:  # averages round in fp32
        torch.testing.assert_close(res.state[k], g[k])


def test_the_pseudo_gradient_of_unmoved_clients_is_exactly_zero():
    g = _adapter(0, 5)
    w = client_weights([5, 1, 9], "samples")
    clients = [_clone(g), _clone(g), g]
    x, d = pseudo_gradient(g, clients, w, check_inputs("any", g, clients, w))
    _assert_states_equal(x, g)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in d.values())


@pytest.mark.parametrize("strategy", AGGREGATIONS)
def test_step_zero_from_lora_init_returns_the_init_factors(strategy):
    g = _adapter(1, 3, zero_b=True)  # LoRA's init: B = 0, A random
    res = AGGREGATIONS[strategy](g, [_clone(g), _clone(g)], [0.3, 0.7])
    for k in g:  # exact too: zero components keep the global A rows (so they stay trainable)
        torch.testing.assert_close(res.state[k], g[k], atol=0, rtol=0)


# --- exact -------------------------------------------------------------------------------------


def test_exact_is_exact_when_the_sum_fits_the_global_rank():
    clients = [_adapter(2, 2), _adapter(3, 2)]
    w, scalings, g_scale = [0.35, 0.65], [2.0, 2.0], 1.0  # alpha 4: r 2 -> 2.0, global r 4 -> 1.0
    res = exact_aggregate(_adapter(4, 4), clients, w, scalings, g_scale)
    assert res.info["rank_method"] == "stacked-factors-svd"
    for m in SHAPES:
        want = _dense_sum(clients, [wk * sk for wk, sk in zip(w, scalings, strict=True)], m)
        got = _prod(res.state, m, g_scale)
        assert res.state[f"{m}.lora_A"].shape == (4, SHAPES[m][1])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert res.info["discarded_energy"][m] < 1e-10


def test_exact_is_the_best_rank_r_approximation_and_beats_fedavg():
    clients = [_adapter(s, 3) for s in (5, 6, 7)]
    w = client_weights([10, 30, 20], "samples")
    g = _adapter(8, 3)
    res = exact_aggregate(g, clients, w)
    avg = fedavg_factors(g, clients, w)
    disc = total = 0.0
    for m in SHAPES:
        dense = _dense_sum(clients, w, m)
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        got = _prod(res.state, m)
        torch.testing.assert_close(got, best, atol=1e-4, rtol=1e-4)
        energy = S**2
        want = float(energy[3:].sum() / energy.sum())
        assert res.info["discarded_energy"][m] == pytest.approx(want, rel=1e-4)
        assert want > 0.05  # the sum really has rank > 3
        disc, total = disc + float(energy[3:].sum()), total + float(energy.sum())
        err_exact = torch.linalg.norm(got - dense)
        err_avg = torch.linalg.norm(_prod(avg.state, m) - dense)
        assert err_avg > 1.2 * err_exact
    assert res.info["discarded_energy_total"] == pytest.approx(disc / total, rel=1e-4)


def test_exact_with_mixed_ranks_and_scalings():
    clients = [_adapter(9, 2), _adapter(10, 3), _adapter(11, 5)]
    scalings = [8 / 2, 8 / 3, 8 / 5]  # alpha 8
    w = client_weights([1, 2, 1], "tokens")
    res = exact_aggregate(_adapter(12, 6), clients, w, scalings, 8 / 6)
    for m in SHAPES:
        dense = _dense_sum(clients, [a * b for a, b in zip(w, scalings, strict=True)], m)
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        best = U[:, :6] @ torch.diag(S[:6]) @ Vh[:6]
        torch.testing.assert_close(_prod(res.state, m, 8 / 6), best, atol=1e-4, rtol=1e-4)
        assert res.state[f"{m}.lora_B"].shape == (SHAPES[m][0], 6)


def test_exact_orthonormal_a_split():
    clients = [_adapter(13, 3), _adapter(14, 3)]
    res = exact_aggregate(_adapter(15, 4), clients, [0.5, 0.5], factor_split="b")
    for m in SHAPES:
        A = res.state[f"{m}.lora_A"]
        torch.testing.assert_close(A @ A.T, torch.eye(4), atol=1e-5, rtol=0)
        dense = _dense_sum(clients, [0.5, 0.5], m)
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        best = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
        torch.testing.assert_close(_prod(res.state, m), best, atol=1e-4, rtol=1e-4)


def test_lowrank_svd_matches_the_dense_svd():
    g = torch.Generator().manual_seed(16)
    Bs = [torch.randn(37, r, generator=g) for r in (3, 5)]
    As = [torch.randn(r, 23, generator=g) for r in (3, 5)]
    U, S, Vh = lowrank_svd(Bs, As, [0.25, 0.75])
    dense = 0.25 * Bs[0] @ As[0] + 0.75 * Bs[1] @ As[1]
    torch.testing.assert_close(S, torch.linalg.svdvals(dense)[:8], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, dense, atol=1e-4, rtol=1e-5)


# --- frozen A ----------------------------------------------------------------------------------


def test_frozen_a_averages_b_keeps_a_and_is_exact():
    g = _adapter(30, 3)
    clients = []
    for s in (31, 32, 33):
        c = _adapter(s, 3)
        clients.append({k: g[k].clone() if k.endswith("lora_A") else v for k, v in c.items()})
    w = client_weights([2.0, 1.0, 1.0], "quality")
    res = frozen_a_aggregate(g, clients, w)
    avg = fedavg(clients, w)
    for m in SHAPES:
        assert torch.equal(res.state[f"{m}.lora_A"], g[f"{m}.lora_A"])
        torch.testing.assert_close(res.state[f"{m}.lora_B"], avg[f"{m}.lora_B"])
        torch.testing.assert_close(_prod(res.state, m), _dense_sum(clients, w, m))
    assert res.info["rank_method"] == "frozen-a"


def test_frozen_a_refuses_clients_whose_a_moved():
    g = _adapter(34, 3)
    moved = _clone(g)
    moved["layers.0.v_proj.lora_A"] = moved["layers.0.v_proj.lora_A"] + 1e-3
    with pytest.raises(ValueError, match=r"client 1's layers.0.v_proj.lora_A differs"):
        frozen_a_aggregate(g, [_clone(g), moved], [0.5, 0.5])
    frozen_a_aggregate(g, [_clone(g), moved], [0.5, 0.5], atol=1e-2)
    with pytest.raises(ValueError, match="shared A"):
        frozen_a_aggregate(g, [_adapter(35, 2)], [1.0])
    with pytest.raises(ValueError, match="atol must be >= 0"):
        frozen_a_aggregate(g, [_clone(g)], [1.0], atol=-1.0)


# --- mixed ranks -------------------------------------------------------------------------------


def test_fedavg_zero_pads_mixed_ranks():
    g, low, full = _adapter(40, 3), _adapter(41, 2), _adapter(42, 3)
    res = fedavg_factors(g, [low, full], [0.25, 0.75])
    assert res.info["rank_method"] == "zero-padding" and res.info["rank"] == 3
    assert res.info["client_ranks"] == [2, 3]
    for m in SHAPES:
        A, B = res.state[f"{m}.lora_A"], res.state[f"{m}.lora_B"]
        torch.testing.assert_close(
            A[:2], 0.25 * low[f"{m}.lora_A"] + 0.75 * full[f"{m}.lora_A"][:2]
        )
        torch.testing.assert_close(A[2], 0.75 * full[f"{m}.lora_A"][2])
        torch.testing.assert_close(B[:, 2], 0.75 * full[f"{m}.lora_B"][:, 2])
    same = fedavg_factors(g, [full, full], [0.5, 0.5])
    assert same.info["rank_method"] == "same-rank"


def test_fedavg_family_grows_to_the_largest_client_rank():
    g = _adapter(43, 2)
    res = fedavg_factors(g, [_adapter(45, 4)], [1.0])
    assert res.info["rank"] == 4 and res.info["rank_grew"] == sorted(SHAPES)
    for m, (_out, n_in) in SHAPES.items():
        assert res.state[f"{m}.lora_A"].shape == (4, n_in)
        assert torch.equal(res.state[f"{m}.lora_A"][:2], _adapter(45, 4)[f"{m}.lora_A"][:2])


def test_fedavg_folds_differing_scalings():
    low = _adapter(46, 2)
    res = fedavg_factors(_adapter(48, 4), [low], [1.0], [8 / 2], 8 / 4)
    assert res.info["scaling_folded"]
    for m in SHAPES:  # one client: its own update survives the rank change exactly
        torch.testing.assert_close(
            _prod(res.state, m, 2.0), _prod(low, m, 4.0), atol=1e-5, rtol=1e-5
        )


def test_to_client_rank_is_the_truncated_svd():
    g = _adapter(50, 5)
    small = to_client_rank(g, 3, global_scaling=16 / 5, client_scaling=16 / 3)
    for m, (out, n_in) in SHAPES.items():
        assert small[f"{m}.lora_A"].shape == (3, n_in) and small[f"{m}.lora_B"].shape == (out, 3)
        U, S, Vh = torch.linalg.svd(_prod(g, m, 16 / 5), full_matrices=False)
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        torch.testing.assert_close(_prod(small, m, 16 / 3), best, atol=1e-4, rtol=1e-4)
    _assert_states_equal(to_client_rank(g, 5), g)
    with pytest.raises(ValueError, match="exceeds the global rank"):
        to_client_rank(g, 6)


# --- weights, dtypes, errors, purity -----------------------------------------------------------


def test_client_weights():
    assert client_weights([100, 300], "tokens") == pytest.approx([0.25, 0.75])
    assert client_weights([0.9, 0.3, 0.0], "quality") == pytest.approx([0.75, 0.25, 0.0])
    assert client_weights([7, 0, 3], "uniform") == pytest.approx([1 / 3] * 3)
    assert client_weights([30, 10], "samples") == pytest.approx([0.75, 0.25])
    for counts, weighting, match in [
        ([], "samples", "no clients"),
        ([1, 2], "length", "unknown weighting"),
        ([3, -1], "tokens", "finite entries >= 0"),
        ([3, float("nan")], "quality", "finite entries >= 0"),
        ([1, -1], "uniform", "finite entries >= 0"),
        ([0, 0], "samples", "positive total"),
    ]:
        with pytest.raises(ValueError, match=match):
            client_weights(counts, weighting)


@pytest.mark.parametrize("strategy", AGGREGATIONS)
def test_result_has_the_global_dtype(strategy):
    g = {k: v.to(torch.bfloat16) for k, v in _adapter(60, 3).items()}
    c = {k: (v + 0.01).to(torch.bfloat16) if k.endswith("B") else v for k, v in g.items()}
    res = AGGREGATIONS[strategy](g, [c, g], [0.5, 0.5])
    assert {t.dtype for t in res.state.values()} == {torch.bfloat16}


def test_bad_inputs_raise_clear_errors():
    g = _adapter(61, 3)
    other_keys = [{"x.lora_A": g["layers.0.q_proj.lora_A"]}]
    other_out = [_adapter(62, 3, {m: (5, 23) for m in SHAPES})]
    mixed = {"client_scalings": [1.0, 2.0]}
    cases = [
        ((fedavg_factors, g, [], []), {}, "at least one client"),
        ((fedavg_factors, g, [g, g], [1.0]), {}, "2 client states but 1 weights"),
        ((fedavg_factors, g, [g, g], [0.6, 0.6]), {}, "sum to 1"),
        ((fedavg_factors, g, [g], [-1.0]), {}, "sum to 1"),
        ((fedavg_factors, g, other_keys, [1.0]), {}, "different keys"),
        ((fedavg_factors, g, other_out, [1.0]), {}, "out=37"),
        ((exact_aggregate, g, [g, g], [0.5, 0.5]), mixed, "pass global_scaling"),
        ((exact_aggregate, g, [g], [1.0]), {"client_scalings": [0.0]}, "scalings must be finite"),
        ((exact_aggregate, g, [g], [1.0]), {"factor_split": "left"}, "factor_split"),
    ]  # fmt: skip
    for (fn, *args), kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            fn(*args, **kwargs)
    bad_pair = _clone(g)
    bad_pair["layers.0.q_proj.lora_B"] = torch.randn(37, 2)
    with pytest.raises(ValueError, match="same r"):
        fedavg_factors(g, [bad_pair], [1.0])
    with pytest.raises(ValueError, match="not a LoRA tensor"):
        fedavg_factors({**g, "lm_head.weight": torch.zeros(2)}, [g], [1.0])
    with pytest.raises(ValueError, match="mixed LoRA ranks"):
        fedavg([g, _adapter(63, 2)], [0.5, 0.5])


@pytest.mark.parametrize("strategy", AGGREGATIONS)
def test_inputs_are_not_mutated(strategy):
    g, clients = _adapter(70, 4), [_adapter(71, 4), _adapter(72, 2)]
    if strategy == "frozen_a":
        clients = [{k: g[k] if k.endswith("A") else v for k, v in _adapter(71, 4).items()}]
    w = client_weights([1] * len(clients), "uniform")
    frozen = copy.deepcopy((g, clients))
    first = AGGREGATIONS[strategy](g, clients, w)
    second = AGGREGATIONS[strategy](first.state, clients, w)
    _assert_states_equal(g, frozen[0])
    for c, c0 in zip(clients, frozen[1], strict=True):
        _assert_states_equal(c, c0)
    assert all(second.state[k] is not g[k] for k in g)
    assert first.server_state == second.server_state == {}  # no server state
