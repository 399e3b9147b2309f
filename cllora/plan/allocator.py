"""A model of PyTorch's CUDA caching allocator, replayed on a planned step's allocations.

Usage::

    from cllora.plan.allocator import CachingAllocator, OutOfMemory, replay
    from cllora.plan.allocator import compact_snapshot, summarize

    alloc = CachingAllocator(cap_bytes=24 * 2**30)     # set_per_process_memory_fraction's cap
    block = alloc.malloc(300 * 2**20)
    alloc.free(block)
    alloc.peak_allocated, alloc.peak_reserved
    result = replay(events, cap_bytes=24 * 2**30)      # events: StepTracker.events
    alloc.layout()                                     # segments and their blocks, as
    summarize(compact_snapshot(torch.cuda.memory_snapshot()))  # CUDA's, compared with ...
    summarize(alloc.layout())                          # ... the model's

``torch.cuda.max_memory_allocated`` counts the blocks handed out; a cap set with
``torch.cuda.set_per_process_memory_fraction`` bounds *reserved* memory, the segments obtained
from ``cudaMalloc``, which also hold cached free blocks. A step whose allocated peak fits the
cap can still fail when the free space is scattered over segments the allocator cannot return.
This module follows ``c10/cuda/CUDACachingAllocator.cpp`` with its default configuration (one
stream, no ``expandable_segments``, no ``max_split_size_mb``, no garbage-collection threshold):

- a request is rounded up to a multiple of 512 bytes; up to 1 MiB it comes from the small pool
  (2 MiB segments), above from the large pool (20 MiB segments below 10 MiB, else the size
  rounded up to 2 MiB);
- the smallest cached free block of the pool that is large enough is used (best fit, lowest
  address among equals) and split when the rest is at least 512 bytes (small pool) or more than
  1 MiB (large pool); an unsplit block counts whole as allocated;
- a freed block merges with free neighbours of its segment and goes back to the pool;
- without a fitting block a new segment is allocated; past the cap, every segment that is
  entirely free is released (``release_cached_blocks``) and the allocation retried once; then
  it is an out-of-memory error (:class:`OutOfMemory`).
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20  # largest request of the small pool
SMALL_BUFFER = 2 << 20  # small-pool segment
LARGE_BUFFER = 20 << 20  # large-pool segment for requests below MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


class OutOfMemory(RuntimeError):
    """A request the capped allocator cannot serve."""


@dataclass(eq=False)
class Block:
    size: int
    segment: int
    offset: int
    small: bool
    free: bool = True
    prev: Block | None = field(default=None, repr=False)
    next: Block | None = field(default=None, repr=False)
    rank: float = 0.0  # the segment's place in address order (see ORDERS)

    def key(self) -> tuple[int, float, int]:
        return (self.size, self.rank, self.offset)


# Where a new segment lies among the others, which decides the best fit among free blocks of
# one size (CUDA takes the lowest address; cudaMalloc's placement is the driver's and unknown
# here): "oldest" (segments in the order they were obtained), "newest" (the reverse), or
# "random:SEED" (a seeded shuffle). The replayed search's answer moves with it
# (benchmarks/results/plan-h200.md): it is one of the model's uncertainties.
ORDERS = ("oldest", "newest", "random:SEED")


def segment_ranker(order: str) -> Callable[[int], float]:
    """Segment number -> rank in address order for ``order`` (one of :data:`ORDERS`);
    ValueError for another."""
    if order == "oldest":
        return float
    if order == "newest":
        return lambda segment: -float(segment)
    if order.startswith("random:") and order[7:].isdigit():
        rng = random.Random(int(order[7:]))
        return lambda segment: rng.random()
    raise ValueError(f"unknown block order {order!r}; use one of {', '.join(ORDERS)}")


def round_size(size: int) -> int:
    return MIN_BLOCK if size < MIN_BLOCK else MIN_BLOCK * math.ceil(size / MIN_BLOCK)


def allocation_size(size: int) -> int:
    """Bytes of the segment ``cudaMalloc`` gets for a rounded request that fits nowhere."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * math.ceil(size / ROUND_LARGE)


class CachingAllocator:
    """See the module docstring; ``cap_bytes`` None: no cap."""

    def __init__(self, cap_bytes: float | None = None, order: str = "oldest") -> None:
        self.cap = cap_bytes
        self._rank = segment_ranker(order)
        self.pools: dict[bool, list[tuple[tuple[int, int, int], Block]]] = {True: [], False: []}
        self.segments = 0
        self.allocated = self.reserved = 0
        self.peak_allocated = self.peak_reserved = 0
        self._heads: dict[int, Block] = {}  # segment -> its first block (never merged away)
        self.failure_layout: list[dict] | None = None  # the layout when OutOfMemory was raised

    # -------------------------------------------------------------- pools

    def _insert(self, block: Block) -> None:
        bisect.insort(self.pools[block.small], (block.key(), block), key=lambda e: e[0])

    def _remove(self, block: Block) -> None:
        pool = self.pools[block.small]
        i = bisect.bisect_left(pool, block.key(), key=lambda e: e[0])
        while pool[i][1] is not block:
            i += 1
        del pool[i]

    def _best_fit(self, size: int, small: bool) -> Block | None:
        pool = self.pools[small]
        i = bisect.bisect_left(pool, (size, -math.inf, -1), key=lambda e: e[0])
        return pool[i][1] if i < len(pool) else None

    # -------------------------------------------------------------- segments

    def _new_segment(self, size: int, small: bool) -> Block:
        alloc = allocation_size(size)
        if self.cap is not None and self.reserved + alloc > self.cap:
            self.empty_cache()
            if self.reserved + alloc > self.cap:
                self.failure_layout = self.layout()
                raise OutOfMemory(
                    f"{size / 2**20:.1f} MiB requested, {self.allocated / 2**30:.2f} GiB "
                    f"allocated, {self.reserved / 2**30:.2f} GiB reserved, cap "
                    f"{self.cap / 2**30:.2f} GiB"
                )
        self.segments += 1
        self.reserved += alloc
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        head = Block(alloc, self.segments, 0, small, rank=self._rank(self.segments))
        self._heads[self.segments] = head
        return head

    def empty_cache(self) -> None:
        """Release every segment that is entirely free (``torch.cuda.empty_cache``)."""
        for small in (True, False):
            whole = [b for _, b in self.pools[small] if b.prev is None and b.next is None]
            for b in whole:
                self._remove(b)
                self.reserved -= b.size
                del self._heads[b.segment]

    # -------------------------------------------------------------- malloc / free

    def malloc(self, nbytes: int) -> Block:
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        block = self._best_fit(size, small)
        if block is not None:
            self._remove(block)
        else:
            block = self._new_segment(size, small)
        rest = block.size - size
        if (small and rest >= MIN_BLOCK) or (not small and rest > SMALL_SIZE):
            tail = Block(rest, block.segment, block.offset + size, small, True, block, block.next,
                         block.rank)  # fmt: skip
            if block.next is not None:
                block.next.prev = tail
            block.next, block.size = tail, size
            self._insert(tail)
        block.free = False
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def free(self, block: Block) -> None:
        block.free = True
        self.allocated -= block.size
        for other in (block.prev, block.next):
            if other is not None and other.free:
                self._remove(other)
                if other is block.prev:
                    other.size += block.size
                    other.next = block.next
                    if block.next is not None:
                        block.next.prev = other
                    block = other
                else:
                    block.size += other.size
                    block.next = other.next
                    if other.next is not None:
                        other.next.prev = block
        self._insert(block)

    def reset_peak(self) -> None:
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    def layout(self) -> list[dict]:
        """Every segment in the form of :func:`compact_snapshot` (segments in the block order
        standing in for CUDA's addresses; blocks in address order)."""
        out = []
        for head in sorted(self._heads.values(), key=lambda b: b.rank):
            blocks, b = [], head
            while b is not None:
                blocks.append([b.size, not b.free])
                b = b.next
            out.append({"pool": "small" if head.small else "large",
                        "size": sum(n for n, _ in blocks), "blocks": blocks})  # fmt: skip
        return out


def compact_snapshot(snapshot: list[dict]) -> list[dict]:
    """``torch.cuda.memory_snapshot()`` (one dict per segment: ``segment_type``, ``address``,
    ``total_size``, ``blocks`` with ``size`` and ``state``) as ``{"pool", "size", "blocks":
    [[size, allocated], ...]}`` per segment, in address order: what :meth:`CachingAllocator.layout`
    gives, JSON-ready. A block waiting on another stream (``active_pending_free``) counts as
    allocated, as it cannot be handed out yet."""
    out = []
    for seg in sorted(snapshot, key=lambda seg: seg["address"]):
        blocks = [[int(b["size"]), b["state"] != "inactive"] for b in seg["blocks"]]
        out.append({"pool": seg["segment_type"], "size": int(seg["total_size"]),
                    "blocks": blocks})  # fmt: skip
    return out


def summarize(layout: list[dict]) -> dict[str, int]:
    """What decides whether the next request fits: ``reserved`` and ``allocated`` bytes,
    ``segments``, ``stranded`` (free bytes in segments that also hold an allocated block:
    ``empty_cache`` cannot return them) and the ``largest_free`` block of the large pool."""
    reserved = allocated = stranded = largest = 0
    for seg in layout:
        live = sum(n for n, used in seg["blocks"] if used)
        reserved += seg["size"]
        allocated += live
        if live:
            stranded += seg["size"] - live
        if seg["pool"] == "large":
            largest = max([largest] + [n for n, used in seg["blocks"] if not used])
    return {"reserved": reserved, "allocated": allocated, "segments": len(layout),
            "stranded": stranded, "largest_free": largest}  # fmt: skip


@dataclass
class Replay:
    """The allocator after a replayed event list."""

    ok: bool
    peak_allocated: int
    peak_reserved: int
    error: str = ""


class LiveReplay:
    """Feeds ``(serial, nbytes)`` events (``nbytes`` > 0: allocation, 0: free of ``serial``) to
    ``alloc`` as they happen: the :class:`~cllora.plan.tracker.StepTracker` ``listener`` of a
    traced run, so an allocation past the cap raises :class:`OutOfMemory` from the operator that
    allocates, as on CUDA. A free that arrives while an event is served (a garbage collection
    inside it) waits until that event is done; frees of unknown serials are ignored."""

    def __init__(self, alloc: CachingAllocator) -> None:
        self.alloc = alloc
        self.live: dict[int, Block] = {}
        self._busy = False
        self._pending: list[int] = []

    def __call__(self, serial: int, nbytes: int) -> None:
        if self._busy:
            self._pending.append(serial)
            return
        self._busy = True
        try:
            if nbytes:
                self.live[serial] = self.alloc.malloc(nbytes)
            else:
                self._free(serial)
        finally:
            while self._pending:
                self._free(self._pending.pop(0))
            self._busy = False

    def _free(self, serial: int) -> None:
        block = self.live.pop(serial, None)
        if block is not None:
            self.alloc.free(block)

    def free_all_but(self, keep: set[int]) -> int:
        """Free every live block whose serial is not in ``keep``; returns the bytes freed."""
        gone = [s for s in self.live if s not in keep]
        freed = sum(self.live[s].size for s in gone)
        for serial in gone:
            self._free(serial)
        return freed


def replay(
    events: list[tuple[int, int]], cap_bytes: float | None = None, step_start: int = 0
) -> Replay:
    """Replay ``(serial, nbytes)`` events (see :class:`LiveReplay`) through a fresh
    :class:`CachingAllocator`; ``torch.cuda.empty_cache()`` and a peak reset happen before
    event ``step_start``, as the benchmark does before each measured step."""
    alloc = CachingAllocator(cap_bytes)
    feed = LiveReplay(alloc)
    try:
        for i, (serial, nbytes) in enumerate(events):
            if i == step_start:
                alloc.empty_cache()
                alloc.reset_peak()
            feed(serial, nbytes)
    except OutOfMemory as err:
        return Replay(False, alloc.peak_allocated, alloc.peak_reserved, str(err))
    return Replay(True, alloc.peak_allocated, alloc.peak_reserved)
