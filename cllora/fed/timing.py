"""Where a run's wall time goes: seconds per phase, written to ``timing.json`` at the end.

Usage::

    timer = PhaseTimer()
    with timer.phase("train"):
        ...
    timer.as_dict()   # {"train": 1.23, ..., "other": 0.05, "total": 1.31}

Phases of a run (``cllora/fed/runner.py``, ``rounds.py``): ``load`` (model, tokenizer, data,
partition), ``client_stats`` (tables and the quality score), ``global_eval``, ``train``,
``local_eval``, ``aggregate``, ``checkpoint``, ``generation`` (``eval.generate_samples``);
``other`` is the rest of ``total`` (the wall time of this process from its setup to the end: a
resumed run counts only its own part).
Wall-clock numbers: compare phases of one run, or runs measured side by side.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator


class PhaseTimer:
    """Accumulates wall seconds per named phase (phases may repeat; they must not nest)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def as_dict(self) -> dict[str, float]:
        """Seconds per phase, ``other`` and ``total`` (rounded to ms)."""
        total = time.perf_counter() - self.start
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["other"] = round(max(total - sum(self.seconds.values()), 0.0), 3)
        out["total"] = round(total, 3)
        return out
