"""The caching-allocator model: rounding, best fit, splitting, merging, the capped retry."""

from __future__ import annotations

import pytest

from cllora.plan.allocator import (
    CachingAllocator,
    LiveReplay,
    OutOfMemory,
    allocation_size,
    compact_snapshot,
    replay,
    summarize,
)

MiB = 2**20


def test_rounding_and_segment_sizes():
    assert allocation_size(100) == 2 * MiB  # small pool
    assert allocation_size(3 * MiB) == 20 * MiB  # large pool, below 10 MiB
    assert allocation_size(11 * MiB + 1) == 12 * MiB  # rounded up to 2 MiB
    alloc = CachingAllocator()
    b = alloc.malloc(1)
    assert b.size == 512 and alloc.reserved == 2 * MiB


def test_freed_blocks_are_reused_split_and_merged():
    alloc = CachingAllocator()
    a = alloc.malloc(100 * MiB)
    alloc.free(a)
    b = alloc.malloc(40 * MiB)  # best fit: the cached 100 MiB segment, split
    c = alloc.malloc(40 * MiB)
    assert alloc.reserved == 100 * MiB and b.segment == c.segment == a.segment
    alloc.free(b)
    alloc.free(c)  # merges back into one free 100 MiB block
    d = alloc.malloc(100 * MiB)
    assert alloc.reserved == 100 * MiB and d.offset == 0


def test_a_rest_of_at_most_1_mib_is_not_split_and_counts_as_allocated():
    alloc = CachingAllocator()
    alloc.free(alloc.malloc(100 * MiB))
    b = alloc.malloc(99 * MiB + 512)
    assert b.size == 100 * MiB and alloc.allocated == 100 * MiB


def test_cap_releases_whole_free_segments_then_fails_on_fragments():
    alloc = CachingAllocator(cap_bytes=100 * MiB)
    alloc.free(alloc.malloc(60 * MiB))  # a cached, entirely free segment
    alloc.malloc(80 * MiB)  # does not fit it: released, then a new segment fits under the cap
    assert alloc.reserved == 80 * MiB
    frag = CachingAllocator(cap_bytes=100 * MiB)
    frag.free(frag.malloc(60 * MiB))
    keep = frag.malloc(30 * MiB)  # splits the cached segment: its free 30 MiB cannot be released
    with pytest.raises(OutOfMemory):
        frag.malloc(50 * MiB)  # 60 reserved + 50 > 100 although only 30 are allocated
    assert keep.size == 30 * MiB and frag.reserved == 60 * MiB


def test_replay_resets_the_peak_at_the_step():
    events = [(1, 50 * MiB), (1, 0), (2, 10 * MiB), (3, 20 * MiB), (2, 0), (3, 0)]
    result = replay(events, cap_bytes=None, step_start=2)
    assert result.ok and result.peak_allocated == 30 * MiB
    assert not replay(events, cap_bytes=25 * MiB, step_start=2).ok


def test_live_replay_raises_at_the_cap_and_defers_frees_during_an_event():
    alloc = CachingAllocator(cap_bytes=100 * MiB)
    feed = LiveReplay(alloc)
    feed(1, 60 * MiB)
    with pytest.raises(OutOfMemory):
        feed(2, 50 * MiB)  # 60 + 50 > 100: refused, not recorded
    assert set(feed.live) == {1} and alloc.allocated == 60 * MiB
    feed(2, 0)  # the free of a refused allocation is ignored
    feed._busy = True  # as if a garbage collection freed block 1 inside another event:
    feed(1, 0)
    assert alloc.allocated == 60 * MiB  # it waits for that event to be done
    feed._busy = False
    feed(3, 10 * MiB)  # served after this event
    assert set(feed.live) == {3} and alloc.allocated == 10 * MiB
    assert feed.free_all_but({4}) == 10 * MiB and alloc.allocated == 0


def test_layout_lists_segments_and_summarize_finds_what_cannot_be_returned():
    alloc = CachingAllocator()
    alloc.free(alloc.malloc(100 * MiB))
    keep = alloc.malloc(30 * MiB)  # splits the cached 100 MiB segment
    small = alloc.malloc(1000)
    spare = alloc.malloc(80 * MiB)  # does not fit the 70 MiB left: a segment of its own
    alloc.free(spare)
    assert alloc.layout() == [
        {"pool": "large", "size": 100 * MiB, "blocks": [[30 * MiB, True], [70 * MiB, False]]},
        {"pool": "small", "size": 2 * MiB, "blocks": [[1024, True], [2 * MiB - 1024, False]]},
        {"pool": "large", "size": 80 * MiB, "blocks": [[80 * MiB, False]]},
    ]
    summary = summarize(alloc.layout())
    assert summary == {"reserved": 182 * MiB, "allocated": 30 * MiB + 1024, "segments": 3,
                       "stranded": 70 * MiB + 2 * MiB - 1024, "largest_free": 80 * MiB}  # fmt: skip
    alloc.empty_cache()  # only the entirely free segment goes
    assert [s["size"] for s in alloc.layout()] == [100 * MiB, 2 * MiB]
    assert keep.size == 30 * MiB and small.size == 1024


def test_the_layout_at_a_failure_is_kept():
    alloc = CachingAllocator(cap_bytes=100 * MiB)
    alloc.free(alloc.malloc(60 * MiB))
    alloc.malloc(30 * MiB)
    with pytest.raises(OutOfMemory):
        alloc.malloc(50 * MiB)
    assert alloc.failure_layout == alloc.layout()
    assert summarize(alloc.failure_layout)["stranded"] == 30 * MiB


def test_compact_snapshot_reads_cudas_segment_list():
    """``torch.cuda.memory_snapshot()``'s segments (the fields it documents), out of address
    order, pending frees counted as allocated."""
    snapshot = [
        {"address": 2 << 30, "total_size": 2 * MiB, "segment_type": "small", "stream": 0,
         "blocks": [{"address": 2 << 30, "size": 512, "state": "active_allocated"},
                    {"address": (2 << 30) + 512, "size": 2 * MiB - 512, "state": "inactive"}]},
        {"address": 1 << 30, "total_size": 40 * MiB, "segment_type": "large", "stream": 0,
         "blocks": [{"address": 1 << 30, "size": 40 * MiB, "state": "active_pending_free"}]},
    ]  # fmt: skip
    assert compact_snapshot(snapshot) == [
        {"pool": "large", "size": 40 * MiB, "blocks": [[40 * MiB, True]]},
        {"pool": "small", "size": 2 * MiB, "blocks": [[512, True], [2 * MiB - 512, False]]},
    ]


def test_the_order_of_equal_size_blocks_decides_which_one_is_split():
    """Two cached 100 MiB segments: ``oldest`` splits the first obtained, ``newest`` the other;
    a seeded ``random`` order is the same every time; an unknown order is refused."""
    picks = {}
    for order in ("oldest", "newest", "random:3", "random:3"):
        alloc = CachingAllocator(order=order)
        a, b = alloc.malloc(100 * MiB), alloc.malloc(100 * MiB)
        alloc.free(a)
        alloc.free(b)
        picks.setdefault(order, []).append(alloc.malloc(40 * MiB).segment)
        assert [len(s["blocks"]) for s in alloc.layout()].count(2) == 1
    assert picks["oldest"] == [1] and picks["newest"] == [2]
    assert len(set(picks["random:3"])) == 1
    with pytest.raises(ValueError, match="unknown block order"):
        CachingAllocator(order="lowest")
