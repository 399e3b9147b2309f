"""Formatting: shape detection, chat conversion, response-only masks, length policies."""

from __future__ import annotations

import copy

import pytest

from cllora.data.formatting import (
    IGNORE_INDEX,
    Sample,
    build_samples,
    detect_shape,
    record_to_chat,
    tokenize_record,
)
from cllora.data.readers import DataError

QA = {"question": "What is the capital of France?", "answer": "Paris is the capital.", "id": 7}
LONG_QA = {"question": "Say it.", "answer": " ".join(["word"] * 300), "_where": "t.jsonl:9"}


@pytest.fixture(scope="module")
def plain_tokenizer(smol_tokenizer):
    """The same tokenizer without a chat template: the plain fallback format."""
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    return tok


def _labeled_text(sample: Sample, tokenizer) -> str:
    return tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX])


def _prompt_ids(sample: Sample) -> list[int]:
    return [i for i, t in zip(sample.input_ids, sample.labels, strict=True) if t == IGNORE_INDEX]


@pytest.mark.parametrize(
    ("record", "shape"),
    [
        (QA, "qa"),
        ({"prompt": "p", "response": "r"}, "qa"),
        ({"instruction": "i", "output": "o"}, "alpaca"),
        ({"messages": [{"role": "user", "content": "u"}]}, "messages"),
        ({"text": "t"}, "text"),
    ],
)
def test_detect_shape(record, shape):
    assert detect_shape(record) == shape


def test_detect_shape_failure_lists_shapes():
    with pytest.raises(DataError, match=r"x\.jsonl:4.*qa \(question, answer or prompt, response\)"):
        detect_shape({"Q": "q", "A": "a", "_where": "x.jsonl:4"})


def test_record_to_chat_shapes():
    user_answer = [
        {"role": "user", "content": QA["question"]},
        {"role": "assistant", "content": QA["answer"]},
    ]
    assert record_to_chat(QA) == user_answer
    assert record_to_chat({"prompt": "p", "response": "r"})[1]["content"] == "r"
    alpaca = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}
    assert record_to_chat(alpaca)[0]["content"] == "Translate.\n\nBonjour"
    assert record_to_chat({**alpaca, "input": ""})[0]["content"] == "Translate."
    assert record_to_chat({"instruction": "Hi.", "output": "Hey"})[0]["content"] == "Hi."
    assert record_to_chat({"text": "raw text"}) == "raw text"
    mapped = record_to_chat(
        {"Q": QA["question"], "A": QA["answer"]}, fields={"question": "Q", "answer": "A"}
    )
    assert mapped == user_answer


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"question": "q", "_where": "f:1"}, r"f:1: malformed record: field 'answer' is missing"),
        ({"question": "q", "answer": "", "_where": "f:2"}, r"f:2: .*field 'answer' is empty"),
        ({"question": "q", "answer": " ", "_where": "f:2"}, r"f:2: .*field 'answer' is blank"),
        (
            {"question": 3, "answer": "a", "_where": "f:3"},
            r"f:3: .*field 'question' is a number \(3\), not a string",
        ),
        (
            {"messages": [{"role": "user", "content": "u"}], "_where": "f:4"},
            "has no assistant turn",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "v"},
                ],
                "_where": "f:4",
            },
            "must end with an assistant turn",
        ),
        (
            {"messages": [{"role": "user"}], "_where": "f:5"},
            r"f:5: .*field 'messages'\[0\] has no 'content'",
        ),
    ],
)
def test_record_to_chat_errors(record, match):
    with pytest.raises(DataError, match=match):
        record_to_chat(record)


def test_explicit_shape_and_bad_fields():
    with pytest.raises(DataError, match="'answer' is missing"):
        record_to_chat({"question": "q", "text": "t"}, shape="qa")
    with pytest.raises(DataError, match="fit no shape"):
        record_to_chat(QA, fields={"body": "x"})
    with pytest.raises(DataError, match="not fields of shape 'qa'"):
        record_to_chat(QA, shape="qa", fields={"text": "x"})


def test_response_only_mask_qa(smol_tokenizer):
    sample = tokenize_record(QA, smol_tokenizer)
    assert _labeled_text(sample, smol_tokenizer) == QA["answer"] + "<|im_end|>"
    # Unlabeled: everything up to the generation prompt, then the newline after <|im_end|>.
    labeled = [i for i, t in enumerate(sample.labels) if t != IGNORE_INDEX]
    first, last = labeled[0], labeled[-1]
    assert labeled == list(range(first, last + 1))
    prompt = smol_tokenizer.apply_chat_template(
        record_to_chat(QA)[:1], tokenize=False, add_generation_prompt=True
    )
    assert smol_tokenizer.decode(sample.input_ids[:first]) == prompt
    assert smol_tokenizer.decode(sample.input_ids[last + 1 :]) == "\n"
    assert sample.num_target_tokens == len(smol_tokenizer.encode(QA["answer"])) + 1
    assert sample.num_tokens == len(sample.labels) and not sample.truncated
    # Full text is exactly the chat template's rendering.
    rendered = smol_tokenizer.apply_chat_template(record_to_chat(QA), tokenize=False)
    assert smol_tokenizer.decode(sample.input_ids) == rendered


def test_meta_keeps_scalar_fields(smol_tokenizer):
    sample = tokenize_record({**QA, "tags": ["x"], "_where": "f:1"}, smol_tokenizer)
    assert sample.meta == {"id": 7, "where": "f:1", "sentences": 1}


def test_alpaca_with_and_without_input(smol_tokenizer):
    rec = {"instruction": "Translate to English.", "input": "Bonjour", "output": "Hello"}
    for record in (rec, {**rec, "input": ""}):
        sample = tokenize_record(record, smol_tokenizer)
        assert _labeled_text(sample, smol_tokenizer) == "Hello<|im_end|>"
    prompt = smol_tokenizer.decode(_prompt_ids(tokenize_record(rec, smol_tokenizer)))
    assert "Translate to English.\n\nBonjour" in prompt


def test_messages_two_assistant_turns(smol_tokenizer):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ]
    }
    sample = tokenize_record(record, smol_tokenizer)
    assert _labeled_text(sample, smol_tokenizer) == "Hello!<|im_end|>Goodbye.<|im_end|>"
    prompt = smol_tokenizer.decode(_prompt_ids(sample))
    assert "Be brief." in prompt and "Bye" in prompt and "Hello!" not in prompt


def test_text_shape_labels_everything(smol_tokenizer):
    sample = tokenize_record({"body": "Just some text."}, smol_tokenizer, fields={"text": "body"})
    assert sample.labels == sample.input_ids
    assert smol_tokenizer.decode(sample.input_ids) == "Just some text." + smol_tokenizer.eos_token


def test_response_only_false_labels_everything(smol_tokenizer):
    sample = tokenize_record(QA, smol_tokenizer, response_only=False)
    assert sample.labels == sample.input_ids


def test_plain_fallback_without_chat_template(plain_tokenizer):
    sample = tokenize_record(QA, plain_tokenizer)
    eos = plain_tokenizer.eos_token
    expected = f"### Question:\n{QA['question']}\n\n### Answer:\n{QA['answer']}{eos}"
    assert plain_tokenizer.decode(sample.input_ids) == expected
    assert _labeled_text(sample, plain_tokenizer) == QA["answer"] + eos


def test_overlong_truncate_drop_error(smol_tokenizer):
    sample = tokenize_record(LONG_QA, smol_tokenizer, max_length=64)
    assert sample.truncated and sample.num_tokens == 64
    assert 0 < sample.num_target_tokens < 64
    assert tokenize_record(LONG_QA, smol_tokenizer, max_length=64, overlong="drop") is None
    full = tokenize_record(LONG_QA, smol_tokenizer, max_length=1024).num_tokens
    assert sample.full_length == sample.true_length == full > 64
    with pytest.raises(DataError) as err:
        tokenize_record(LONG_QA, smol_tokenizer, max_length=64, overlong="error")
    assert str(err.value) == (
        f"t.jsonl:9: the record is {full} tokens long, longer than data.max_length=64 "
        f"(data.overlong=error); raise data.max_length to at least {full}, or set "
        "data.overlong=truncate (cut it) or data.overlong=drop (leave it out)"
    )
    assert not tokenize_record(LONG_QA, smol_tokenizer, max_length=1024).truncated


def test_prompt_longer_than_window_gives_none(smol_tokenizer):
    record = {"question": " ".join(["why"] * 100), "answer": "Because."}
    assert tokenize_record(record, smol_tokenizer, max_length=32) is None


def test_build_samples_stats(smol_tokenizer):
    no_target = {"question": " ".join(["why"] * 100), "answer": "Because."}
    records = [QA, LONG_QA, no_target, {"text": "plain"}]
    samples, stats = build_samples(records, smol_tokenizer, max_length=64, progress=False)
    assert stats == {
        "records": 4,
        "samples": 3,
        "truncated": 1,
        "dropped_overlong": 0,
        "dropped_no_target": 1,
        "malformed_skipped": 0,
    }
    assert [s.truncated for s in samples] == [False, True, False]
    _, stats = build_samples(
        records, smol_tokenizer, max_length=64, overlong="drop", progress=False
    )
    assert (stats["samples"], stats["dropped_overlong"], stats["dropped_no_target"]) == (2, 2, 0)
    # Batched tokenization gives the same samples as one record at a time.
    assert samples[0] == tokenize_record(QA, smol_tokenizer, max_length=64)


def test_build_samples_nothing_survives(smol_tokenizer):
    with pytest.raises(DataError, match=r"no sample survived.*1 dropped as longer"):
        build_samples([LONG_QA], smol_tokenizer, max_length=16, overlong="drop", progress=False)


def test_template_that_is_not_prefix_stable(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "[{{ messages | length }} turns]"
    )
    with pytest.raises(DataError, match=r"f:1: .*not prefix-stable"):
        tokenize_record({**QA, "_where": "f:1"}, tok)
    assert tokenize_record(QA, tok, response_only=False).labels  # no spans needed


class _SlowTokenizer:
    """The fixture tokenizer seen as a slow one (no offsets): the piecewise encoding path."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok
        self.eos_token, self.chat_template = tok.eos_token, tok.chat_template

    def apply_chat_template(self, *args, **kwargs):
        return self._tok.apply_chat_template(*args, **kwargs)

    def encode(self, text, add_special_tokens=False):
        return self._tok.encode(text, add_special_tokens=add_special_tokens)


def test_slow_tokenizer_path_matches_fast(smol_tokenizer):
    slow = tokenize_record(QA, _SlowTokenizer(smol_tokenizer))
    assert slow == tokenize_record(QA, smol_tokenizer)


def test_messages_must_start_with_user_or_system():
    record = {"messages": [{"role": "assistant", "content": "a"}], "_where": "f:2"}
    with pytest.raises(DataError, match=r"f:2: .*must start with a user"):
        record_to_chat(record)
