"""The benchmark's max-context search, replayed on fake tensors through one caching allocator.

Usage::

    from cllora.plan.search import compare_layouts, replay_probes, replay_search
    from cllora.plan.step import PlanSpec

    spec = PlanSpec(provider="cllora-4bit", lora_path="legacy", gqa="repeat")
    best, probes = replay_search(spec, budget_gib=24.0, hi=65536)      # the search's answer
    [(p.context, p.ok, p.peak_allocated / 2**30) for p in probes]      # its probes, in order
    probes = replay_probes(spec, 24.0, [32768, 16384, 24576])          # a given sequence
    layouts = {}
    replay_search(spec, 24.0, 65536, layouts=layouts)                   # the segments, per stage
    compare_layouts(json.load(open("alloc-layout-cllora-4bit.json")), layouts)  # vs CUDA's

``cllora bench --find-max-context`` on CUDA (:func:`cllora.bench.cells.max_context_cuda`) runs
every probe of its binary search in **one** process: it caps the caching allocator
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
from dataclasses import dataclass, field
from typing import Any

from torch.utils._python_dispatch import _disable_current_modes as _disable_modes

from cllora.plan.allocator import CachingAllocator, LiveReplay, OutOfMemory, summarize
from cllora.plan.step import (
    PlanError,
    PlanSpec,
    build_traced,
    fake_session,
    hf_config,
    raw_batch,
    step_fn,
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
    layout_after: list[dict] = field(default_factory=list, repr=False)  # allocator.layout()
    layout_at_failure: list[dict] | None = field(default=None, repr=False)


def bisect_max(fits: Callable[[int], bool], top: int) -> int:
    """The largest ``n`` in ``[0, top]`` with ``fits(n)`` (0 if none), by the benchmark's
    binary search: it probes ``mid = (lo + top + 1) // 2`` and keeps the half that can hold it."""
    lo = 0
    while lo < top:
        mid = (lo + top + 1) // 2
        lo, top = (mid, top) if fits(mid) else (lo, mid - 1)
    return lo


class _Process:
    """The replayed benchmark process: ``process(context) -> Probe``; ``build_layout``: the
    allocator's segments once the model is built (:meth:`CachingAllocator.layout`)."""

    def __init__(self, spec: PlanSpec, model: Any, opt: Any, tracker: StepTracker) -> None:
        self.spec, self.model, self.opt, self.tracker = spec, model, opt, tracker
        self.build_layout = tracker.listener.alloc.layout()

    def __call__(self, context: int) -> Probe:
        spec = dataclasses.replace(self.spec, context=context)
        return _probe(spec, self.model, self.opt, self.tracker)


@contextlib.contextmanager
def benchmark_process(
    spec: PlanSpec, budget_gib: float, order: str = "oldest"
) -> Iterator[_Process]:
    """Inside: the benchmark's search process on fake tensors (see the module docstring), the
    model built once under the capped allocator (``order``: of equal-size free blocks,
    :data:`cllora.plan.allocator.ORDERS`); yields ``probe(context) -> Probe``."""
    config = hf_config(spec.model)
    alloc = CachingAllocator(budget_gib * 2**30, order)
    with fake_session(spec) as tracker:
        tracker.listener = LiveReplay(alloc)
        try:
            model, _, opt = build_traced(spec, config, tracker)
        except OutOfMemory as err:
            raise PlanError(f"{spec.provider} on {spec.model} does not fit: {err}") from err
        yield _Process(spec, model, opt, tracker)


def _probe(spec: PlanSpec, model: Any, opt: Any, tracker: StepTracker) -> Probe:
    """One probe as ``max_context_cuda`` runs it (the step's closure dropped as there, before
    ``AdamW.step``); after an out-of-memory error, what the failed step still holds in the fake
    run is freed in the allocator (see the module docstring)."""
    feed = tracker.listener
    alloc = feed.alloc
    alloc.empty_cache()
    alloc.reset_peak()
    alloc.failure_layout = None
    before = set(feed.live)
    error, retained = "", 0
    try:
        with _disable_modes():  # the batch is made on the host, as the benchmark's
            raw = raw_batch(spec, model.config.vocab_size)
        tracker.phase = "forward"
        step_fn(spec, model, tracker, raw)()
        tracker.phase = "optimizer"
        opt.step()
    except OutOfMemory as err:
        error = str(err)
    opt.zero_grad(set_to_none=True)
    if error:
        retained = feed.free_all_but(before)
    tracker.ops.clear()
    return Probe(spec.context, not error, alloc.peak_allocated, alloc.peak_reserved,
                 alloc.allocated, retained, error, alloc.layout(),
                 alloc.failure_layout if error else None)  # fmt: skip


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
    layouts: dict | None = None,
    order: str = "oldest",
) -> tuple[int, list[Probe]]:
    """The benchmark's max-context search (multiples of ``step`` up to ``hi``: its
    ``--max-context-hi``, which puts the first probe at about ``hi / 2``) replayed in one
    process; returns the longest context that fitted (0: none) and the probes in order.
    ``layouts``: a dict filled with the replay's allocator segments per stage (see
    :func:`compare_layouts`); ``order``: of equal-size free blocks (see
    :data:`cllora.plan.allocator.ORDERS`)."""
    probes: list[Probe] = []
    with benchmark_process(spec, budget_gib, order) as probe:
        if layouts is not None:
            layouts["build"] = probe.build_layout
            layouts["probes"] = []

        def fits(units: int) -> bool:
            p = probe(units * step)
            probes.append(p)
            if layouts is not None:
                layouts["probes"].append(probe_layouts(p))
            if log:
                log(f"  replayed probe {spec.provider} {p.context}: {'ok' if p.ok else 'oom'} "
                    f"(allocated {p.peak_allocated / 2**30:.2f} GiB, reserved "
                    f"{p.peak_reserved / 2**30:.2f} GiB)")  # fmt: skip
            return p.ok

        best = bisect_max(fits, hi // step)
    return best * step, probes


def probe_layouts(p: Probe) -> dict:
    """One probe's entry of a layouts record: ``context``, ``status``, the allocator's
    segments ``after`` the probe and ``at_failure`` (None if it fitted)."""
    return {"context": p.context, "status": "ok" if p.ok else "oom",
            "after": p.layout_after, "at_failure": p.layout_at_failure}  # fmt: skip


def compare_layouts(measured: dict, replayed: dict) -> list[str]:
    """A markdown table of :func:`~cllora.plan.allocator.summarize` for each stage of two
    layouts records (``{"build": layout, "probes": [probe_layouts...]}``: what
    ``cllora bench --find-max-context`` writes on CUDA from ``torch.cuda.memory_snapshot()``,
    and the replay), measured against replayed, GiB; stages only one of them has are shown
    with a dash."""
    gib = 2**30

    def stages(record: dict) -> dict[str, list[dict] | None]:
        out: dict[str, list[dict] | None] = {"after the build": record.get("build")}
        for p in record.get("probes", []):
            out[f"{p['context']} {p['status']}, after"] = p.get("after")
            if p.get("at_failure") is not None:
                out[f"{p['context']} at the failure"] = p["at_failure"]
        return out

    mine, theirs = stages(measured), stages(replayed)
    keys = ("reserved", "allocated", "stranded", "largest_free")
    lines = ["| stage | " + " | ".join(f"{k} measured / replayed" for k in keys) + " |",
             "|---|" + "---:|" * len(keys)]  # fmt: skip
    for stage in list(mine) + [k for k in theirs if k not in mine]:
        a, b = mine.get(stage), theirs.get(stage)
        sa, sb = summarize(a) if a else None, summarize(b) if b else None

        def cell(k: str, sa: dict | None = sa, sb: dict | None = sb) -> str:
            return " / ".join(f"{x[k] / gib:.2f}" if x else "-" for x in (sa, sb))

        lines.append(f"| {stage} | " + " | ".join(cell(k) for k in keys) + " |")
    return lines
