"""What a cllora command prints: cllora's own lines, and third-party chatter kept out of the way.

Usage::

    from cllora.logs import configure_logging
    configure_logging(debug=False)   # what `cllora ...` does first; --debug: debug=True

Without ``debug``: the ``cllora`` logger (and its children) writes its INFO lines as they are
(``message`` only, on stderr); every other library's logger reaches stderr from WARNING up, so
set-up chatter (alembic's ``setup plugin ...`` lines when Flower opens its database, Ray's and
Hugging Face's INFO lines) is not shown; and the third-party warnings listed in :data:`NOISE`,
each of which cllora knows to be harmless for what it does, are dropped. With ``debug``
everything is shown, DEBUG lines included. A warning that is not in :data:`NOISE` is always
shown: the list names single messages, never whole libraries.

Decision: a listed message is one cllora causes on purpose and cannot act on (its entry says
why); the list is the one place to add such a message, and ``tests/test_logs.py`` checks that
each entry is dropped and that an unlisted warning of the same library is not.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Noise:
    """A third-party message cllora hides: from ``logger`` (a log record) or, with ``logger``
    empty, a Python warning of ``category``; ``text`` is a part of the message."""

    text: str
    why: str
    logger: str = ""
    category: type[Warning] = UserWarning


NOISE: tuple[Noise, ...] = (
    Noise(
        "The `run_simulation` function is deprecated",
        "cllora flower simulate starts Flower's simulation engine with run_simulation on "
        "purpose (docs/flower.md, 'Simulation entry'); the user cannot act on it",
        logger="flwr",
    ),
    Noise(
        "Ray will no longer override accelerator visible devices",
        "Ray's notice about a future default, raised at every ray.init with num_gpus=0 (a CPU "
        "simulation); cllora sets the devices of its ClientApps itself",
        category=FutureWarning,
    ),
)


class _DropNoise(logging.Filter):
    """Drops the log records of one logger that :data:`NOISE` lists."""

    def __init__(self, texts: tuple[str, ...]) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


_FILTERS: dict[str, _DropNoise] = {}


def configure_logging(debug: bool = False) -> None:
    """Set up the command's logging (see the module doc); calling it again re-applies it."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_cllora", False)]:
        root.removeHandler(old)  # called again in one process (tests): today's stderr, not a
        # stream an earlier caller had (it may be closed); never flushed, as it may be closed
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._cllora = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger("cllora").setLevel(logging.DEBUG if debug else logging.INFO)
    for name, drop in _FILTERS.items():
        logging.getLogger(name).removeFilter(drop)
    _FILTERS.clear()
    if debug:
        return
    by_logger: dict[str, list[str]] = {}
    for noise in NOISE:
        if noise.logger:
            by_logger.setdefault(noise.logger, []).append(noise.text)
        else:
            warnings.filterwarnings("ignore", message=f".*{re.escape(noise.text)}",
                                    category=noise.category)  # fmt: skip
    for name, texts in by_logger.items():
        _FILTERS[name] = _DropNoise(tuple(texts))
        logging.getLogger(name).addFilter(_FILTERS[name])
