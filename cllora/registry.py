"""The names of cllora's pluggable parts, read from their files without importing them.

Usage::

    from cllora.registry import algorithm_names
    algorithm_names()   # ('centralized', 'exact', 'fedadam', ..., 'frozen_a', ...)

The config (which imports no torch, and no layer below it: docs/ARCHITECTURE.md) checks
``fed.strategy`` against :func:`algorithm_names`; :mod:`cllora.fed.algorithms` builds the
algorithms from the same list. A leaf module: it imports nothing of cllora.
"""

from __future__ import annotations

import pkgutil
from functools import cache
from pathlib import Path

ALGORITHMS_DIR = Path(__file__).resolve().parent / "fed" / "algorithms"
_NOT_ALGORITHMS = {"base"}  # files of the algorithms package that are helpers, not algorithms


@cache
def algorithm_names() -> tuple[str, ...]:
    """The ``fed.strategy`` values: every algorithm file of ``cllora/fed/algorithms``, sorted
    (files whose name starts with ``_`` and ``base.py`` are helpers)."""
    names = (m.name for m in pkgutil.iter_modules([str(ALGORITHMS_DIR)]))
    return tuple(sorted(n for n in names if not n.startswith("_") and n not in _NOT_ALGORITHMS))
