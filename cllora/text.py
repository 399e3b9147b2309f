"""Words for people: a mapping of counts and settings as one readable line (``run.log``).

Usage::

    from cllora.text import fields_line
    fields_line({"records": 3000, "dropped_overlong": 0, "length_buckets": [99, 152],
                 "kernels": {"rms_norm": 61}, "malformed_examples": []})
    # 'records 3000, dropped overlong 0, length buckets 99/152, kernels (rms norm 61)'

``round_line`` is the line a federated round leaves in ``run.log`` (and, under ``flwr run``, in
its output), the same for a run in-process and on Flower.

Keys lose their underscores; lists are joined with ``/``; nested mappings go in parentheses;
empty lists and mappings and ``None`` are left out (nothing to say); booleans read yes/no and
floats keep 4 significant digits. A leaf module: it imports nothing of cllora, so every layer
may use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def _value(v: Any) -> str | None:
    if v is None or (isinstance(v, list | tuple | Mapping) and not v):
        return None
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, Mapping):
        return f"({fields_line(v)})"
    if isinstance(v, list | tuple):
        return "/".join(_value(x) or "-" for x in v)
    return str(v)


def fields_line(fields: Mapping[str, Any]) -> str:
    """``fields`` as ``key value, key value`` (see the module doc)."""
    parts = []
    for k, v in fields.items():
        text = _value(v)
        if text is not None:
            parts.append(f"{str(k).replace('_', ' ')} {text}")
    return ", ".join(parts)


def counts_line(counts: Mapping[str, int], none: str = "none") -> str:
    """``12 (shuffle 4, replace 1, ...)``: the total of non-zero counts and each; ``none`` when
    all are zero."""
    kept = {k: n for k, n in counts.items() if n}
    if not kept:
        return none
    return f"{sum(kept.values())} ({fields_line(kept)})"


def round_line(r: int, rounds: int, sent: int, trainees: int, global_loss: float,
               global_ppl: float, seconds: float) -> str:  # fmt: skip
    """Round ``r`` of ``rounds`` in words: who trained, how long, the global model (or why it
    was not evaluated: a NaN loss is a round ``eval.global_rounds`` leaves out)."""
    trained = f"{sent} of {trainees} trainees sent an update"
    if math.isnan(global_loss):
        model = "global model not evaluated this round (eval.global_rounds=last)"
    else:
        model = f"global loss {global_loss:.4f} (ppl {global_ppl:.2f})"
    return f"round {r} of {rounds}: {trained} in {seconds:.0f} s; {model}"
