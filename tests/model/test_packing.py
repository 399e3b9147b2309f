"""Packing: rows within the window, positions restarting per sample, no target across samples."""

from __future__ import annotations

import torch

from cllora.data.formatting import Sample
from cllora.model.attention import cu_seqlens_from_position_ids
from cllora.model.loss import IGNORE_INDEX
from cllora.model.packing import collate_packed, collate_packed_rows, pack_samples, packed_stream


def _samples(lengths: list[int], seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 1000, (n,), generator=g).tolist()
        out.append(Sample(ids, [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]))
    return out


def test_pack_samples_fills_rows_within_window_and_keeps_every_sample():
    samples = _samples([70, 3, 33, 100, 1, 64, 29, 50])
    rows = pack_samples(samples, max_length=100)
    assert all(sum(len(s.input_ids) for s in r) <= 100 for r in rows)
    assert sorted(id(s) for r in rows for s in r) == sorted(id(s) for s in samples)
    assert len(rows) == 4  # 350 tokens: first-fit decreasing reaches the lower bound


def test_collate_packed_positions_labels_and_cu_seqlens():
    samples = _samples([5, 1, 7, 4])
    b = collate_packed(samples)
    assert b["input_ids"].shape == (1, 17)
    assert b["cu_seqlens"].tolist() == [0, 5, 6, 13, 17]
    assert b["cu_seqlens"].dtype == torch.int32
    assert b["max_seqlen"] == 7
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]
    for s, start in zip(samples, b["cu_seqlens"][:-1].tolist(), strict=True):
        n = len(s.input_ids)
        assert b["input_ids"][0, start : start + n].tolist() == s.input_ids
        # the first token of a sample is never a target (of the previous sample's last token)
        assert b["labels"][0, start] == IGNORE_INDEX
        assert b["labels"][0, start + 1 : start + n].tolist() == s.labels[1:]
    found = cu_seqlens_from_position_ids(b["position_ids"])
    assert found is not None and found[0].tolist() == b["cu_seqlens"].tolist() and found[1] == 7


def test_collate_packed_rows_pads_as_an_extra_segment():
    a, b = _samples([4, 3]), _samples([2], seed=1)
    batch = collate_packed_rows([a, b], pad_id=0)
    assert batch["input_ids"].shape == (2, 7)
    assert batch["cu_seqlens"].tolist() == [0, 4, 7, 9, 14]
    assert batch["labels"][1, 2:].eq(IGNORE_INDEX).all()
    flat = cu_seqlens_from_position_ids(batch["position_ids"])
    assert flat is not None and flat[0].tolist() == batch["cu_seqlens"].tolist()


def test_packed_stream_is_seeded_and_within_window():
    samples = _samples([10, 20, 30, 40, 50, 5])
    s1 = packed_stream(samples, 60, torch.Generator().manual_seed(3))
    s2 = packed_stream(samples, 60, torch.Generator().manual_seed(3))
    for _ in range(8):
        r1, r2 = next(s1), next(s2)
        assert [id(x) for x in r1] == [id(x) for x in r2]
        assert sum(len(x.input_ids) for x in r1) <= 60
