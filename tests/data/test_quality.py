"""Corruption operators, per-client rates, and the label-free quality score."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cllora.config import load_config
from cllora.data.formatting import Sample
from cllora.data.quality import (
    CorruptionContext,
    apply_operator,
    client_rates,
    corrupt,
    response_span,
)
from cllora.eval import quality_score

PROMPT = [101, 102, 103, 104]
END = 2


def _sample(body: list[int], tail: tuple[int, ...] = (7,)) -> Sample:
    ids = PROMPT + body + [END, *tail]
    labels = [-100] * len(PROMPT) + body + [END] + [-100] * len(tail)
    return Sample(ids, labels, {"where": "x"})


CTX = CorruptionContext(vocab=[900, 901, 902], boilerplate_ids=[55, 56, 57])
BODY = list(range(10, 30))  # 20 response tokens


def _span(s: Sample) -> list[int]:
    a, b = response_span(s)
    return s.input_ids[a:b]


def _check_frame(before: Sample, after: Sample, op: str) -> None:
    assert after.input_ids[: len(PROMPT)] == PROMPT  # the prompt is never changed
    assert _span(after)[-1] == END and after.input_ids[-1] == 7  # end marker and tail kept
    assert after.meta["corruption"] == op and "corruption" not in before.meta
    assert len(after.input_ids) == len(after.labels)


def test_shuffle_permutes_the_body():
    s = _sample(BODY)
    out = apply_operator("shuffle", s, random.Random(0), CTX)
    _check_frame(s, out, "shuffle")
    assert sorted(_span(out)[:-1]) == BODY and _span(out)[:-1] != BODY
    assert s.input_ids == PROMPT + BODY + [END, 7]  # input untouched


def test_replace_changes_a_strength_fraction_with_corpus_tokens():
    s = _sample(BODY)
    out = apply_operator("replace", s, random.Random(0), CTX, strength=0.25)
    _check_frame(s, out, "replace")
    changed = [t for t, u in zip(_span(out)[:-1], BODY, strict=True) if t != u]
    assert len(changed) == 5 and set(changed) <= set(CTX.vocab)


def test_swap_takes_another_samples_response():
    s, other = _sample(BODY), _sample([40, 41, 42])
    out = apply_operator("swap", s, random.Random(0), CTX, pool=[s, other])
    _check_frame(s, out, "swap")
    assert _span(out) == [40, 41, 42, END]


def test_truncate_keeps_the_head():
    s = _sample(BODY)
    out = apply_operator("truncate", s, random.Random(0), CTX, strength=0.75)
    _check_frame(s, out, "truncate")
    assert _span(out) == [*BODY[:5], END]


def test_boilerplate_repeats_a_sentence():
    s = _sample(BODY)
    out = apply_operator("boilerplate", s, random.Random(0), CTX, strength=0.3)
    _check_frame(s, out, "boilerplate")
    assert _span(out) == [*BODY, *([55, 56, 57] * 2), END]  # round(0.3 * 20 / 3) = 2
    assert out.labels[len(PROMPT) : len(PROMPT) + 27] == _span(out)  # trained on


def test_unknown_operator():
    with pytest.raises(ValueError, match="unknown corruption operator 'x'"):
        apply_operator("x", _sample(BODY), random.Random(0), CTX)


def test_corrupt_a_fraction_and_count_per_operator():
    q = load_config(None, ["quality.operators=[shuffle, truncate]"]).quality
    samples = [_sample([10 + i, 11 + i, 12 + i, 13]) for i in range(40)]
    out, counts = corrupt(samples, 0.25, q, CTX, seed=3)
    assert sum(counts.values()) == 10 and set(counts) == {"shuffle", "truncate"}
    assert sum("corruption" in s.meta for s in out) == 10
    again, _ = corrupt(samples, 0.25, q, CTX, seed=3)
    assert [s.input_ids for s in again] == [s.input_ids for s in out]
    assert corrupt(samples, 0.0, q, CTX, seed=3)[0] == samples
    with pytest.raises(ValueError, match="outside"):
        corrupt(samples, 1.5, q, CTX, seed=0)


def test_client_rates_explicit_and_dirichlet():
    q = load_config(None, ["quality.rates=[0.0, 0.5]"]).quality
    assert client_rates(q, 5, seed=0) == [0.0, 0.5, 0.0, 0.5, 0.0]
    q = load_config(None, ["quality.mean_rate=0.3"]).quality
    assert client_rates(q, 4, seed=0) == [0.3] * 4
    spread = {}
    for alpha in (0.1, 1000.0):
        q = load_config(None, ["quality.mean_rate=0.2", f"quality.alpha={alpha}"]).quality
        rates = [client_rates(q, 8, seed) for seed in range(5)]
        assert all(0 <= r <= 1 for rs in rates for r in rs)
        spread[alpha] = sum(max(rs) - min(rs) for rs in rates) / 5
    assert spread[0.1] > 0.5 and spread[1000.0] < 0.05, spread


def test_quality_score_is_one_over_ppl_of_per_sample_losses():
    from cllora.config import ModelConfig
    from cllora.eval import evaluate
    from cllora.model.load import load_model

    model, tok = load_model(ModelConfig(name="tiny-llama", dtype="fp32"))
    samples = [_sample(list(range(200 + i, 230 + 2 * i))) for i in range(5)]
    losses, score = quality_score(model, samples, tok.pad_token_id, batch_size=2)
    total = evaluate(model, samples, tok.pad_token_id, batch_size=3)
    assert len(losses) == 5 and score == pytest.approx(1 / total.ppl, rel=1e-5)
    one = evaluate(model, samples[3:4], tok.pad_token_id)
    assert losses[3] == pytest.approx(one.loss, rel=1e-5)  # batching does not change a sample


@pytest.mark.slow
def test_corrupted_responses_score_worse_with_the_real_model():
    """SmolLM2-135M finds shuffled and replaced answers less likely than clean ones; repeated
    boilerplate is *more* likely (repetition is easy to predict): the score's known blind spot."""
    from cllora.config import ModelConfig
    from cllora.data.formatting import tokenize_record
    from cllora.data.readers import read_records
    from cllora.model.load import load_model

    path = Path(__file__).resolve().parents[3] / "shared" / "data" / "medquad" / "NINDS.jsonl"
    if not path.is_file():
        pytest.skip(f"MedQuAD not found at {path}")
    model, tok = load_model(ModelConfig(name="smollm2-135m", dtype="fp32"))
    records = read_records(path)[:6]
    clean = [tokenize_record(r, tok, max_length=256) for r in records]
    ctx = CorruptionContext.from_samples(clean, tok.encode("Visit our website. "))
    _, base = quality_score(model, clean, tok.pad_token_id)
    scores = {}
    for op in ("shuffle", "replace", "boilerplate"):
        bad = [apply_operator(op, s, random.Random(0), ctx, 0.5, clean) for s in clean]
        scores[op] = quality_score(model, bad, tok.pad_token_id)[1]
    assert scores["shuffle"] < base / 2 and scores["replace"] < base / 2, (base, scores)
    assert scores["boilerplate"] > base, (base, scores)
