"""Evaluation: token-weighted loss and perplexity of a model on samples, per sample or in total.

Usage::

    from cllora.eval import by_bucket, evaluate, evaluate_samples
    result = evaluate(model, test_samples, pad_id=tokenizer.pad_token_id, batch_size=8)
    result.loss, result.ppl, result.tokens
    per_sample = evaluate_samples(model, test_samples, pad_id)      # one EvalResult each
    by_bucket(test_samples, per_sample, edges=[128, 256])           # {"<128": EvalResult, ...}
    by_bucket(test_samples, per_sample, [3, 6], "sentences")        # {"<3sent": ..., ...}

Losses of several sets combine exactly through their sums: ``EvalResult.combine([...])`` gives the
loss of the union (this is how the global test loss is formed from the clients' test sets, and how
a length bucket's loss is formed from its samples).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from cllora.data.formatting import Sample
from cllora.model.batching import collate
from cllora.model.loss import row_loss_sums


@dataclass
class EvalResult:
    loss_sum: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens if self.tokens else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0)) if self.tokens else float("nan")

    @staticmethod
    def combine(results: Sequence[EvalResult]) -> EvalResult:
        return EvalResult(sum(r.loss_sum for r in results), sum(r.tokens for r in results))

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "ppl": self.ppl, "tokens": self.tokens}


def length_batches(
    lengths: Sequence[int], batch_size: int, desc: str | None = None, progress: bool = False
) -> Iterator[list[int]]:
    """Indices of the items in batches of ``batch_size``, shortest first, so each batch pads
    little (the one batching of evaluation and generation); a progress bar when ``progress``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=not progress):
        yield order[start : start + batch_size]


@torch.no_grad()
def evaluate_samples(
    model: PreTrainedModel,
    samples: Sequence[Sample],
    pad_id: int,
    batch_size: int = 8,
    desc: str | None = None,
    progress: bool = False,
) -> list[EvalResult]:
    """Loss sum and target count of every sample (batched by length; model left in eval mode)."""
    model.eval()
    out: list[EvalResult] = [EvalResult(0.0, 0)] * len(samples)
    lengths = [s.num_tokens for s in samples]
    for idx in length_batches(lengths, batch_size, desc, progress):
        sums, counts = row_loss_sums(model, collate([samples[i] for i in idx], pad_id))
        for i, s, n in zip(idx, sums, counts, strict=True):
            out[i] = EvalResult(float(s), int(n))
    return out


def evaluate(
    model: PreTrainedModel,
    samples: Sequence[Sample],
    pad_id: int,
    batch_size: int = 8,
    desc: str | None = None,
    progress: bool = False,
) -> EvalResult:
    """Mean next-token loss over every target token of ``samples`` (model left in eval mode)."""
    return EvalResult.combine(evaluate_samples(model, samples, pad_id, batch_size, desc, progress))


def by_bucket(
    samples: Sequence[Sample],
    results: Sequence[EvalResult],
    edges: Sequence[int],
    measure: str = "tokens",
) -> dict[str, EvalResult]:
    """Results combined per length bucket of ``measure`` (tokens or sentences; label -> result,
    every bucket listed)."""
    from cllora.data.partition import bucket_index, bucket_labels, sample_length

    labels = bucket_labels(edges, measure)
    groups: dict[str, list[EvalResult]] = {label: [] for label in labels}
    for s, r in zip(samples, results, strict=True):
        groups[labels[bucket_index(sample_length(s, measure), edges)]].append(r)
    return {label: EvalResult.combine(rs) for label, rs in groups.items()}


def quality_score(
    model: PreTrainedModel,
    samples: Sequence[Sample],
    pad_id: int,
    batch_size: int = 8,
    evaluate: Callable[..., list[EvalResult]] | None = None,
) -> tuple[list[float], float]:
    """Per-sample base-model loss on the response, and the client score ``1 / ppl`` (label-free;
    see :mod:`cllora.data.quality`). ``evaluate``: another :func:`evaluate_samples` (a
    :class:`cllora.eval_cache.LossCache`'s)."""
    results = (evaluate or evaluate_samples)(model, samples, pad_id, batch_size)
    return [r.loss for r in results], 1.0 / EvalResult.combine(results).ppl
