"""The second partition axis, number of sentences (``partition.length_measure=sentences``):
sentence counts, sentence buckets in the Dirichlet partition, the count kept through corruption
and windows, and one tiny run whose records and tables show sentence buckets."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest

from cllora.config import ConfigError, load_config
from cllora.data.formatting import Sample, record_to_chat, response_sentences, tokenize_record
from cllora.data.partition import (
    apply_window,
    bucket_edges,
    bucket_index,
    bucket_labels,
    make_clients,
    sample_length,
)
from cllora.data.quality import CorruptionContext, corrupt
from cllora.data.readers import DataError
from cllora.data.sentences import count_sentences, split_sentences


@pytest.mark.parametrize(
    "text, n",
    [
        ("Hello there. How are you? Fine", 3),  # no final punctuation: the last piece counts
        ("Take 1.5 mg twice a day. Stop after 2.5 days.", 2),  # decimals end nothing
        ("Take it with food, e.g. after meals, i.e. twice a day. Rest.", 2),
        ("Ask Dr. Smith and Prof. Jones. See Smith et al. for more.", 2),
        ("It is common in the U.S. and in Canada. Yes!", 2),
        ('He said "stop." Then he left.', 2),  # a closing quote after the end
        ("Symptoms\n\n- fever\n- cough", 2),  # a blank line ends a sentence
        ("A line that wraps\nonto the next. End", 2),  # a single line break does not
        ("1. Rest\n2. Drink water", 2),  # list numbers are no sentences
        ("Das ist gut. Ça va? Да.", 3),  # any script's letters
        ("", 0),
        ("   \n\n  ", 0),
        ("... !!! 42.", 0),  # no letter, no sentence
    ],
)
def test_count_sentences(text, n):
    assert count_sentences(text) == n == len(split_sentences(text))


def test_split_sentences_keeps_the_pieces():
    assert split_sentences("Hello there. How are you? Fine") == [
        "Hello there.",
        "How are you?",
        "Fine",
    ]


def test_tables_uses_the_data_layers_counter():
    from cllora.data import tables

    assert tables.count_sentences is count_sentences


def test_the_response_is_what_counts():
    qa = {"question": "Why? Tell me. Now.", "answer": "Because. It is so."}
    assert response_sentences(record_to_chat(qa)) == 2  # the question's three do not count
    chat = [
        {"role": "user", "content": "One. Two."},
        {"role": "assistant", "content": "A."},
        {"role": "user", "content": "Three."},
        {"role": "assistant", "content": "B. C. D"},
    ]
    assert response_sentences(chat) == 4  # every assistant turn
    assert response_sentences("Plain text. Trained on every token") == 2


def test_built_samples_carry_their_count(smol_tokenizer):
    record = {"question": "Q?", "answer": "First. Second. " + "word " * 200, "_where": "f:1"}
    sample = tokenize_record(record, smol_tokenizer, max_length=64)  # cut at 64 tokens
    assert sample.truncated and sample.meta["sentences"] == 3  # counted before the cut
    assert sample_length(sample, "sentences") == 3


# ---------------------------------------------------------------- the partition


def _samples(n: int, seed: int = 0) -> list[Sample]:
    """Token lengths log-uniform over 10..800 and sentence counts uniform over 1..20, drawn
    independently, so token buckets and sentence buckets are unrelated."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(10), np.log(800), n)).astype(int)
    sentences = rng.integers(1, 21, n)
    out = []
    for i, (k, m) in enumerate(zip(lengths, sentences, strict=True)):
        k = int(k)
        labels = [-100] * (k // 2) + list(range(k // 2, k))
        out.append(Sample(list(range(k)), labels, {"id": i, "sentences": int(m)}))
    return out


def _cfg(*overrides: str):
    return load_config(None, ["partition.method=dirichlet", *overrides]).partition


def _mean_tv(clients, edges, measure: str) -> float:
    def hist(samples):
        idx = [bucket_index(sample_length(s, measure), edges) for s in samples]
        return np.bincount(idx, minlength=len(edges) + 1) / len(samples)

    g = hist([s for c in clients for s in c.train + c.test])
    return float(np.mean([0.5 * np.abs(hist(c.train + c.test) - g).sum() for c in clients]))


def _ids(clients) -> list:
    return [
        [c.name, [s.meta["id"] for s in c.train], [s.meta["id"] for s in c.test]] for c in clients
    ]


def test_sentence_buckets_are_in_sentences():
    samples = _samples(400)
    counts = [sample_length(s, "sentences") for s in samples]
    edges = bucket_edges(counts, (), "sentences")  # the quartiles of the counts
    assert edges == [7, 12, 16]  # sentences (1..20), not tokens (10..800)
    assert bucket_labels(edges, "sentences") == ["<7sent", "7-11sent", "12-15sent", ">=16sent"]
    assert bucket_labels([128, 256]) == ["<128", "128-255", ">=256"]  # token labels as before
    with pytest.raises(DataError, match=r"hold no sample \(lengths range 1\.\.20 sentences\)"):
        bucket_edges(counts, [30], "sentences")


def test_small_alpha_skews_the_sentence_mix():
    samples = _samples(1500)
    edges = bucket_edges([sample_length(s, "sentences") for s in samples], (5, 10, 15), "sentences")
    tv = {}
    for measure in ("tokens", "sentences"):
        for alpha in (0.05, 1000.0):
            keys = (f"partition.alpha_len={alpha}", f"partition.length_measure={measure}")
            cfg = _cfg("partition.num_clients=6", *keys)
            runs = [make_clients(samples, cfg, seed, edges) for seed in range(3)]
            tv[measure, alpha] = np.mean([_mean_tv(c, edges, "sentences") for c in runs])
    # measured: 0.37 (each client mostly one sentence range; the pools limit it) and 0.03
    assert tv["sentences", 0.05] > 0.3 and tv["sentences", 1000.0] < 0.08, tv
    # the measure is what the Dirichlet skews: dealt by tokens, the sentence mix stays near-IID
    assert tv["tokens", 0.05] < 0.08, tv


def test_tokens_is_the_default_and_unchanged():
    samples = _samples(400)
    edges = bucket_edges([s.num_tokens for s in samples])
    keys = ("partition.num_clients=5", "partition.alpha_len=0.3", "partition.alpha_qty=2.0")
    default = make_clients(samples, _cfg(*keys), 7, edges)
    tokens = make_clients(samples, _cfg(*keys, "partition.length_measure=tokens"), 7, edges)
    assert _ids(default) == _ids(tokens)
    # the sentence counts play no part in a tokens partition
    bare = [Sample(s.input_ids, s.labels, {"id": s.meta["id"]}) for s in samples]
    assert _ids(make_clients(bare, _cfg(*keys), 7, edges)) == _ids(default)
    # the clients the code gave for this seed before length_measure existed (numpy's Generator
    # streams; every Dirichlet concentration here is > 0.1)
    digest = hashlib.sha256(json.dumps(_ids(default)).encode()).hexdigest()[:16]
    assert digest == "9b26db54b3dd7db1"
    sent_edges = bucket_edges([sample_length(s, "sentences") for s in samples], (), "sentences")
    by_sentences = make_clients(
        samples, _cfg(*keys, "partition.length_measure=sentences"), 7, sent_edges
    )
    assert _ids(by_sentences) != _ids(default)


def test_length_measure_is_validated():
    with pytest.raises(ConfigError, match=r"partition\.length_measure.*'tokens', 'sentences'"):
        load_config(None, ["partition.length_measure=words"])


def test_a_sample_without_a_count_is_named():
    with pytest.raises(DataError, match="f:3: no sentence count"):
        sample_length(Sample([1, 2], [1, 2], {"where": "f:3"}), "sentences")


# ---------------------------------------------------------------- corruption and windows


def test_corruption_and_windows_keep_the_original_count():
    q = load_config(None, ["quality.operators=[shuffle, replace, swap, truncate, boilerplate]"])
    prompt = [101, 102, 103]
    samples = []
    for i in range(20):
        body = [10 + i + j for j in range(4 + i)]
        ids = prompt + body + [2]
        labels = [-100] * len(prompt) + body + [2]
        samples.append(Sample(ids, labels, {"where": f"f:{i}", "sentences": i + 1}))
    ctx = CorruptionContext(vocab=[900, 901, 902], boilerplate_ids=[55, 56, 57])
    out, counts = corrupt(samples, 1.0, q.quality, ctx, seed=1)
    assert sum(counts.values()) == 20 and all("corruption" in s.meta for s in out)
    assert any(s.input_ids != t.input_ids for s, t in zip(samples, out, strict=True))
    assert [sample_length(s, "sentences") for s in out] == list(range(1, 21))
    cut, truncated, _ = apply_window(out, 8, "truncate")
    assert truncated > 0
    assert [sample_length(s, "sentences") for s in cut] == [
        sample_length(s, "sentences") for s in out if any(t != -100 for t in s.labels[:8])
    ]


# ---------------------------------------------------------------- through the real pipeline


def test_a_run_by_sentences_shows_sentence_buckets(tmp_path):
    from cllora.fed.server import run_experiment
    from tests.conftest import records_of, tiny_run_overrides

    overrides = tiny_run_overrides(
        tmp_path,
        run_name="s",
        fed__rounds=1,
        train__local_steps=1,
        eval__local=False,
        partition__method="dirichlet",
        partition__num_clients=3,
        partition__alpha_len=0.3,
        partition__length_measure="sentences",
        quality__score_samples=0,
    )
    run = run_experiment(load_config(None, overrides)).run_dir
    (part,) = records_of(run, "partition")
    edges = part["length_buckets"]
    assert part["length_measure"] == "sentences" and edges and max(edges) < 40
    labels = bucket_labels(edges, "sentences")
    rows = list(csv.DictReader((run / "clients.csv").open()))
    for r in rows:
        assert [h.rsplit(":", 1)[0] for h in r["hist"].split()] == labels
        assert float(r["tv_len"]) > 0
    (tests,) = records_of(run, "test_samples")
    glob = [r for r in records_of(run, "global_eval") if r["round"] == 1]
    assert {r["client"] for r in glob} == {*(r["client"] for r in rows), "__global__"}
    for r in glob:  # each set's buckets are those of its samples' sentence counts
        lengths = tests["sets"][r["client"]]["lengths"]
        assert set(r["buckets"]) == {labels[bucket_index(n, edges)] for n in lengths}
        assert sum(b["tokens"] for b in r["buckets"].values()) == r["tokens"]
    assert len(next(r for r in glob if r["client"] == "__global__")["buckets"]) >= 2
