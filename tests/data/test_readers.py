"""Readers: every format, directories, malformed input in error and skip mode, bad paths."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cllora.data.readers import DataError, load_records, read_records

MEDQUAD = Path(__file__).resolve().parents[3] / "shared/data/medquad"
ROWS = [
    {"question": "What is 2+2?", "answer": "4", "source": "a"},
    {"question": "Capital of France?", "answer": "Paris", "source": "b"},
]


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _fields(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "_where"} for r in records]


def test_jsonl_records_and_line_numbers(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), "", json.dumps(ROWS[1])])
    records = read_records(path)
    assert _fields(records) == ROWS
    assert [r["_where"] for r in records] == [f"{path}:1", f"{path}:3"]


def test_json_list_and_wrapped_object(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(ROWS))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": ROWS}))
    for path in (plain, wrapped):
        records = read_records(path)
        assert _fields(records) == ROWS
        assert records[1]["_where"] == f"{path}:[1]"


def test_json_object_without_one_list_is_an_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"a": ROWS, "b": ROWS}))
    with pytest.raises(DataError, match="exactly one list"):
        read_records(path)


def test_json_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"question": "q", "answer": "a"},\n{oops}\n]')
    with pytest.raises(DataError, match=rf"{path}:3"):
        read_records(path)


def test_csv_rows_with_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        'question,answer,source\n"What is 2+2?",4,a\n\n"multi\nline?",Paris,b\n', encoding="utf-8"
    )
    records = read_records(path)
    assert _fields(records) == [
        {"question": "What is 2+2?", "answer": "4", "source": "a"},
        {"question": "multi\nline?", "answer": "Paris", "source": "b"},
    ]
    assert [r["_where"] for r in records] == [f"{path}:2", f"{path}:4"]


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nq1,a1\nq2,a2,extra\nq3,a3\n")
    with pytest.raises(DataError, match=rf"{path}:3: malformed record: 3 fields"):
        read_records(path)
    assert len(read_records(path, on_malformed="skip")) == 2


def test_parquet_rows(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    records = read_records(path)
    assert _fields(records) == ROWS
    assert [r["_where"] for r in records] == [f"{path}:row 0", f"{path}:row 1"]


def test_directory_reads_supported_files_sorted(tmp_path):
    _write_jsonl(tmp_path / "b.jsonl", [json.dumps(ROWS[1])])
    (tmp_path / "a.json").write_text(json.dumps([ROWS[0]]))
    (tmp_path / "notes.txt").write_text("ignored")
    records = read_records(tmp_path)
    assert _fields(records) == ROWS
    assert records[0]["_where"].endswith("a.json:[0]")
    # An explicit format reads only the files with that suffix.
    assert _fields(read_records(tmp_path, fmt="jsonl")) == [ROWS[1]]


def test_directory_without_data_files(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing")
    with pytest.raises(DataError, match="no usable records"):
        read_records(tmp_path)


def test_malformed_jsonl_line_error_mode(tmp_path):
    lines = [json.dumps(ROWS[0]), json.dumps(ROWS[1]), "{not json", "[1, 2]", json.dumps(ROWS[0])]
    path = _write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=rf"{path}:3: malformed record: not valid JSON"):
        read_records(path)


def test_malformed_jsonl_lines_skip_mode_warns(tmp_path, caplog):
    lines = [json.dumps(ROWS[0]), json.dumps(ROWS[1]), "{not json", "[1, 2]", json.dumps(ROWS[0])]
    path = _write_jsonl(tmp_path / "d.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="cllora.data"):
        records = read_records(path, on_malformed="skip")
    assert [r["_where"] for r in records] == [f"{path}:1", f"{path}:2", f"{path}:5"]
    messages = [rec.getMessage() for rec in caplog.records]
    assert any(f"{path}:3" in m and "not valid JSON" in m for m in messages)
    assert any(f"{path}:4" in m and "not an object" in m for m in messages)


def test_skip_mode_logs_one_warning_with_the_count_and_first_five(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(ROWS[0])] + ["oops"] * 25)
    with caplog.at_level(logging.WARNING, logger="cllora.data"):
        assert len(read_records(path, on_malformed="skip")) == 1
    messages = [rec.getMessage() for rec in caplog.records]
    reason = "not valid JSON (Expecting value at column 1)"
    shown = "; ".join(f"{path}:{line}: {reason}" for line in range(2, 7))
    assert messages == [
        f"25 malformed records skipped (data.on_malformed=skip) (the first 5): {shown}"
    ]


def test_empty_files_are_errors(tmp_path):
    for name, text in [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "question,answer\n")]:
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DataError, match=f"no usable records in {path}"):
            read_records(path)


def test_only_malformed_lines_is_an_error_even_when_skipping(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ["oops", "1"])
    with pytest.raises(DataError, match="no usable records"):
        read_records(path, on_malformed="skip")


def test_missing_path_unknown_suffix_and_bad_options(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "missing.jsonl")
    odd = tmp_path / "d.txt"
    odd.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(DataError, match=r"jsonl \(\.jsonl\).*parquet \(\.parquet\)"):
        read_records(odd)
    assert _fields(read_records(odd, fmt="jsonl")) == [ROWS[0]]
    with pytest.raises(DataError, match="unknown data format"):
        read_records(odd, fmt="xml")
    with pytest.raises(DataError, match="on_malformed"):
        read_records(odd, fmt="jsonl", on_malformed="ignore")


def test_load_records_builtin_and_path(tmp_path):
    assert load_records("builtin")[0]["_where"].startswith("builtin:")
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(ROWS[0])])
    assert _fields(load_records(str(path))) == [ROWS[0]]


@pytest.mark.skipif(not MEDQUAD.is_dir(), reason="MedQuAD not present in ../shared/data")
def test_real_medquad_file():
    records = read_records(MEDQUAD / "CDC.jsonl")
    assert len(records) > 100
    first = records[0]
    assert first["source"] == "CDC" and first["question"] and first["answer"]
    assert first["_where"] == f"{MEDQUAD / 'CDC.jsonl'}:1"
