"""Quality heterogeneity: named corruption operators, per-client rates, a label-free quality score.

Usage::

    from cllora.data.quality import CorruptionContext, client_rates, corrupt
    from cllora.eval import quality_score

    ctx = CorruptionContext.from_samples(samples, boilerplate_ids=tok.encode(BOILERPLATE))
    rates = client_rates(cfg.quality, num_clients=8, seed=0)     # e.g. [0.0, 0.9, 0.1, ...]
    train, counts = corrupt(client.train, rates[0], cfg.quality, ctx, seed=0)
    counts                       # {"shuffle": 3, "swap": 2, ...}: samples per operator
    score = quality_score(model, train[:16], pad_id)             # per-sample losses, 1 / ppl

Operators (:data:`OPERATORS`) act on the **response span** of a sample, the tokens from its first
to its last target (label != -100) token. The span's last token (the end-of-turn marker) is kept
so the sample still ends like a real answer; the *body* is the span without it. ``strength`` s
(``quality.strength``) sets how much replace / truncate / boilerplate change:

- ``shuffle``: the body's tokens in a random order (fluent words, no syntax: a scrambled answer).
- ``replace``: ``ceil(s * len(body))`` body tokens replaced by tokens drawn uniformly from the
  response tokens of the corpus (typos, OCR noise).
- ``swap``: the whole span replaced by another sample's span (from the same client): a fluent
  answer to another question (mislabeled data).
- ``truncate``: only the first ``max(1, floor((1 - s) * len(body)))`` body tokens kept (a cut-off
  answer).
- ``boilerplate``: a boilerplate sentence (:data:`BOILERPLATE`) repeated ``max(1, round(s *
  len(body) / len(sentence)))`` times, appended to the body (scraped page furniture).

Corrupted samples are new :class:`Sample` objects with ``meta["corruption"]`` naming the operator;
the prompt is never changed. A client with rate r corrupts ``round(r * n)`` of its n training
samples, chosen at random (seeded). Rates (:func:`client_rates`): ``quality.rates`` given
explicitly (cycled over clients), or ``rate_k = min(1, mean_rate * K * s_k)`` with shares
``s ~ Dir(alpha)``: a small alpha concentrates the corruption on a few clients, a large alpha
spreads ``mean_rate`` evenly (without alpha, every client has ``mean_rate``).

The quality score (:func:`cllora.eval.quality_score`, an evaluation, hence not in this torch-free
layer) needs no labels: the base model's mean next-token loss on a sample's response
(per sample), and per client ``1 / ppl`` over its scored samples (higher = cleaner, more
natural text). The same score weights clients under ``fed.weighting=quality``. Perplexity does
not see duplication: a repeated sentence is easy to predict, so boilerplate can raise the score
(what was measured: docs/measurement.md, "Heterogeneous clients"; tests/data/test_quality.py
checks it).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cllora.config import QualityConfig
from cllora.data.formatting import IGNORE_INDEX, Sample

OPERATORS = ("shuffle", "replace", "swap", "truncate", "boilerplate")
BOILERPLATE = "For more information, please visit our website or contact us. "


@dataclass
class CorruptionContext:
    """What operators draw from: the corpus's response tokens and the boilerplate's tokens."""

    vocab: list[int]
    boilerplate_ids: list[int]

    @staticmethod
    def from_samples(samples: Sequence[Sample], boilerplate_ids: list[int]) -> CorruptionContext:
        vocab = sorted({t for s in samples for t in s.labels if t != IGNORE_INDEX})
        return CorruptionContext(vocab=vocab, boilerplate_ids=list(boilerplate_ids))


def response_span(sample: Sample) -> tuple[int, int]:
    """``(a, b)``: the tokens from the first to the last target token (b exclusive)."""
    idx = [i for i, t in enumerate(sample.labels) if t != IGNORE_INDEX]
    if not idx:
        raise ValueError("a sample without target tokens has no response to corrupt")
    return idx[0], idx[-1] + 1


def _rebuild(sample: Sample, span: list[int], op: str, span_labels: list[int] | None = None):
    """The sample with its response span replaced by ``span`` (all trained unless given)."""
    a, b = response_span(sample)
    labels = list(span) if span_labels is None else span_labels
    meta = {**sample.meta, "corruption": op}
    return Sample(
        sample.input_ids[:a] + list(span) + sample.input_ids[b:],
        sample.labels[:a] + labels + sample.labels[b:],
        meta,
        sample.truncated,
    )


def _body(sample: Sample) -> tuple[list[int], int]:
    a, b = response_span(sample)
    return sample.input_ids[a : b - 1], sample.input_ids[b - 1]


def op_shuffle(sample: Sample, rng: random.Random, **_: Any) -> Sample:
    body, end = _body(sample)
    body = list(body)
    rng.shuffle(body)
    return _rebuild(sample, [*body, end], "shuffle")


def op_replace(
    sample: Sample, rng: random.Random, ctx: CorruptionContext, strength: float, **_: Any
) -> Sample:
    body, end = _body(sample)
    body = list(body)
    for i in rng.sample(range(len(body)), math.ceil(strength * len(body))):
        body[i] = rng.choice(ctx.vocab)
    return _rebuild(sample, [*body, end], "replace")


def op_swap(sample: Sample, rng: random.Random, pool: Sequence[Sample], **_: Any) -> Sample:
    others = [s for s in pool if s is not sample]
    if not others:
        raise ValueError("swap needs at least two samples in the client")
    other = rng.choice(others)
    a, b = response_span(other)
    return _rebuild(sample, other.input_ids[a:b], "swap", other.labels[a:b])


def op_truncate(sample: Sample, strength: float, **_: Any) -> Sample:
    body, end = _body(sample)
    keep = max(1, math.floor((1 - strength) * len(body)))
    return _rebuild(sample, [*body[:keep], end], "truncate")


def op_boilerplate(sample: Sample, ctx: CorruptionContext, strength: float, **_: Any) -> Sample:
    body, end = _body(sample)
    n = max(1, round(strength * len(body) / max(1, len(ctx.boilerplate_ids))))
    return _rebuild(sample, [*body, *(ctx.boilerplate_ids * n), end], "boilerplate")


_OPS = {
    "shuffle": op_shuffle,
    "replace": op_replace,
    "swap": op_swap,
    "truncate": op_truncate,
    "boilerplate": op_boilerplate,
}


def apply_operator(
    name: str,
    sample: Sample,
    rng: random.Random,
    ctx: CorruptionContext,
    strength: float = 0.5,
    pool: Sequence[Sample] = (),
) -> Sample:
    """One named operator applied to ``sample`` (a new sample; the input is not changed)."""
    if name not in _OPS:
        raise ValueError(f"unknown corruption operator {name!r}; allowed: {', '.join(OPERATORS)}")
    return _OPS[name](sample, rng=rng, ctx=ctx, strength=strength, pool=pool)


def client_rates(cfg: QualityConfig, num_clients: int, seed: int) -> list[float]:
    """Each client's corruption rate: explicit (cycled), Dirichlet-drawn, or ``mean_rate``."""
    if cfg.rates:
        return [float(cfg.rates[i % len(cfg.rates)]) for i in range(num_clients)]
    if cfg.alpha is None or cfg.mean_rate == 0:
        return [cfg.mean_rate] * num_clients
    shares = np.random.default_rng(seed + 104_729).dirichlet(np.full(num_clients, cfg.alpha))
    shares = np.nan_to_num(shares, nan=1.0 / num_clients)
    return [float(min(1.0, cfg.mean_rate * num_clients * s)) for s in shares]


def corrupt(
    samples: Sequence[Sample], rate: float, cfg: QualityConfig, ctx: CorruptionContext, seed: int
) -> tuple[list[Sample], dict[str, int]]:
    """Corrupt ``round(rate * n)`` randomly chosen samples with operators from ``cfg.operators``.

    Returns the samples (same order) and the count of samples per operator.
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"corruption rate {rate} is outside [0, 1]")
    rng = random.Random(seed)
    chosen = rng.sample(range(len(samples)), round(rate * len(samples)))
    out = list(samples)
    counts = {op: 0 for op in cfg.operators}
    for i in sorted(chosen):
        op = rng.choice(cfg.operators)
        out[i] = apply_operator(op, samples[i], rng, ctx, cfg.strength, samples)
        counts[op] += 1
    return out, counts
