"""Errors of the user's input that every layer raises, and the command line turns into one line
and exit status 2 (``cllora/cli.py``).

Usage::

    from cllora.errors import DataError
    raise DataError("data.jsonl:3: malformed record: ...; fix or remove the record")

A leaf module: it imports nothing of cllora, so the records layer (which reads run files) and
the data layer raise the same class. ``cllora.data.readers`` re-exports :class:`DataError`
where most code has imported it from.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input; the message names the file and line (or row) where known."""
