"""Greedy answers to test prompts, scored against the samples' references (ROUGE-L, token F1).

Usage::

    from cllora.generation import generate_answers, reference_text, score_answers
    answers = generate_answers(model, tokenizer, samples, max_new_tokens=64)  # [Answer(text, n)]
    references = [reference_text(tokenizer, s) for s in samples]
    scores = score_answers([a.text for a in answers], references)   # [Score(rouge_l, f1), ...]

**Prompt and reference** (:func:`split_sample`): a sample's prompt is its tokens before its first
target token (the first label that is not -100 after position 0: the system and user turns and
the assistant header of the chat template); its reference is the first run of target tokens
from there (the first assistant turn: its content and the token that closes it, which decodes to
nothing). Both are what the sample holds: a sample cut by its context window has a cut
reference. With ``data.response_only=false`` every token is a target, the prompt is the first
token, and the score is one of free continuation.

**Generation**: greedy (``do_sample=False``), at most ``max_new_tokens`` new tokens, stopping at
the tokenizer's and the model's end-of-sequence tokens; prompts of similar length are batched
with left padding (``batch_size``; why batched: docs/ARCHITECTURE.md, "Generation"). The model
is left in eval mode, as :func:`cllora.eval.evaluate_samples` leaves it.

**Scores** (:func:`score_answers`), from torchmetrics: ``rouge_l`` is the ROUGE-L F-measure
(``torchmetrics.functional.text.rouge_score``, longest common subsequence of lower-cased
alphanumeric words, no stemming), ``f1`` the SQuAD token F1 (``torchmetrics.functional.text.
squad``: lower-cased words without punctuation and articles; reported in [0, 1], not percent).
Both are in [0, 1], higher = better. torchmetrics is imported on first use (it takes seconds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cllora.data.formatting import IGNORE_INDEX, Sample
from cllora.eval import length_batches


@dataclass(frozen=True)
class Answer:
    """A decoded greedy answer (special tokens left out, stripped) and its generated tokens
    (end-of-sequence left out)."""

    text: str
    new_tokens: int


@dataclass(frozen=True)
class Score:
    """One answer's scores against its reference, each in [0, 1] (higher = better)."""

    rouge_l: float
    f1: float


def split_sample(sample: Sample) -> tuple[list[int], list[int]]:
    """(prompt token ids, reference token ids) of ``sample`` (module doc)."""
    labels = sample.labels
    start = next((i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX), None)
    if start is None:
        raise ValueError(f"sample {sample.meta.get('where', '?')} has no target token")
    stop = next((i for i in range(start, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
    return list(sample.input_ids[:start]), list(sample.input_ids[start:stop])


def reference_text(tokenizer: Any, sample: Sample) -> str:
    """The decoded reference of ``sample`` (special tokens left out, stripped)."""
    return tokenizer.decode(split_sample(sample)[1], skip_special_tokens=True).strip()


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every end-of-sequence id: the tokenizer's and the model's generation config's."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return sorted(i for i in ids if i is not None)


def _left_pad(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def _cut_at_eos(new: list[int], eos: Sequence[int]) -> list[int]:
    """The generated ids before the first end-of-sequence id (padding after it dropped)."""
    for i, t in enumerate(new):
        if t in eos:
            return new[:i]
    return new


@torch.no_grad()
def generate_ids(
    model: Any,
    prompts: Sequence[list[int]],
    pad_id: int,
    eos: Sequence[int],
    max_new_tokens: int,
    batch_size: int = 8,
    desc: str | None = None,
    progress: bool = False,
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token ids, end-of-sequence left out), batched by
    length with left padding; the model is left in eval mode."""
    from transformers import GenerationConfig

    model.eval()
    device = next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(eos),
        pad_token_id=pad_id, num_beams=1,
    )  # fmt: skip
    out: list[list[int]] = [[] for _ in prompts]
    for idx in length_batches([len(p) for p in prompts], batch_size, desc, progress):
        ids, mask = _left_pad([prompts[i] for i in idx], pad_id)
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
        )
        for row, i in zip(gen[:, ids.shape[1] :].tolist(), idx, strict=True):
            out[i] = _cut_at_eos(row, eos)
    return out


def generate_answers(
    model: Any,
    tokenizer: Any,
    samples: Sequence[Sample],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    desc: str | None = None,
    progress: bool = False,
) -> list[Answer]:
    """The model's greedy answer to each sample's prompt (module doc)."""
    prompts = [split_sample(s)[0] for s in samples]
    if not prompts:
        return []
    new = generate_ids(
        model, prompts, tokenizer.pad_token_id, eos_ids(model, tokenizer), max_new_tokens,
        batch_size, desc, progress,
    )  # fmt: skip
    return [
        Answer(tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids)) for ids in new
    ]


def score_answers(answers: Sequence[str], references: Sequence[str]) -> list[Score]:
    """ROUGE-L F-measure and SQuAD token F1 of each answer against its reference."""
    from torchmetrics.functional.text import rouge_score, squad

    out = []
    for answer, reference in zip(answers, references, strict=True):
        rouge = rouge_score(answer, reference, rouge_keys="rougeL")["rougeL_fmeasure"]
        pred = [{"prediction_text": answer, "id": "0"}]
        target = [{"answers": {"answer_start": [0], "text": [reference]}, "id": "0"}]
        f1 = squad(pred, target)["f1"] / 100.0
        out.append(Score(rouge_l=float(rouge), f1=float(f1)))
    return out
