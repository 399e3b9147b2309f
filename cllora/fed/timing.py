"""Where a run's wall time goes: seconds per phase, written to ``timing.json`` at the end.

Usage::

    timer = PhaseTimer()
    with timer.phase("train"):
        ...
    timer.as_dict()   # {"train": 1.23, ..., "other": 0.05, "total": 1.31, "cpu": {...}}

Phases of a run (``cllora/fed/loop.py``, ``pool.py``, ``rounds.py``): ``load`` (model,
tokenizer, data, partition), ``client_stats`` (tables and the quality score), ``global_eval``,
``train``, ``local_eval``, ``aggregate``, ``checkpoint``, ``generation``
(``eval.generate_samples``);
``other`` is the rest of ``total`` (the wall time of this process from its setup to the end: a
resumed run counts only its own part).
Wall-clock numbers: compare phases of one run, or runs measured side by side. ``cpu`` holds the
same phases in CPU seconds of the process (every thread; ``time.process_time``): on a machine
shared with other work, where wall time grows with the load, CPU seconds stay close to the work
a run did, so they compare runs that did not run alone (with ``train.threads=1`` they are its
single core's time).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator


class PhaseTimer:
    """Accumulates wall seconds per named phase (phases may repeat; they must not nest)."""

    def __init__(self) -> None:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu_seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0
            self.cpu_seconds[name] += time.process_time() - c0

    def as_dict(self) -> dict[str, float | dict[str, float]]:
        """Wall seconds per phase, ``other`` and ``total`` (rounded to ms), and ``cpu``: the
        same in CPU seconds."""
        out: dict[str, float | dict[str, float]] = {}
        out.update(_totals(self.seconds, time.perf_counter() - self.start))
        out["cpu"] = _totals(self.cpu_seconds, time.process_time() - self.cpu_start)
        return out


def _totals(seconds: dict[str, float], total: float) -> dict[str, float]:
    out = {k: round(v, 3) for k, v in seconds.items()}
    out["other"] = round(max(total - sum(seconds.values()), 0.0), 3)
    out["total"] = round(total, 3)
    return out
