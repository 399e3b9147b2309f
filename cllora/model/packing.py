"""Packing without padding: samples concatenated into rows up to the context window.

Usage::

    from cllora.model.packing import pack_samples, collate_packed

    rows = pack_samples(samples, max_length=4096)       # list[list[Sample]], first-fit decreasing
    batch = collate_packed(rows[0])                     # one packed row, batch dimension 1
    batch["input_ids"]      # (1, T) the samples back to back, T = total tokens, no padding
    batch["position_ids"]   # (1, T) 0..len-1 restarting at every sample (RoPE per sample)
    batch["labels"]         # (1, T) -100 at each sample's first token: no target crosses a boundary
    batch["cu_seqlens"]     # (S+1,) int32 cumulative sample lengths [0, l0, l0+l1, ...]
    batch["max_seqlen"]     # int, the longest sample
    loss_sum, n = batch_loss_sum(model, batch)   # cllora.model.loss; packed attention on

Labels stay aligned with ``input_ids`` (the model shifts them, as in :mod:`cllora.model.batching`);
setting the label of each sample's first token to -100 means position ``t`` (the last token of
sample ``i``) never predicts the first token of sample ``i+1``. The attention side (never attend
across a boundary) is :mod:`cllora.model.attention`'s job; it reads ``cu_seqlens`` or derives
it from ``position_ids``.

``collate_packed_rows`` stacks several rows (each right-padded to the longest row, pad positions
being one extra segment whose labels are -100) for a batch dimension > 1; one row per step is the
usual packed layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from cllora.data.formatting import IGNORE_INDEX, Sample


def pack_samples(samples: Sequence[Sample], max_length: int) -> list[list[Sample]]:
    """Group samples into rows of at most ``max_length`` tokens (first-fit decreasing).

    A sample longer than ``max_length`` is an error (truncate or drop when formatting).
    The grouping is deterministic for a given input order.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))
    rows: list[list[Sample]] = []
    room: list[int] = []
    for i in order:
        n = len(samples[i].input_ids)
        if n > max_length:
            raise ValueError(f"sample of {n} tokens is longer than the window {max_length}")
        if n == 0:
            continue
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([])
            room.append(max_length)
            slot = len(rows) - 1
        rows[slot].append(samples[i])
        room[slot] -= n
    return rows


def packed_stream(
    samples: Sequence[Sample], max_length: int, generator: torch.Generator
) -> Iterator[list[Sample]]:
    """Endless packed rows: a seeded permutation per epoch, filled greedily in that order.

    Each yielded row holds consecutive samples of the permutation whose lengths sum to at most
    ``max_length`` (the training counterpart of :func:`cllora.model.batching.batch_stream`).
    """
    if not samples:
        raise ValueError("cannot draw rows from an empty sample list")
    row: list[Sample] = []
    used = 0
    while True:
        for i in torch.randperm(len(samples), generator=generator).tolist():
            s = samples[i]
            n = len(s.input_ids)
            if n > max_length:
                raise ValueError(f"sample of {n} tokens is longer than the window {max_length}")
            if row and used + n > max_length:
                yield row
                row, used = [], 0
            row.append(s)
            used += n


def collate_packed(row: Sequence[Sample]) -> dict[str, torch.Tensor | int]:
    """One packed row as a batch of size 1 (see the module docstring for the keys)."""
    if not row:
        raise ValueError("cannot collate an empty row")
    lengths = [len(s.input_ids) for s in row]
    ids = torch.tensor([t for s in row for t in s.input_ids], dtype=torch.long)  # (T,)
    labels = torch.tensor([t for s in row for t in s.labels], dtype=torch.long)  # (T,)
    cu = torch.zeros(len(row) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    starts = cu[:-1].long()
    labels[starts] = IGNORE_INDEX  # a sample's first token is never the target of the previous one
    pos = torch.arange(int(cu[-1]), dtype=torch.long) - torch.repeat_interleave(
        starts, torch.tensor(lengths)
    )  # (T,) 0.. per sample
    return {
        "input_ids": ids[None],
        "labels": labels[None],
        "position_ids": pos[None],
        "cu_seqlens": cu,
        "max_seqlen": max(lengths),
    }


def collate_packed_rows(rows: Sequence[Sequence[Sample]], pad_id: int) -> dict:
    """Several packed rows as a (B, T) batch; rows shorter than the longest are right-padded.

    Padding forms its own segment (position ids restart at 0, labels -100), so ``cu_seqlens``
    over the flattened (B*T,) tokens still describes every segment exactly.
    """
    packed = [collate_packed(r) for r in rows]
    width = max(p["input_ids"].shape[1] for p in packed)
    ids, labels, pos, cus, max_len = [], [], [], [], 0
    offset = 0
    for p in packed:
        n = p["input_ids"].shape[1]
        pad = width - n
        ids.append(torch.cat([p["input_ids"][0], torch.full((pad,), pad_id, dtype=torch.long)]))
        labels.append(torch.cat([p["labels"][0], torch.full((pad,), IGNORE_INDEX)]))
        pos.append(torch.cat([p["position_ids"][0], torch.arange(pad)]))
        cu = p["cu_seqlens"] + offset
        cus.append(cu[:-1])
        if pad:
            cus.append(torch.tensor([offset + n], dtype=torch.int32))
        offset += width
        max_len = max(max_len, p["max_seqlen"], pad)
    cus.append(torch.tensor([offset], dtype=torch.int32))
    return {
        "input_ids": torch.stack(ids),
        "labels": torch.stack(labels),
        "position_ids": torch.stack(pos),
        "cu_seqlens": torch.cat(cus),
        "max_seqlen": max_len,
    }
