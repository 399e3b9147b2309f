"""Malformed records: each defect stops the load naming file:line, the cause and the fix
(data.on_malformed=error), or is skipped, counted and listed in the stats (skip); overlong
records report their true length."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cllora.config import config_from_dict
from cllora.data import pipeline
from cllora.data.formatting import build_samples
from cllora.data.pipeline import build_clients, check_model_window, load_samples, measure_length
from cllora.data.readers import DataError, Malformed, read_records

GOOD = {"question": "What is 2+2?", "answer": "Four.", "source": "a"}
FIX = "fix or remove the record, or set data.on_malformed=skip to skip such records"
USER = {"role": "user", "content": "Hi"}
BOT = {"role": "assistant", "content": "Hello."}


def _cfg(path: Path, mode: str = "error", **data):
    return config_from_dict(
        {"data": {"path": str(path), "on_malformed": mode, **data}, "progress": False}
    )


def _jsonl(path: Path, lines: list) -> Path:
    """Writes str lines as they are and anything else as JSON, one per line."""
    text = [x if isinstance(x, str) else json.dumps(x) for x in lines]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def _error(cfg, tokenizer) -> str:
    with pytest.raises(DataError) as err:
        load_samples(cfg, tokenizer)
    return str(err.value)


def _assert_both_modes(
    path: Path, where: str, reason: str, tok, hint: str = "", first: str = ":1", **data
):
    """error: one message naming where, the reason and the fix; skip: the record is skipped,
    counted once and its reason is the one example in the stats."""
    fix = f"{hint}, {FIX}" if hint else FIX
    message = _error(_cfg(path, **data), tok)
    assert message == f"{where}: malformed record: {reason}; {fix}"
    samples, stats = load_samples(_cfg(path, "skip", **data), tok)
    assert [s.meta["where"] for s in samples] == [f"{path}{first}"]
    assert stats["malformed_skipped"] == 1
    assert stats["malformed_examples"] == [f"{where}: {reason}"]


# ---------------------------------------------------------------- defects found by the readers


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{oops", "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
        ('{"question": "q"', "not valid JSON (Expecting ',' delimiter at column 17)"),
        ("[1, 2]", "a JSON array, not an object"),
        ('"just text"', "a JSON string, not an object"),
        ("42", "a JSON number, not an object"),
        ("null", "a JSON null, not an object"),
    ],
)
def test_jsonl_line_defects(tmp_path, smol_tokenizer, line, reason):
    path = _jsonl(tmp_path / "d.jsonl", [GOOD, line])
    _assert_both_modes(path, f"{path}:2", reason, smol_tokenizer)


def test_jsonl_undecodable_bytes_spoil_only_their_line(tmp_path, smol_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"question": "caf\xe9", "answer": "a"}\n')
    reason = "not UTF-8 text (the byte 0xe9 at byte 18 of the line)"
    _assert_both_modes(path, f"{path}:2", reason, smol_tokenizer)


def test_json_array_element_not_an_object(tmp_path, smol_tokenizer):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, ["q", "a"]]))
    message = _error(_cfg(path), smol_tokenizer)
    assert message == f"{path}:[1]: malformed record: a JSON array, not an object; {FIX}"
    samples, stats = load_samples(_cfg(path, "skip"), smol_tokenizer)
    assert [s.meta["where"] for s in samples] == [f"{path}:[0]"]
    assert stats["malformed_examples"] == [f"{path}:[1]: a JSON array, not an object"]


def test_json_file_with_undecodable_bytes_names_the_line_in_both_modes(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n{"question": "a", "answer": "b"},\n{"question": "\xff"}\n]')
    for mode in ("error", "skip"):
        with pytest.raises(DataError) as err:
            read_records(path, on_malformed=mode)
        assert str(err.value).startswith(
            f"{path}:3: not UTF-8 text (the byte 0xff at byte 15 of the line); a JSON file is "
            "parsed as a whole, so the line cannot be skipped"
        )


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (b"q2,a2,extra", "3 fields, the header has 2"),
        (b"q2", "1 field, the header has 2"),
        (b"q2,caf\xe9", "not UTF-8 text (the byte 0xe9 in column 'answer')"),
    ],
)
def test_csv_row_defects(tmp_path, smol_tokenizer, row, reason):
    path = tmp_path / "d.csv"
    path.write_bytes(b"question,answer\n" + row + b"\nWhat is 2+2?,Four.\n")
    message = _error(_cfg(path), smol_tokenizer)
    assert message == f"{path}:2: malformed record: {reason}; {FIX}"
    samples, stats = load_samples(_cfg(path, "skip"), smol_tokenizer)
    assert [s.meta["where"] for s in samples] == [f"{path}:3"]
    assert (stats["malformed_skipped"], stats["malformed_examples"]) == (1, [f"{path}:2: {reason}"])


def test_csv_header_defects_are_file_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,question\nq,a\n")
    with pytest.raises(DataError, match=rf"{path}:1: the CSV header repeats .*\['question'\]"):
        read_records(path, on_malformed="skip")


# ---------------------------------------------------------------- defects of fields and shapes


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (
            {"question": "q"},
            "field 'answer' is missing (a qa record needs 'question' and 'answer')",
        ),
        (
            {"prompt": "p"},
            "field 'response' is missing (a qa record needs 'prompt' and 'response')",
        ),
        (
            {"instruction": "i", "input": "x"},
            "field 'output' is missing (an alpaca record needs 'instruction' and 'output')",
        ),
        ({"question": "", "answer": "a"}, "field 'question' is empty"),
        ({"question": "q", "answer": " \t\n"}, "field 'answer' is blank (only whitespace)"),
        ({"question": "q", "answer": 5}, "field 'answer' is a number (5), not a string"),
        ({"question": "q", "answer": None}, "field 'answer' is null"),
        ({"question": ["q"], "answer": "a"}, "field 'question' is an array (['q']), not a string"),
        ({"question": "q", "answer": True}, "field 'answer' is a boolean (True), not a string"),
        (
            {"instruction": "i", "input": 3, "output": "o"},
            "field 'input' is a number (3), not a string",
        ),
        (
            {"question": "q", "answer": "\ud800"},
            "field 'answer' holds an unpaired surrogate (like \\ud800), not valid Unicode text",
        ),
    ],
)
def test_field_defects(tmp_path, smol_tokenizer, bad, reason):
    path = _jsonl(tmp_path / "d.jsonl", [GOOD, bad])
    _assert_both_modes(path, f"{path}:2", reason, smol_tokenizer)


def test_unknown_shape(tmp_path, smol_tokenizer):
    path = _jsonl(tmp_path / "d.jsonl", [GOOD, {"Q": "q", "A": "a"}])
    reason = (
        "cannot tell the record shape from its fields ['A', 'Q']; expected one of: qa (question, "
        "answer or prompt, response); alpaca (instruction, input, output); messages (messages); "
        "text (text)"
    )
    hint = "set data.shape and data.fields (e.g. {question: Q, answer: A})"
    _assert_both_modes(path, f"{path}:2", reason, smol_tokenizer, hint=hint)


def test_missing_field_of_an_explicit_shape(tmp_path, smol_tokenizer):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "Plain text."}, {"body": "x"}])
    reason = "field 'text' is missing (a text record needs 'text')"
    _assert_both_modes(path, f"{path}:2", reason, smol_tokenizer, shape="text")
    path = _jsonl(tmp_path / "m.jsonl", [{"messages": [USER, BOT]}, {"text": "x"}])
    reason = "field 'messages' is missing (a messages record needs 'messages')"
    _assert_both_modes(path, f"{path}:2", reason, smol_tokenizer, shape="messages")


M = "field 'messages'"
TURN = "(a turn is {role, content})"


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ("Hi", f"{M} is a string, not a list of {{role, content}} turns"),
        (None, f"{M} is null, not a list of {{role, content}} turns"),
        ([], f"{M} is an empty list"),
        ([USER, "Hello."], f"{M}[1] is a string, not a {{role, content}} object"),
        ([{"content": "Hi"}, BOT], f"{M}[0] has no 'role' {TURN}"),
        ([USER, {"role": "assistant"}], f"{M}[1] has no 'content' {TURN}"),
        (
            [USER, {"role": "assistant", "content": 7}],
            f"{M}[1]: 'content' is a number (7), not a string",
        ),
        (
            [{"role": "human", "content": "Hi"}, BOT],
            f"{M}[0] has the unknown role 'human' (allowed: system, user, assistant)",
        ),
        (
            [USER, {"role": "assistant", "content": " "}],
            f"{M}[1]: the assistant turn's content is blank (only whitespace)",
        ),
        ([{"role": "user", "content": ""}, BOT], f"{M}[0]: the user turn's content is empty"),
        ([BOT, USER, BOT], f"{M} must start with a user (or system) turn"),
        (
            [{"role": "system", "content": "Be brief."}, USER],
            f"{M} has no assistant turn (nothing to train on)",
        ),
        ([USER, BOT, USER], f"{M} must end with an assistant turn"),
    ],
)
def test_messages_defects(tmp_path, smol_tokenizer, messages, reason):
    path = _jsonl(tmp_path / "d.jsonl", [{"messages": [USER, BOT]}, {"messages": messages}])
    _assert_both_modes(path, f"{path}:2", reason, smol_tokenizer)


def test_empty_system_turn_is_fine(smol_tokenizer):
    record = {"messages": [{"role": "system", "content": ""}, USER, BOT]}
    _, stats = build_samples([record], smol_tokenizer, progress=False)
    assert stats["samples"] == 1 and stats["malformed_skipped"] == 0


def test_parquet_rows_with_nulls(tmp_path, smol_tokenizer):
    path = tmp_path / "d.parquet"
    rows = [GOOD, {"question": None, "answer": "a", "source": "a"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    reason = "field 'question' is null"
    _assert_both_modes(path, f"{path}:row 1", reason, smol_tokenizer, first=":row 0")


def test_conversation_the_chat_template_rejects(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['content'] == 'BOOM' %}"
        "{{ raise_exception('no BOOM please') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    records = [
        {"question": "q", "answer": "a", "_where": "f:1"},
        {"question": "BOOM", "answer": "a", "_where": "f:2"},
    ]
    reason = "the tokenizer's chat template rejects the conversation (no BOOM please)"
    with pytest.raises(DataError) as err:
        build_samples(records, tok, progress=False)
    assert str(err.value) == f"f:2: malformed record: {reason}; {FIX}"
    malformed = Malformed("skip")
    samples, stats = build_samples(records, tok, progress=False, malformed=malformed)
    assert [s.meta["where"] for s in samples] == ["f:1"]
    assert stats["malformed_skipped"] == 1 and malformed.examples == [f"f:2: {reason}"]


# ---------------------------------------------------------------- a real mixed file


def _mixed_file(path: Path) -> Path:
    good = [json.dumps({**GOOD, "answer": f"Answer {i}."}).encode() for i in range(3)]
    lines = [
        good[0],  # 1
        b"{oops",  # 2: not JSON
        b'{"question": "caf\xc3", "answer": "a"}',  # 3: a cut UTF-8 sequence
        b"",  # 4: blank, ignored
        b"[1]",  # 5: not an object
        good[1],  # 6
        b'{"question": "q"}',  # 7: no answer
        b'{"question": "q", "answer": 5}',  # 8: a number
        good[2] + b"\r",  # 9: a CRLF line end
        b'{"messages": [{"role": "user", "content": "Hi"}]}',  # 10: no assistant turn
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_mixed_file_skip_keeps_exactly_the_good_records(tmp_path, smol_tokenizer, caplog):
    path = _mixed_file(tmp_path / "mixed.jsonl")
    with caplog.at_level(logging.WARNING, logger="cllora.data"):
        samples, stats = load_samples(_cfg(path, "skip"), smol_tokenizer)
    assert [s.meta["where"] for s in samples] == [f"{path}:1", f"{path}:6", f"{path}:9"]
    decoded = [smol_tokenizer.decode(s.input_ids) for s in samples]
    assert [f"Answer {i}." in text for i, text in enumerate(decoded)] == [True] * 3
    assert (stats["records"], stats["samples"], stats["malformed_skipped"]) == (6, 3, 6)
    examples = [
        f"{path}:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{path}:3: not UTF-8 text (the byte 0xc3 at byte 18 of the line)",
        f"{path}:5: a JSON array, not an object",
        f"{path}:7: field 'answer' is missing (a qa record needs 'question' and 'answer')",
        f"{path}:8: field 'answer' is a number (5), not a string",
    ]
    assert stats["malformed_examples"] == examples
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "6 malformed records skipped (data.on_malformed=skip) (the first 5): " + "; ".join(examples)
    ]


def test_mixed_file_error_mode_stops_at_the_first_defect(tmp_path, smol_tokenizer):
    path = _mixed_file(tmp_path / "mixed.jsonl")
    assert _error(_cfg(path), smol_tokenizer) == (
        f"{path}:2: malformed record: not valid JSON (Expecting property name enclosed in double "
        f"quotes at column 2); {FIX}"
    )


def test_skip_counts_reach_the_client_data_stats(tmp_path, smol_tokenizer):
    lines = [{**GOOD, "source": src, "answer": f"A{i}."} for i in range(4) for src in "ab"]
    path = _jsonl(tmp_path / "d.jsonl", [*lines, "{oops", {"question": "q", "source": "a"}])
    data = build_clients(_cfg(path, "skip"), smol_tokenizer)
    assert data.stats["malformed_skipped"] == 2
    assert [e.split(": ")[0] for e in data.stats["malformed_examples"]] == [
        f"{path}:9",
        f"{path}:10",
    ]


# ---------------------------------------------------------------- nothing usable left


def test_file_whose_every_record_is_malformed_is_an_error(tmp_path, smol_tokenizer):
    _jsonl(tmp_path / "a.jsonl", [GOOD, GOOD])
    bad = _jsonl(tmp_path / "b.jsonl", [{"question": "q"}, {"question": "q", "answer": ""}])
    message = _error(_cfg(tmp_path, "skip"), smol_tokenizer)
    assert message == (
        f"no usable records in {bad}: all 2 of its records are malformed and were skipped (the "
        f"first: {bad}:1: field 'answer' is missing (a qa record needs 'question' and 'answer'))"
        "; fix the file or leave it out"
    )


def test_nothing_left_after_skipping_is_an_error(tmp_path, smol_tokenizer):
    path = _jsonl(tmp_path / "d.jsonl", [{"question": "q"}, "[1]"])
    message = _error(_cfg(path, "skip"), smol_tokenizer)
    assert message.startswith("no sample survived tokenization: 1 records, ")
    assert message.endswith(
        "1 skipped as malformed (2 malformed records skipped (data.on_malformed=skip): "
        f"{path}:2: a JSON array, not an object; {path}:1: field 'answer' is missing (a qa "
        "record needs 'question' and 'answer'))"
    )


def test_every_line_malformed_is_an_error_in_the_reader(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ["{oops", "[1]"])
    with pytest.raises(DataError) as err:
        read_records(path, on_malformed="skip")
    assert str(err.value) == (
        f"no usable records in {path} (read as jsonl): all 2 records are malformed and were "
        f"skipped (the last: {path}:2: a JSON array, not an object)"
    )


# ---------------------------------------------------------------- overlong: the true length


def _long_cfg(tmp_path: Path, **data):
    long = {**GOOD, "answer": " ".join(["word"] * 300), "source": "a"}
    lines = [long] + [{**GOOD, "source": s, "answer": f"A{i}."} for i in range(3) for s in "ab"]
    path = _jsonl(tmp_path / "d.jsonl", lines)
    return path, _cfg(path, "error", **data)


def test_overlong_error_states_the_true_length_not_the_measuring_cap(
    tmp_path, smol_tokenizer, monkeypatch
):
    monkeypatch.setattr(pipeline, "MEASURE_LENGTH", 100)
    path, cfg = _long_cfg(tmp_path, max_length=50, overlong="error")
    samples, _ = load_samples(cfg, smol_tokenizer)
    long = samples[0]
    assert long.num_tokens == 100 and long.truncated
    true = long.true_length
    assert true > 300
    with pytest.raises(DataError) as err:
        build_clients(cfg, smol_tokenizer)
    assert str(err.value) == (
        f"{path}:1: the record is {true} tokens long, longer than data.max_length=50 "
        f"(data.overlong=error); raise data.max_length to at least {true}, or set "
        "data.overlong=truncate (cut it) or data.overlong=drop (leave it out)"
    )


def test_overlong_error_names_the_client_window(tmp_path, smol_tokenizer):
    _, cfg = _long_cfg(tmp_path, max_length=400, client_max_length=[40], overlong="error")
    with pytest.raises(DataError, match=r"longer than data\.client_max_length\[0\]=40 "):
        build_clients(cfg, smol_tokenizer)


def test_window_at_the_measuring_cap_still_sees_longer_records(
    tmp_path, smol_tokenizer, monkeypatch
):
    monkeypatch.setattr(pipeline, "MEASURE_LENGTH", 64)
    path, cfg = _long_cfg(tmp_path, max_length=64, overlong="drop")
    assert measure_length(cfg) == 65
    samples, _ = load_samples(cfg, smol_tokenizer)
    assert samples[0].num_tokens == 65  # longer than the window, so the window drops it
    data = build_clients(cfg, smol_tokenizer)
    kept = [s.meta["where"] for c in data.clients for s in c.train + c.test]
    assert f"{path}:1" not in kept and len(kept) == 6


def test_check_model_window(tmp_path):
    cfg = _cfg(tmp_path, max_length=4096, client_max_length=[1024, 9000])
    check_model_window(cfg, None)
    check_model_window(cfg, 9000)
    with pytest.raises(DataError) as err:
        check_model_window(cfg, 8192)
    assert str(err.value) == (
        "data.client_max_length[1]=9000 is longer than the model allows "
        "(max_position_embeddings=8192); set data.client_max_length[1] to at most 8192"
    )
