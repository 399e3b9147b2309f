"""Batches for training and evaluation: padding collation and a seeded per-client batch stream.

Usage::

    from cllora.model.batching import collate, batch_stream

    batch = collate(samples[:4], pad_id=tokenizer.pad_token_id)   # dict of (B, T) tensors
    stream = batch_stream(samples, batch_size=4, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        batch = next(stream)

Sequences are right-padded to the longest in the batch; padded positions have attention 0 and
label -100. The stream walks the samples in a fresh seeded permutation per epoch, so a client's
batches depend only on its generator (deterministic runs). Packing without padding:
:mod:`cllora.model.packing`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from cllora.data.formatting import IGNORE_INDEX, Sample


def collate(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad samples into ``input_ids``, ``attention_mask`` and ``labels`` of shape (B, T)."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_stream(
    samples: Sequence[Sample], batch_size: int, generator: torch.Generator
) -> Iterator[list[Sample]]:
    """Endless batches of ``batch_size`` samples, reshuffled each epoch with ``generator``."""
    if not samples:
        raise ValueError("cannot draw batches from an empty sample list")
    order: list[int] = []
    while True:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = torch.randperm(len(samples), generator=generator).tolist()
            batch.append(samples[order.pop()])
        yield batch
