"""Evaluation: token-weighted loss and perplexity of a model on samples.

Usage::

    from cllora.eval import evaluate
    result = evaluate(model, test_samples, pad_id=tokenizer.pad_token_id, batch_size=8)
    result.loss, result.ppl, result.tokens

Losses of several sets combine exactly through their sums: ``EvalResult.combine([...])`` gives the
loss of the union (this is how the global test loss is formed from the clients' test sets).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from cllora.data.batching import collate, eval_batches
from cllora.data.formatting import Sample
from cllora.model.loss import lm_loss_sum


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


@torch.no_grad()
def evaluate(
    model: PreTrainedModel,
    samples: Sequence[Sample],
    pad_id: int,
    batch_size: int = 8,
    desc: str | None = None,
    progress: bool = False,
) -> EvalResult:
    """Mean next-token loss over every target token of ``samples`` (model left in eval mode)."""
    model.eval()
    loss_sum, tokens = 0.0, 0
    n_batches = math.ceil(len(samples) / batch_size)
    bar = tqdm(
        eval_batches(samples, batch_size),
        total=n_batches,
        desc=desc,
        leave=False,
        disable=not progress,
    )
    for batch in bar:
        b = collate(batch, pad_id)
        s, n = lm_loss_sum(model, b["input_ids"], b["attention_mask"], b["labels"])
        loss_sum += float(s)
        tokens += n
    return EvalResult(loss_sum, tokens)
