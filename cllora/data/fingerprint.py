"""Fingerprints of the data a run trains on, so a resume can refuse changed data.

Usage::

    from cllora.data.fingerprint import data_changes, file_digests, sample_digests
    files = file_digests("../shared/data/medquad")     # {"CDC.jsonl": "<sha256>", ...}
    samples = sample_digests(data)                      # {"CDC": "<sha256>", "__global__": ...}
    data_changes({"files": files}, {"files": file_digests(path)})   # [] when nothing changed

Two levels, both stored in every round checkpoint (``state.json``'s ``extra["data"]``):

- ``files``: the SHA-256 of every file the reader reads for ``data.path`` (a file, or the
  supported files directly in a directory; ``builtin`` hashes its records), checked by
  ``--resume`` before the model loads, so a change is named by file (modified, added, removed);
- ``samples``: per client, the SHA-256 of its training and test samples' token ids and labels
  in order (and of the held-out global test set), checked once the resumed run has rebuilt its
  clients: this also catches what the files cannot show (another tokenizer or chat template).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cllora.data.formatting import Sample
from cllora.data.readers import FORMATS, SUFFIXES
from cllora.report.records import GLOBAL

GLOBAL_TEST = GLOBAL  # the held-out global test set


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _data_files(path: Path, fmt: str) -> list[Path]:
    """The files the reader takes for ``path`` (the rule of :mod:`cllora.data.readers`)."""
    if not path.is_dir():
        return [path] if path.is_file() else []
    wanted = (fmt,) if fmt != "auto" else FORMATS
    return sorted(
        p for p in path.iterdir() if p.is_file() and SUFFIXES.get(p.suffix.lower()) in wanted
    )


def file_digests(path: str, fmt: str = "auto") -> dict[str, str]:
    """File name (relative to a directory ``path``) -> SHA-256 of the data files of a run."""
    if path == "builtin":
        from cllora.data.builtin import builtin_records

        blob = json.dumps(builtin_records(), sort_keys=True, default=str).encode()
        return {"builtin": hashlib.sha256(blob).hexdigest()}
    root = Path(path)
    return {(p.name if root.is_dir() else str(p)): sha256_file(p) for p in _data_files(root, fmt)}


def _samples_digest(samples: Iterable[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.input_ids, s.labels]).encode())
    return h.hexdigest()


def sample_digests(clients: Iterable[Any], global_test: Iterable[Sample] = ()) -> dict[str, str]:
    """Client name -> digest of its training then test samples; ``__global__`` for the held-out
    global test set when there is one."""
    out = {c.name: _samples_digest([*c.train, *c.test]) for c in clients}
    held = list(global_test)
    if held:
        out[GLOBAL_TEST] = _samples_digest(held)
    return out


def _diff(kind: str, old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    changes = [f"{kind} {k} changed" for k in sorted(old) if k in new and old[k] != new[k]]
    changes += [f"{kind} {k} is gone" for k in sorted(old) if k not in new]
    return changes + [f"{kind} {k} is new" for k in sorted(new) if k not in old]


def data_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints, level by level (only levels both hold)."""
    changes = []
    for level, kind in (("files", "data file"), ("samples", "the samples of client")):
        if level in old and level in new:
            changes += _diff(kind, old[level], new[level])
    return changes
