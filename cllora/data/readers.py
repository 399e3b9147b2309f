"""Read records (one dict per example) from JSONL, JSON, CSV or Parquet files, or a directory.

Usage::

    from cllora.data.readers import DataError, Malformed, load_records, read_records

    records = read_records("../shared/data/medquad/CDC.jsonl")    # list of dicts
    records[0]["_where"]                                           # ".../CDC.jsonl:1"
    records = read_records("my_data_dir/", on_malformed="skip")    # every supported file inside
    records = load_records("builtin")                              # the offline corpus

    malformed = Malformed("skip")                 # one report for several steps of a load
    records = read_records("d.jsonl", malformed=malformed)
    malformed.stats()   # {"malformed_skipped": 2, "malformed_examples": ["d.jsonl:3: ...", ...]}
    malformed.report()  # one warning: the count and the first reasons

Every record carries ``"_where"``, the place it came from, so later errors can name it:
``"<path>:<line>"`` for JSONL and CSV (1-based; the CSV header is line 1), ``"<path>:[<i>]"`` for
the i-th object of a JSON array and ``"<path>:row <i>"`` for Parquet (both 0-based).

A malformed record is a defect of one record: a JSONL line that is not valid JSON, not a JSON
object or not UTF-8 text (JSONL is decoded line by line, so one bad line spoils only itself), a
CSV row with the wrong number of fields, undecodable bytes or an unreadable field, a JSON array
element that is not an object; :mod:`cllora.data.formatting` adds the defects of fields and
shapes. With ``on_malformed="error"`` the first one raises :class:`RecordError` naming
``file:line``, the cause and the fix; with ``on_malformed="skip"`` each is skipped and counted
by a :class:`Malformed` collector, which logs one warning on the ``"cllora.data"`` logger (every
skip is also logged at DEBUG). A file left without records (empty, or every record skipped) is
always an error, and so are file-level defects (a broken .json document, a bad CSV header).
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cllora.errors import DataError

logger = logging.getLogger("cllora.data")

SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FORMATS = tuple(SUFFIXES.values())
MAX_EXAMPLES = 5  # reasons kept in the stats and shown in the warning
SKIP_HINT = "or set data.on_malformed=skip to skip such records"
_ESCAPED = re.compile("[\udc80-\udcff]")  # undecodable bytes after errors="surrogateescape"


def malformed_message(where: str, reason: str, hint: str = "") -> str:
    """``"<where>: malformed record: <reason>; <hint>, fix or remove the record, or skip ..."``."""
    fixes = ", ".join(x for x in (hint, "fix or remove the record") if x)
    return f"{where}: malformed record: {reason}; {fixes}, {SKIP_HINT}"


class RecordError(DataError):
    """A defect of one record, which ``data.on_malformed=skip`` skips.

    ``where`` is the record's place, ``reason`` the cause, ``hint`` an extra fix (may be "").
    """

    def __init__(self, where: str, reason: str, hint: str = "") -> None:
        self.where, self.reason, self.hint = where, reason, hint
        super().__init__(malformed_message(where, reason, hint))


def where_file(where: str) -> str:
    """The file part of a ``_where``: ``"d.jsonl:3"``, ``"d.json:[2]"``, ``"d.parquet:row 1"``
    -> the path before the last colon."""
    return where.rsplit(":", 1)[0] if ":" in where else where


class Malformed:
    """The malformed records of one data load: raises at the first in "error" mode, counts and
    remembers the first :data:`MAX_EXAMPLES` ``"where: reason"`` strings in "skip" mode."""

    def __init__(self, mode: str = "error") -> None:
        if mode not in ("error", "skip"):
            raise DataError(f"on_malformed must be 'error' or 'skip', got {mode!r}")
        self.mode = mode
        self.count = 0
        self.examples: list[str] = []
        self.last = ""  # the latest "where: reason"

    def __call__(self, where: str, reason: str, hint: str = "") -> None:
        if self.mode == "error":
            raise RecordError(where, reason, hint)
        self.count += 1
        self.last = f"{where}: {reason}"
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(self.last)
        logger.debug("skipped malformed record %s", self.last)

    def stats(self) -> dict[str, Any]:
        """``malformed_skipped``: records skipped; ``malformed_examples``: the first reasons."""
        return {"malformed_skipped": self.count, "malformed_examples": list(self.examples)}

    def summary(self) -> str:
        """One line: how many were skipped and the first reasons ("" when none)."""
        if not self.count:
            return ""
        shown = "; ".join(self.examples)
        more = f" (the first {len(self.examples)})" if self.count > len(self.examples) else ""
        records = "record" if self.count == 1 else "records"
        return f"{self.count} malformed {records} skipped (data.on_malformed=skip){more}: {shown}"

    def report(self) -> None:
        """Log :meth:`summary` as one warning when something was skipped."""
        if self.count:
            logger.warning("%s", self.summary())


Bad = Callable[[str, str], None]


def _undecodable(byte: int, column: int) -> str:
    return f"not UTF-8 text (the byte 0x{byte:02x} at byte {column} of the line)"


def _read_text(path: Path) -> str:
    """The whole file as text; undecodable bytes are an error naming their line."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise DataError(
            f"{path}:{line}: {_undecodable(data[e.start], column)}; a JSON file is parsed as a "
            "whole, so the line cannot be skipped: fix the line or re-save the file as UTF-8 "
            "(or convert it to JSONL, whose lines are read one by one)"
        ) from None


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes without the line end) of a file; a leading UTF-8 BOM is dropped."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        yield lineno, raw.removesuffix(b"\r")


def _read_jsonl(path: Path, bad: Bad) -> list[dict]:
    records = []
    for lineno, raw in _lines(path):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad(where, _undecodable(raw[e.start], e.start + 1))
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad(where, f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            bad(where, f"a JSON {json_type(obj)}, not an object")
            continue
        records.append({**obj, "_where": where})
    return records


def json_type(value: Any) -> str:
    """The JSON name of a value's type (object, array, string, number, boolean, null), else the
    Python type's name."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number"}
    names.update({float: "number", type(None): "null"})
    return names.get(type(value), type(value).__name__)


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
            f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); a JSON file is "
            "parsed as a whole, so the line cannot be skipped: fix it (or convert the file to "
            "JSONL, whose lines are read one by one)"
        ) from None
    records = []
    for i, obj in enumerate(_json_items(path, data)):
        where = f"{path}:[{i}]"
        if not isinstance(obj, dict):
            bad(where, f"a JSON {json_type(obj)}, not an object")
            continue
        records.append({**obj, "_where": where})
    return records


def _csv_rows(path: Path, bad: Bad) -> Iterator[tuple[str, list[str]]]:
    """(where, fields) of each non-blank CSV row; undecodable bytes stay as surrogate escapes.

    csv.reader (not DictReader) so that each row's first line is known even when blank lines or
    quoted multi-line fields come before it. A row the csv module cannot parse is malformed.
    """
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        start, failed_at = 1, -1
        while True:
            error = None
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                error = str(e)
            where, start = f"{path}:{start}", reader.line_num + 1
            if error is not None:
                if reader.line_num == failed_at:  # no progress: the reader is stuck
                    raise DataError(f"{where}: unreadable CSV ({error})")
                failed_at = reader.line_num
                bad(where, f"unreadable CSV row ({error})")
            elif row:
                yield where, row


def _escaped_byte(fields: list[str]) -> tuple[int, int] | None:
    """(field index, byte) of the first undecodable byte in the row's fields, if any."""
    for i, value in enumerate(fields):
        match = _ESCAPED.search(value)
        if match:
            return i, ord(match.group()) - 0xDC00
    return None


def _csv_header(where: str, row: list[str]) -> list[str]:
    bad_byte = _escaped_byte(row)
    if bad_byte:
        raise DataError(
            f"{where}: the CSV header is not UTF-8 text (the byte 0x{bad_byte[1]:02x} in column "
            f"{bad_byte[0] + 1}); re-save the file as UTF-8"
        )
    repeated = sorted({name for name in row if row.count(name) > 1})
    if repeated:
        raise DataError(
            f"{where}: the CSV header repeats the column names {repeated}; rename the columns"
        )
    return row


def _read_csv(path: Path, bad: Bad) -> list[dict]:
    records = []
    header: list[str] | None = None
    for where, row in _csv_rows(path, bad):
        if header is None:
            header = _csv_header(where, row)
        elif len(row) != len(header):
            fields = f"{len(row)} field" + ("s" if len(row) != 1 else "")
            bad(where, f"{fields}, the header has {len(header)}")
        elif bad_byte := _escaped_byte(row):
            col, byte = bad_byte
            bad(where, f"not UTF-8 text (the byte 0x{byte:02x} in column {header[col]!r})")
        else:
            records.append({**dict(zip(header, row, strict=True)), "_where": where})
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


def _read_file(file: Path, file_fmt: str, malformed: Malformed) -> list[dict]:
    """One file's records; a file left without any is an error."""
    before = malformed.count
    records = _READERS[file_fmt](file, malformed)
    if not records:
        skipped = malformed.count - before
        why = (
            f": all {skipped} records are malformed and were skipped (the last: {malformed.last})"
            if skipped
            else ""
        )
        raise DataError(f"no usable records in {file} (read as {file_fmt}){why}")
    return records


def read_records(
    path: str | Path,
    fmt: str = "auto",
    on_malformed: str = "error",
    *,
    malformed: Malformed | None = None,
) -> list[dict]:
    """Records of a file, or of every supported file directly inside a directory (sorted by name).

    ``fmt`` is ``"auto"`` (by suffix) or one of jsonl/json/csv/parquet; with a directory an
    explicit format reads only the files with that suffix. ``on_malformed`` is ``"error"`` or
    ``"skip"``. Each record gets ``"_where"`` (see the module docstring). With a ``malformed``
    collector (its mode wins over ``on_malformed``) the skips are counted there and the caller
    reports them; without one they are logged here as one warning.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; allowed: auto, {', '.join(FORMATS)}")
    own = malformed is None
    collector = Malformed(on_malformed) if malformed is None else malformed
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    records: list[dict] = []
    try:
        for file, file_fmt in _files(path, fmt):
            records.extend(_read_file(file, file_fmt, collector))
    finally:
        if own:
            collector.report()
    return records


def load_records(
    path: str,
    fmt: str = "auto",
    on_malformed: str = "error",
    *,
    malformed: Malformed | None = None,
) -> list[dict]:
    """``"builtin"`` gives the offline corpus (:func:`cllora.data.builtin.builtin_records`);
    anything else is read with :func:`read_records`."""
    if path == "builtin":
        from cllora.data.builtin import builtin_records

        return builtin_records()
    return read_records(path, fmt=fmt, on_malformed=on_malformed, malformed=malformed)
