"""The benchmark's max-context search, replayed on fake tensors through one caching allocator.

Usage::

    from cllora.plan.search import replay_probes, replay_search
    from cllora.plan.step import PlanSpec

    spec = PlanSpec(provider="cllora-4bit", lora_path="legacy", gqa="repeat")
    best, probes = replay_search(spec, budget_gib=24.0, hi=65536)      # the search's answer
    [(p.context, p.ok, p.peak_allocated / 2**30) for p in probes]      # its probes, in order
    probes = replay_probes(spec, 24.0, [32768, 16384, 24576])          # a given sequence

``benchmarks/bench_e2e.py --find-max-context`` on CUDA (``max_context_cuda``) runs every probe
of its binary search in **one** process: it caps the caching allocator
(``torch.cuda.set_per_process_memory_fraction``) before building the model once, then for each
probe calls ``torch.cuda.empty_cache()`` and ``reset_peak_memory_stats()``, runs one training
step (forward, backward, ``AdamW.step``) and catches ``torch.OutOfMemoryError``; either way
``zero_grad(set_to_none=True)`` follows. So what one probe leaves in the allocator is what the
next starts from: the segments the build split (4-bit weights in the blocks the dense weights
were freed from), the AdamW state made by the first step that succeeded (none before it), and
every cached segment that still holds a live block (``empty_cache`` returns only segments that
are entirely free).

This module runs the same sequence on fake tensors (:func:`cllora.plan.step.fake_session`):
every allocation and free of the build and of each probe goes, as it happens, through one
:class:`cllora.plan.allocator.CachingAllocator` capped at the budget
(:class:`cllora.plan.allocator.LiveReplay`); an allocation it refuses raises
:class:`cllora.plan.allocator.OutOfMemory` from the operator that allocates, so the step
unwinds and frees what it held as the real one does on ``torch.OutOfMemoryError``. One thing
does not unwind on fake tensors: when the error strikes inside a checkpointed layer's recompute,
the failed step's autograd graph (the checkpointed layer inputs) stays referenced from C++
after the exception is gone, even through ``gc.collect()`` (real tensors are freed, on the CPU
and on the H200, whose probe after a failed one started from the model alone); so after a
failed probe the replay frees, in the allocator, every block the probe left
(``Probe.retained``), and the next probe starts as the GPU's did. Every probe traces the full
depth (no extrapolation: the allocator's layout is not affine in the layers).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils._python_dispatch import _disable_current_modes as _disable_modes

from cllora.plan.allocator import CachingAllocator, LiveReplay, OutOfMemory
from cllora.plan.step import (
    PlanError,
    PlanSpec,
    _raw_batch,
    _step_fn,
    build_traced,
    fake_session,
    hf_config,
)
from cllora.plan.tracker import StepTracker


@dataclass
class Probe:
    """One probe of the replayed search (bytes; the peaks since the probe's reset)."""

    context: int
    ok: bool
    peak_allocated: int  # what the benchmark records: torch.cuda.max_memory_allocated
    peak_reserved: int
    allocated_after: int  # alive once the probe is over: the model, the AdamW state
    retained: int = 0  # what a failed step still held in the fake run, freed (see above)
    error: str = ""


def bisect_max(fits: Callable[[int], bool], top: int) -> int:
    """The largest ``n`` in ``[0, top]`` with ``fits(n)`` (0 if none), by the benchmark's
    binary search: it probes ``mid = (lo + top + 1) // 2`` and keeps the half that can hold it."""
    lo = 0
    while lo < top:
        mid = (lo + top + 1) // 2
        lo, top = (mid, top) if fits(mid) else (lo, mid - 1)
    return lo


@contextlib.contextmanager
def benchmark_process(spec: PlanSpec, budget_gib: float) -> Iterator[Callable[[int], Probe]]:
    """Inside: the benchmark's search process on fake tensors (see the module docstring), the
    model built once under the capped allocator; yields ``probe(context) -> Probe``."""
    config = hf_config(spec.model)
    alloc = CachingAllocator(budget_gib * 2**30)
    with fake_session(spec) as tracker:
        tracker.listener = LiveReplay(alloc)
        try:
            model, _, opt = build_traced(spec, config, tracker)
        except OutOfMemory as err:
            raise PlanError(f"{spec.provider} on {spec.model} does not fit: {err}") from err

        def probe(context: int) -> Probe:
            return _probe(dataclasses.replace(spec, context=context), model, opt, tracker)

        yield probe


def _probe(spec: PlanSpec, model: Any, opt: Any, tracker: StepTracker) -> Probe:
    """One probe as ``max_context_cuda`` runs it (the step's closure dropped as there, before
    ``AdamW.step``); after an out-of-memory error, what the failed step still holds in the fake
    run is freed in the allocator (see the module docstring)."""
    feed = tracker.listener
    alloc = feed.alloc
    alloc.empty_cache()
    alloc.reset_peak()
    before = set(feed.live)
    error, retained = "", 0
    try:
        with _disable_modes():  # the batch is made on the host, as the benchmark's
            raw = _raw_batch(spec, model.config.vocab_size)
        tracker.phase = "forward"
        _step_fn(spec, model, tracker, raw)()
        tracker.phase = "optimizer"
        opt.step()
    except OutOfMemory as err:
        error = str(err)
    opt.zero_grad(set_to_none=True)
    if error:
        retained = feed.free_all_but(before)
    tracker.ops.clear()
    return Probe(spec.context, not error, alloc.peak_allocated, alloc.peak_reserved,
                 alloc.allocated, retained, error)  # fmt: skip


def replay_probes(spec: PlanSpec, budget_gib: float, contexts: list[int]) -> list[Probe]:
    """The probes at ``contexts``, in this order, in one replayed benchmark process."""
    with benchmark_process(spec, budget_gib) as probe:
        return [probe(c) for c in contexts]


def replay_search(
    spec: PlanSpec,
    budget_gib: float,
    hi: int,
    step: int = 256,
    log: Callable[[str], None] | None = None,
) -> tuple[int, list[Probe]]:
    """The benchmark's max-context search (multiples of ``step`` up to ``hi``: its
    ``--max-context-hi``, which puts the first probe at about ``hi / 2``) replayed in one
    process; returns the longest context that fitted (0: none) and the probes in order."""
    probes: list[Probe] = []
    with benchmark_process(spec, budget_gib) as probe:

        def fits(units: int) -> bool:
            p = probe(units * step)
            probes.append(p)
            if log:
                log(f"  replayed probe {spec.provider} {p.context}: {'ok' if p.ok else 'oom'} "
                    f"(allocated {p.peak_allocated / 2**30:.2f} GiB, reserved "
                    f"{p.peak_reserved / 2**30:.2f} GiB)")  # fmt: skip
            return p.ok

        best = bisect_max(fits, hi // step)
    return best * step, probes
