"""Pool mode (common random numbers): one training pool per seed, only the allocation varies;
allocations deliver the skew they ask for, and say so when they cannot."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cllora.config import ConfigError, load_config
from cllora.data.formatting import Sample
from cllora.data.partition import bucket_edges, bucket_index
from cllora.data.pipeline import build_clients
from cllora.data.pool import allocate, draw_pool, fitting, skew_report
from cllora.data.readers import DataError


def _samples(n: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(10), np.log(400), n)).astype(int)
    out = []
    for i, k in enumerate(lengths):
        labels = [-100] * (k // 2) + list(range(k // 2, k))
        out.append(Sample(list(range(k)), labels, {"where": f"f:{i:04d}", "source": f"s{i % 5}"}))
    return out


def _cfg(*items: str):
    return load_config(None, ["partition.global_test_fraction=0.1", *items]).partition


def _mix(samples, edges) -> np.ndarray:
    counts = np.bincount([bucket_index(s.num_tokens, edges) for s in samples],
                         minlength=len(edges) + 1)  # fmt: skip
    return counts / counts.sum()


def test_fitting_leaves_out_what_a_window_would_cut_and_counts_it():
    samples = _samples(200)
    kept, excluded = fitting(samples, 100)
    assert excluded == sum(s.true_length > 100 for s in samples) > 0
    assert all(s.true_length <= 100 for s in kept) and len(kept) + excluded == 200


def test_the_pool_depends_on_the_seed_alone():
    samples = _samples(300)
    a, b = draw_pool(samples, 80, seed=3), draw_pool(samples, 80, seed=3)
    assert [s.meta["where"] for s in a] == [s.meta["where"] for s in b]
    assert {s.meta["where"] for s in draw_pool(samples, 80, seed=4)} != {s.meta["where"] for s in a}
    with pytest.raises(DataError, match=r"partition\.pool=400 is larger"):
        draw_pool(samples, 400, seed=0)


@pytest.mark.parametrize(
    "method",
    ["partition.method=iid", "partition.method=pathological", "partition.method=field",
     "partition.method=dirichlet"],
)  # fmt: skip
def test_every_allocation_deals_exactly_the_pool(method):
    pool = draw_pool(_samples(400), 96, seed=0)
    edges = bucket_edges([s.num_tokens for s in pool])
    extra = ["partition.alpha_len=0.1"] if method.endswith("dirichlet") else []
    alloc = allocate(pool, _cfg(method, "partition.num_clients=4", "partition.pool=96", *extra),
                     seed=0, edges=edges)  # fmt: skip
    dealt = [s.meta["where"] for g in alloc.groups.values() for s in g]
    assert sorted(dealt) == sorted(s.meta["where"] for s in pool)  # each pool sample once
    for g in alloc.groups.values():  # order by id: batch order follows from seed and samples
        assert [s.meta["where"] for s in g] == sorted(s.meta["where"] for s in g)


def test_pathological_and_stratified_iid_deliver_what_they_ask():
    pool = draw_pool(_samples(400), 96, seed=1)
    edges = bucket_edges([s.num_tokens for s in pool])  # the pool's quartiles
    p = _mix(pool, edges)
    assert np.allclose(p, 0.25, atol=0.05)  # quantile buckets are equally filled
    path = allocate(pool, _cfg("partition.method=pathological", "partition.num_clients=4",
                               "partition.pool=96"), seed=1, edges=edges)  # fmt: skip
    for k, g in enumerate(path.groups.values()):
        assert {bucket_index(s.num_tokens, edges) for s in g} == {k}
    iid = allocate(pool, _cfg("partition.method=iid", "partition.num_clients=4",
                              "partition.pool=96"), seed=1, edges=edges)  # fmt: skip
    skew = skew_report(iid, pool, edges)
    assert max(v["delivered"] for v in skew.values()) <= 0.05
    skew = skew_report(path, pool, edges)
    assert all(abs(v["delivered"] - v["asked"]) < 1e-9 and v["asked"] > 0.6
               for v in skew.values())  # fmt: skip


def test_a_redraw_changes_who_holds_what_never_what_is_trained():
    pool = draw_pool(_samples(400), 96, seed=0)
    edges = bucket_edges([s.num_tokens for s in pool])
    base = ["partition.method=iid", "partition.num_clients=4", "partition.pool=96"]
    a = allocate(pool, _cfg(*base), seed=0, edges=edges)
    b = allocate(pool, _cfg(*base, "partition.draw=1"), seed=0, edges=edges)
    ids = [[s.meta["where"] for s in g] for g in a.groups.values()]
    assert ids != [[s.meta["where"] for s in g] for g in b.groups.values()]
    assert sorted(i for g in ids for i in g) == sorted(
        s.meta["where"] for g in b.groups.values() for s in g
    )


def test_natural_owners_are_grouped_into_the_clients_asked_for():
    pool = draw_pool(_samples(400), 100, seed=0)
    edges = bucket_edges([s.num_tokens for s in pool])
    alloc = allocate(pool, _cfg("partition.method=field", "partition.num_clients=3",
                                "partition.pool=100"), seed=0, edges=edges)  # fmt: skip
    owners = [{s.meta["source"] for s in g} for g in alloc.groups.values()]
    assert len(owners) == 3 and all(owners)
    assert sum(len(o) for o in owners) == 5  # every source with exactly one client
    assert alloc.asked is None
    with pytest.raises(DataError, match=r"fewer than partition\.num_clients=6"):
        allocate(pool, _cfg("partition.method=field", "partition.num_clients=6",
                            "partition.pool=100"), seed=0, edges=edges)  # fmt: skip


def test_a_skew_that_is_not_delivered_is_reported(caplog):
    pool = draw_pool(_samples(400), 60, seed=0)
    edges = bucket_edges([s.num_tokens for s in pool])
    cfg = _cfg("partition.method=dirichlet", "partition.alpha_len=0.05", "partition.num_clients=6",
               "partition.pool=60")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="cllora"):
        for seed in range(6):
            skew_report(allocate(pool, cfg, seed=seed, edges=edges), pool, edges)
    assert "length skew asked" in caplog.text and "delivered" in caplog.text


def test_pool_settings_are_checked():
    with pytest.raises(ConfigError, match=r"pathological needs partition\.pool"):
        load_config(None, ["partition.method=pathological"])
    with pytest.raises(ConfigError, match=r"partition\.pool needs a held\-out set"):
        load_config(None, ["partition.pool=10", "partition.method=iid"])


def _pool_run(tmp_path, smol_tokenizer, *items: str):
    cfg = load_config(None, [
        "data.max_length=96", "partition.pool=40", "partition.num_clients=4",
        "partition.global_test_fraction=0.1", "partition.max_global_test=12",
        "quality.score_samples=0", f"out_dir={tmp_path}", *items,
    ])  # fmt: skip
    return build_clients(cfg, smol_tokenizer)


def test_arms_of_a_seed_train_the_same_samples_and_share_the_held_out_set(tmp_path, smol_tokenizer):
    arms = {
        "iid": ["partition.method=iid"],
        "redraw": ["partition.method=iid", "partition.draw=1"],
        "pathological": ["partition.method=pathological"],
        "field": ["partition.method=field"],
        "corrupted": ["partition.method=iid", "quality.rates=[1.0,0.0]"],
    }
    data = {name: _pool_run(tmp_path, smol_tokenizer, *items) for name, items in arms.items()}
    held = {name: [s.meta["where"] for s in d.global_test] for name, d in data.items()}
    trained = {name: sorted(s.meta["where"] for c in d.clients for s in c.train)
               for name, d in data.items()}  # fmt: skip
    assert len({tuple(v) for v in held.values()}) == 1
    assert len({tuple(v) for v in trained.values()}) == 1 and len(trained["iid"]) == 40
    iid = data["iid"]
    assert all(not c.test for c in iid.clients)  # every model is scored on the held-out set
    assert iid.stats["excluded_overlong"] > 0 and iid.stats["pool"] == 40
    assert all(s.num_tokens <= 96 and not s.truncated for c in iid.clients for s in c.train)
    corrupted = data["corrupted"].clients
    assert corrupted[0].corrupted and not any(corrupted[1].corrupted.values())


def test_quality_drop_trains_only_the_clean_samples(tmp_path, smol_tokenizer):
    spread = _pool_run(tmp_path, smol_tokenizer, "partition.method=iid", "quality.rates=[0.5]")
    drop = _pool_run(tmp_path, smol_tokenizer, "partition.method=iid", "quality.rates=[0.5]",
                     "quality.drop=true")  # fmt: skip
    for a, b in zip(spread.clients, drop.clients, strict=True):
        clean = [s.meta["where"] for s in a.train if "corruption" not in s.meta]
        assert [s.meta["where"] for s in b.train] == clean
        assert b.discarded == len(a.train) - len(clean) > 0
    with pytest.raises(DataError, match=r"quality\.drop leaves no training sample"):
        _pool_run(tmp_path, smol_tokenizer, "partition.method=iid", "quality.rates=[1.0]",
                  "quality.drop=true")  # fmt: skip
