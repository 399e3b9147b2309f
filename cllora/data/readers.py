"""Read records (one dict per example) from JSONL, JSON, CSV or Parquet files, or a directory.

Usage::

    from cllora.data.readers import DataError, load_records, read_records

    records = read_records("../shared/data/medquad/CDC.jsonl")    # list of dicts
    records[0]["_where"]                                           # ".../CDC.jsonl:1"
    records = read_records("my_data_dir/", on_malformed="skip")    # every supported file inside
    records = load_records("builtin")                              # the offline corpus

Every record carries ``"_where"``, the place it came from, so later errors can name it:
``"<path>:<line>"`` for JSONL and CSV (1-based; the CSV header is line 1), ``"<path>:[<i>]"`` for
the i-th object of a JSON array and ``"<path>:row <i>"`` for Parquet (both 0-based).

A malformed record (a JSONL line that is not a JSON object, a CSV row with the wrong number of
fields, a JSON array element that is not an object) raises :class:`DataError` with
``on_malformed="error"`` or is skipped with a warning on the ``"cllora.data"`` logger with
``on_malformed="skip"``. A file that yields no records is always an error.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("cllora.data")

SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FORMATS = tuple(SUFFIXES.values())
_MAX_LOGGED_SKIPS = 20


class DataError(ValueError):
    """Bad data input; the message names the file and line (or row) where known."""


class _Malformed:
    """Collects malformed records: raises at once in "error" mode, remembers them in "skip" mode."""

    def __init__(self, mode: str) -> None:
        if mode not in ("error", "skip"):
            raise DataError(f"on_malformed must be 'error' or 'skip', got {mode!r}")
        self.mode = mode
        self.skipped: list[str] = []

    def __call__(self, where: str, reason: str) -> None:
        if self.mode == "error":
            raise DataError(
                f"{where}: malformed record: {reason} (use on_malformed='skip' to skip)"
            )
        self.skipped.append(f"{where}: {reason}")

    def log(self) -> None:
        for item in self.skipped[:_MAX_LOGGED_SKIPS]:
            logger.warning("skipped malformed record %s", item)
        if len(self.skipped) > _MAX_LOGGED_SKIPS:
            logger.warning(
                "... and %d more malformed records skipped (%d in all)",
                len(self.skipped) - _MAX_LOGGED_SKIPS,
                len(self.skipped),
            )


Bad = Callable[[str, str], None]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def _read_jsonl(path: Path, bad: Bad) -> list[dict]:
    records = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad(where, f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            bad(where, f"a JSON {type(obj).__name__}, not an object")
            continue
        records.append({**obj, "_where": where})
    return records


def _json_items(path: Path, data: Any) -> list:
    """The list of records in a parsed JSON file: the top-level list or the one list value."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) == 1:
            return data[lists[0]]
        found = f"{len(lists)} list values ({', '.join(map(repr, lists))})" if lists else "none"
        raise DataError(
            f"{path}: a JSON object must hold exactly one list of records "
            f'(like {{"data": [...]}}); found {found}'
        )
    raise DataError(f"{path}: expected a JSON list of objects, got a {type(data).__name__}")


def _read_json(path: Path, bad: Bad) -> list[dict]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
        ) from None
    records = []
    for i, obj in enumerate(_json_items(path, data)):
        where = f"{path}:[{i}]"
        if not isinstance(obj, dict):
            bad(where, f"a JSON {type(obj).__name__}, not an object")
            continue
        records.append({**obj, "_where": where})
    return records


def _read_csv(path: Path, bad: Bad) -> list[dict]:
    # csv.reader (not DictReader) so that each row's first line is known even when blank lines
    # or quoted multi-line fields come before it.
    records = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header: list[str] | None = None
        start = 1
        try:
            for row in reader:
                where, start = f"{path}:{start}", reader.line_num + 1
                if not row:
                    continue
                if header is None:
                    header = row
                elif len(row) != len(header):
                    bad(where, f"{len(row)} fields, the header has {len(header)}")
                else:
                    records.append({**dict(zip(header, row, strict=True)), "_where": where})
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: unreadable CSV ({e})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
    return records


def _read_parquet(path: Path, bad: Bad) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: unreadable Parquet file ({e})") from None
    return [{**row, "_where": f"{path}:row {i}"} for i, row in enumerate(rows)]


_READERS: dict[str, Callable[[Path, Bad], list[dict]]] = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "parquet": _read_parquet,
}


def _supported() -> str:
    return ", ".join(f"{fmt} ({suffix})" for suffix, fmt in SUFFIXES.items())


def _files(path: Path, fmt: str) -> list[tuple[Path, str]]:
    """(file, format) pairs to read for ``path``, a file or a directory."""
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file()
            and SUFFIXES.get(p.suffix.lower()) in ((fmt,) if fmt != "auto" else FORMATS)
        )
        if not files:
            want = (
                f"{fmt} files" if fmt != "auto" else f"files of a supported format: {_supported()}"
            )
            raise DataError(f"no usable records in {path}: the directory holds no {want}")
        return [(p, SUFFIXES[p.suffix.lower()]) for p in files]
    if fmt != "auto":
        return [(path, fmt)]
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(
            f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
            f"supported: {_supported()} (or pass the format explicitly)"
        )
    return [(path, SUFFIXES[path.suffix.lower()])]


def read_records(path: str | Path, fmt: str = "auto", on_malformed: str = "error") -> list[dict]:
    """Records of a file, or of every supported file directly inside a directory (sorted by name).

    ``fmt`` is ``"auto"`` (by suffix) or one of jsonl/json/csv/parquet; with a directory an
    explicit format reads only the files with that suffix. ``on_malformed`` is ``"error"`` or
    ``"skip"``. Each record gets ``"_where"`` (see the module docstring).
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; allowed: auto, {', '.join(FORMATS)}")
    malformed = _Malformed(on_malformed)
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    records: list[dict] = []
    try:
        for file, file_fmt in _files(path, fmt):
            got = _READERS[file_fmt](file, malformed)
            if not got:
                raise DataError(f"no usable records in {file} (read as {file_fmt})")
            records.extend(got)
    finally:
        malformed.log()
    return records


def load_records(path: str, fmt: str = "auto", on_malformed: str = "error") -> list[dict]:
    """``"builtin"`` gives the offline corpus (:func:`cllora.data.builtin.builtin_records`);
    anything else is read with :func:`read_records`."""
    if path == "builtin":
        from cllora.data.builtin import builtin_records

        return builtin_records()
    return read_records(path, fmt=fmt, on_malformed=on_malformed)
