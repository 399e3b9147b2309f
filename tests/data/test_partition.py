"""Partitioners (field, IID, Dirichlet over length and quantity), length buckets, windows."""

from __future__ import annotations

import numpy as np
import pytest

from cllora.config import ConfigError, load_config
from cllora.data.formatting import Sample
from cllora.data.partition import (
    apply_window,
    bucket_edges,
    bucket_index,
    bucket_labels,
    client_sizes,
    make_clients,
)
from cllora.data.readers import DataError


def _samples(n: int, seed: int = 0) -> list[Sample]:
    """Samples with lengths spread over 10..800 tokens (log-uniform), each with a unique id."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(10), np.log(800), n)).astype(int)
    out = []
    for i, k in enumerate(lengths):
        labels = [-100] * (k // 2) + list(range(k // 2, k))
        out.append(Sample(list(range(k)), labels, {"id": i, "source": f"s{i % 3}"}))
    return out


def _cfg(**kw):
    return load_config(None, [f"partition.{k}={v}" for k, v in kw.items()]).partition


def _hist(samples, edges) -> np.ndarray:
    idx = [bucket_index(s.num_tokens, edges) for s in samples]
    return np.bincount(idx, minlength=len(edges) + 1) / len(samples)


def _tv_per_client(clients, edges) -> list[float]:
    g = _hist([s for c in clients for s in c.train + c.test], edges)
    return [0.5 * np.abs(_hist(c.train + c.test, edges) - g).sum() for c in clients]


def test_field_and_iid():
    samples = _samples(60)
    by_field = make_clients(samples, _cfg(method="field"), seed=0)
    assert [c.name for c in by_field] == ["s0", "s1", "s2"]
    iid = make_clients(samples, _cfg(method="iid", num_clients=4), seed=0)
    assert [len(c.train) + len(c.test) for c in iid] == [15] * 4


def test_dirichlet_length_small_alpha_skews_large_alpha_is_near_iid():
    samples = _samples(2000)
    edges = bucket_edges([s.num_tokens for s in samples], [40, 100, 250])
    tv = {}
    for alpha in (0.05, 1000.0):
        cfg = _cfg(method="dirichlet", num_clients=8, alpha_len=alpha)
        runs = [_tv_per_client(make_clients(samples, cfg, seed, edges), edges) for seed in range(3)]
        tv[alpha] = float(np.mean(runs))
    assert tv[0.05] > 0.35, tv  # clients see mostly one length range (pools limit it)
    assert tv[1000.0] < 0.08, tv  # near the global mix


def test_dirichlet_quantity_small_alpha_unequal_sizes():
    samples = _samples(1000)
    cv = {}
    for alpha in (0.1, 1000.0):
        cfg = _cfg(method="dirichlet", num_clients=8, alpha_qty=alpha)
        clients = [make_clients(samples, cfg, seed) for seed in range(3)]
        sizes = [[len(c.train) + len(c.test) for c in cs] for cs in clients]
        assert all(min(s) >= 2 and sum(s) == 1000 for s in sizes)
        cv[alpha] = float(np.mean([np.std(s) / np.mean(s) for s in sizes]))
    assert cv[0.1] > 1.0 and cv[1000.0] < 0.1, cv


def test_dirichlet_combined_deals_every_sample_once_and_is_seeded():
    samples = _samples(500)
    edges = bucket_edges([s.num_tokens for s in samples])
    cfg = _cfg(method="dirichlet", num_clients=5, alpha_len=0.3, alpha_qty=0.5)
    a = make_clients(samples, cfg, seed=1, edges=edges)
    ids = sorted(s.meta["id"] for c in a for s in c.train + c.test)
    assert ids == list(range(500))
    b = make_clients(samples, cfg, seed=1, edges=edges)
    c = make_clients(samples, cfg, seed=2, edges=edges)
    ids = [[[s.meta["id"] for s in x.train] for x in cs] for cs in (a, b, c)]
    assert ids[0] == ids[1] != ids[2]


def test_quartile_buckets_and_labels():
    edges = bucket_edges(list(range(1, 101)))
    assert len(edges) == 3 and edges == sorted(edges)
    assert bucket_labels([128, 256]) == ["<128", "128-255", ">=256"]
    assert [bucket_index(n, [128, 256]) for n in (5, 128, 300)] == [0, 1, 2]


def test_empty_length_bucket_is_an_error():
    with pytest.raises(DataError, match=r"bucket\(s\) 100-199 hold no sample"):
        bucket_edges([10, 20, 300], [100, 200])


def test_too_few_samples_for_the_clients_is_an_error():
    with pytest.raises(DataError, match=r"cannot give each of partition\.num_clients=8"):
        client_sizes(10, 8, None, np.random.default_rng(0))


@pytest.mark.parametrize(
    "override, words",
    [
        ("partition.alpha_len=0", ["partition.alpha_len", "> 0"]),
        ("partition.alpha_qty=-1", ["partition.alpha_qty", "> 0"]),
        ("quality.alpha=0", ["quality.alpha", "> 0"]),
        ("quality.mean_rate=1.5", ["quality.mean_rate", "[0, 1]"]),
        ("quality.rates=[0.2,1.2]", ["quality.rates", "[0, 1]"]),
        ("quality.operators=[shuffle,scramble]", ["quality.operators", "boilerplate"]),
        ("partition.length_buckets=[200,100]", ["partition.length_buckets", "increasing"]),
        ("partition.method=dirichlet", ["alpha_len", "alpha_qty"]),
    ],
)
def test_bad_measurement_settings_are_named(override, words):
    extra = ["partition.method=dirichlet"] if "alpha_" in override else []
    with pytest.raises(ConfigError) as err:
        load_config(None, [*extra, override])
    for w in words:
        assert w in str(err.value)


def test_apply_window_truncates_or_drops_and_counts():
    samples = [Sample([1] * n, [-100] * (n - 2) + [1, 1], {}) for n in (4, 10, 20)]
    kept, cut, dropped = apply_window(samples, 10, "truncate")
    assert [s.num_tokens for s in kept] == [4, 10] and (cut, dropped) == (0, 1)  # no target left
    kept, cut, dropped = apply_window([Sample([1] * 20, [1] * 20, {})], 10, "truncate")
    assert kept[0].truncated and kept[0].num_tokens == 10 and cut == 1
    kept, cut, dropped = apply_window(samples, 10, "drop")
    assert len(kept) == 2 and dropped == 1
    with pytest.raises(DataError, match="longer than the context window of 10"):
        apply_window(samples, 10, "error")
