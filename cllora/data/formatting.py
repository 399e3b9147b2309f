"""Turn records into chat messages and then into token ids with a response-only loss mask.

Usage::

    from cllora.data.formatting import build_samples, record_to_chat, tokenize_record

    record_to_chat({"question": "Why?", "answer": "Because."})
    # [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]
    samples, stats = build_samples(records, tokenizer, max_length=256)
    samples[0].input_ids, samples[0].labels     # labels are -100 outside the assistant turns
    stats   # {"records": .., "samples": .., "truncated": .., "dropped_overlong": ..,
            #  "dropped_no_target": ..}

Record shapes (``SHAPES``; "auto" picks the first whose leading field the record has, in the
order messages, alpaca, qa, text; a missing second field is then a clear error):

- ``qa``: ``question`` + ``answer`` (or ``prompt`` + ``response``)
- ``alpaca``: ``instruction`` + optional ``input`` + ``output``; the user turn is the
  instruction, then a blank line and the input when the input is not empty
- ``messages``: ``messages``, a list of ``{"role", "content"}`` ending with an assistant turn
- ``text``: ``text``, plain text trained on every token (an end-of-sequence token is appended)

``fields`` maps a shape's canonical field names to the record's own, e.g.
``{"question": "Q", "answer": "A"}``.

Rendering: with ``tokenizer.chat_template`` set, the conversation is rendered by
``apply_chat_template``. Without one, a plain format is used::

    ### System:\\n<system>\\n\\n### Question:\\n<user>\\n\\n### Answer:\\n<assistant><eos>

Response-only loss labels exactly the assistant turns: their content plus the token that closes
the turn (``<|im_end|>`` for ChatML templates, ``<eos>`` in the plain format). The character span of
each assistant turn is found by rendering prefixes of the conversation, which must be prefixes of
the full rendering (the template must be *prefix-stable*); the full text is then tokenized once and
a token is labeled when its first character lies inside an assistant span. Labels are aligned with
``input_ids`` (the model shifts them, as Hugging Face models do).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from cllora.data.readers import DataError
from cllora.model.loss import IGNORE_INDEX

SHAPES = ("qa", "alpaca", "messages", "text")
SHAPE_FIELDS: dict[str, tuple[str, ...]] = {
    "qa": ("question", "answer"),
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages",),
    "text": ("text",),
}
QA_ALIASES = {"question": "prompt", "answer": "response"}
OVERLONG = ("truncate", "drop", "error")
_PLAIN_ROLES = {"system": "System", "user": "Question", "assistant": "Answer"}
_CHUNK = 512  # records tokenized per call of the tokenizer


@dataclass
class Sample:
    """One tokenized example. ``labels`` is ``input_ids`` with -100 where there is no loss."""

    input_ids: list[int]
    labels: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_target_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _where(record: dict) -> str:
    return str(record.get("_where", "<record>"))


def _shape_help() -> str:
    return "; ".join(
        f"{shape} ({', '.join(SHAPE_FIELDS[shape])}"
        + (f" or {', '.join(QA_ALIASES.values())}" if shape == "qa" else "")
        + ")"
        for shape in SHAPES
    )


def detect_shape(record: dict) -> str:
    """The shape of ``record`` by its leading field: ``messages`` -> messages, ``instruction`` ->
    alpaca, ``question`` or ``prompt`` -> qa, ``text`` -> text (checked in that order)."""
    if "messages" in record:
        return "messages"
    if "instruction" in record:
        return "alpaca"
    if "question" in record or "prompt" in record:
        return "qa"
    if "text" in record:
        return "text"
    fields = sorted(k for k in record if k != "_where")
    raise DataError(
        f"{_where(record)}: cannot tell the record shape from its fields {fields}; expected one "
        f"of: {_shape_help()}. Set data.shape and data.fields (e.g. {{question: Q, answer: A}})"
    )


def _resolve(record: dict, shape: str, fields: dict[str, str] | None) -> tuple[str, dict[str, str]]:
    """The record's shape and the mapping canonical field -> record field."""
    fields = dict(fields or {})
    if shape == "auto" and fields:
        matches = [s for s in SHAPES if set(fields) <= set(SHAPE_FIELDS[s])]
        if not matches:
            raise DataError(f"data.fields {fields} fit no shape; fields per shape: {_shape_help()}")
        shape = matches[0]
    elif shape == "auto":
        shape = detect_shape(record)
    if shape not in SHAPES:
        raise DataError(f"unknown record shape {shape!r}; allowed: auto, {', '.join(SHAPES)}")
    unknown = set(fields) - set(SHAPE_FIELDS[shape])
    if unknown:
        raise DataError(
            f"data.fields names {sorted(unknown)}, not fields of shape {shape!r} "
            f"({', '.join(SHAPE_FIELDS[shape])})"
        )
    mapping = {name: name for name in SHAPE_FIELDS[shape]}
    if shape == "qa" and not fields and "question" not in record and "prompt" in record:
        mapping.update(QA_ALIASES)
    mapping.update(fields)
    return shape, mapping


def _text_field(record: dict, key: str, optional: bool = False) -> str:
    value = record.get(key)
    if optional and value in (None, ""):
        return ""
    if key not in record or value is None:
        problem = "is missing"
    elif not isinstance(value, str):
        problem = f"is not a string (got {type(value).__name__})"
    elif not value.strip():
        problem = "is empty"
    else:
        return value
    raise DataError(f"{_where(record)}: field {key!r} {problem}")


def _check_messages(record: dict, key: str) -> list[dict]:
    messages = record.get(key)
    where = _where(record)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of {{role, content}}")
    for i, message in enumerate(messages):
        ok = isinstance(message, dict) and isinstance(message.get("role"), str)
        if not ok or not isinstance(message.get("content"), str):
            raise DataError(
                f"{where}: field {key!r}[{i}] must be {{'role': str, 'content': str}}, "
                f"got {message!r:.80}"
            )
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(f"{where}: field {key!r}[{i}] is an empty assistant turn")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: field {key!r} must start with a user (or system) turn")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: field {key!r} must end with an assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _chat(record: dict, shape: str, mapping: dict[str, str]) -> list[dict] | str:
    if shape == "text":
        return _text_field(record, mapping["text"])
    if shape == "messages":
        return _check_messages(record, mapping["messages"])
    if shape == "qa":
        user = _text_field(record, mapping["question"])
        answer = _text_field(record, mapping["answer"])
    else:
        user = _text_field(record, mapping["instruction"])
        extra = _text_field(record, mapping["input"], optional=True)
        user = f"{user}\n\n{extra}" if extra.strip() else user
        answer = _text_field(record, mapping["output"])
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def record_to_chat(
    record: dict, shape: str = "auto", fields: dict[str, str] | None = None
) -> list[dict] | str:
    """Chat messages (the last from the assistant) for qa/alpaca/messages; the string for text."""
    shape, mapping = _resolve(record, shape, fields)
    return _chat(record, shape, mapping)


# ---------------------------------------------------------------- rendering to text + spans


def _render_template(tokenizer: Any, messages: list[dict], where: str) -> tuple[str, list]:
    """Full text and the (start, end) character span of each assistant turn."""

    def render(msgs: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=generation_prompt
        )

    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], True) if i else ""
        after = full if i == len(messages) - 1 else render(messages[: i + 1], False)
        if not (full.startswith(before) and full.startswith(after) and len(after) > len(before)):
            raise DataError(
                f"{where}: the tokenizer's chat template is not prefix-stable (rendering the "
                f"conversation up to assistant turn {i} is not a prefix of the whole), so the "
                "assistant tokens cannot be located; use data.response_only=false or a "
                "tokenizer with a prefix-stable template"
            )
        # The turn's content plus its end-of-turn marker, without the whitespace after it.
        spans.append((len(before), len(before) + len(after[len(before) :].rstrip())))
    return full, spans


def _render_plain(tokenizer: Any, messages: list[dict]) -> tuple[str, list]:
    """The plain fallback format (see the module docstring) and the assistant spans."""
    eos = tokenizer.eos_token or ""
    text, spans = "", []
    for i, message in enumerate(messages):
        role = message["role"]
        text += f"### {_PLAIN_ROLES.get(role, role.capitalize())}:\n"
        if role == "assistant":
            start = len(text)
            text += message["content"] + eos
            spans.append((start, len(text)))
        else:
            text += message["content"]
        if i < len(messages) - 1:
            text += "\n\n"
    return text, spans


@dataclass
class _Prepared:
    text: str
    spans: list[tuple[int, int]]  # labeled character ranges
    meta: dict[str, Any]


def _meta(record: dict, mapping: dict[str, str]) -> dict[str, Any]:
    used = set(mapping.values()) | {"_where"}
    meta = {
        k: v
        for k, v in record.items()
        if k not in used and (v is None or isinstance(v, str | int | float | bool))
    }
    meta["where"] = _where(record)
    return meta


def _prepare(
    record: dict, tokenizer: Any, shape: str, fields: dict | None, response_only: bool
) -> _Prepared:
    shape, mapping = _resolve(record, shape, fields)
    chat = _chat(record, shape, mapping)
    meta = _meta(record, mapping)
    if isinstance(chat, str):
        text = chat + (tokenizer.eos_token or "")
        return _Prepared(text, [(0, len(text))], meta)
    if not getattr(tokenizer, "chat_template", None):
        text, spans = _render_plain(tokenizer, chat)
    elif response_only:
        text, spans = _render_template(tokenizer, chat, meta["where"])
    else:  # no spans needed, so any template works
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    return _Prepared(text, spans if response_only else [(0, len(text))], meta)


# ---------------------------------------------------------------- tokenizing


def _labels_from_offsets(ids: list[int], offsets: list, spans: list) -> list[int]:
    """``ids`` where the token's first character lies in a span, else -100."""
    starts = [start for start, _end in offsets]  # non-decreasing
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in spans:
        lo, hi = bisect.bisect_left(starts, a), bisect.bisect_left(starts, b)
        labels[lo:hi] = ids[lo:hi]
    return labels


def _encode_pieces(tokenizer: Any, item: _Prepared) -> tuple[list[int], list[int]]:
    """Slow-tokenizer path (no offsets): encode labeled and unlabeled pieces separately."""
    bounds = sorted({0, len(item.text), *(b for span in item.spans for b in span)})
    ids: list[int] = []
    labels: list[int] = []
    for a, b in itertools.pairwise(bounds):
        piece = tokenizer.encode(item.text[a:b], add_special_tokens=False)
        inside = any(s <= a < e for s, e in item.spans)
        ids += piece
        labels += piece if inside else [IGNORE_INDEX] * len(piece)
    return ids, labels


def _encode(tokenizer: Any, items: list[_Prepared]) -> list[tuple[list[int], list[int]]]:
    if not getattr(tokenizer, "is_fast", False):
        return [_encode_pieces(tokenizer, item) for item in items]
    enc = tokenizer(
        [item.text for item in items], add_special_tokens=False, return_offsets_mapping=True
    )
    return [
        (ids, _labels_from_offsets(ids, offsets, item.spans))
        for ids, offsets, item in zip(enc["input_ids"], enc["offset_mapping"], items, strict=True)
    ]


def _finish(
    ids: list[int], labels: list[int], meta: dict, max_length: int, overlong: str
) -> tuple[Sample | None, str]:
    """Apply the length policy; returns the sample (or None) and what happened to it."""
    truncated = len(ids) > max_length
    if truncated:
        if overlong == "drop":
            return None, "dropped_overlong"
        if overlong == "error":
            raise DataError(
                f"{meta['where']}: {len(ids)} tokens, longer than max_length={max_length} "
                "(data.overlong=error; use truncate or drop)"
            )
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None, "dropped_no_target"
    return Sample(ids, labels, meta, truncated), "truncated" if truncated else "ok"


@dataclass(frozen=True)
class _Options:
    shape: str
    fields: dict[str, str] | None
    max_length: int
    overlong: str
    response_only: bool

    def __post_init__(self) -> None:
        if self.overlong not in OVERLONG:
            raise DataError(f"overlong must be one of {', '.join(OVERLONG)}, got {self.overlong!r}")
        if self.max_length < 1:
            raise DataError(f"max_length must be >= 1, got {self.max_length}")


def _process(
    records: list[dict], tokenizer: Any, opts: _Options
) -> list[tuple[Sample | None, str]]:
    items = [_prepare(r, tokenizer, opts.shape, opts.fields, opts.response_only) for r in records]
    return [
        _finish(ids, labels, item.meta, opts.max_length, opts.overlong)
        for (ids, labels), item in zip(_encode(tokenizer, items), items, strict=True)
    ]


def tokenize_record(
    record: dict,
    tokenizer: Any,
    *,
    shape: str = "auto",
    fields: dict[str, str] | None = None,
    max_length: int = 256,
    overlong: str = "truncate",
    response_only: bool = True,
) -> Sample | None:
    """One record as a :class:`Sample`, or None when it is dropped (overlong with
    ``overlong="drop"``, or no labeled token left inside ``max_length``)."""
    opts = _Options(shape, fields, max_length, overlong, response_only)
    return _process([record], tokenizer, opts)[0][0]


def build_samples(
    records: list[dict],
    tokenizer: Any,
    *,
    shape: str = "auto",
    fields: dict[str, str] | None = None,
    max_length: int = 256,
    overlong: str = "truncate",
    response_only: bool = True,
    progress: bool = True,
) -> tuple[list[Sample], dict[str, int]]:
    """Tokenize every record (in batches); returns the surviving samples and counts of what
    happened: records, samples, truncated, dropped_overlong, dropped_no_target."""
    opts = _Options(shape, fields, max_length, overlong, response_only)
    stats = dict(records=len(records), samples=0, truncated=0, dropped_overlong=0)
    stats["dropped_no_target"] = 0
    samples: list[Sample] = []
    with tqdm(total=len(records), desc="tokenize", unit="rec", disable=not progress) as bar:
        for start in range(0, len(records), _CHUNK):
            chunk = records[start : start + _CHUNK]
            for sample, outcome in _process(chunk, tokenizer, opts):
                if sample is not None:
                    samples.append(sample)
                if outcome != "ok":
                    stats[outcome] += 1
            bar.update(len(chunk))
    stats["samples"] = len(samples)
    if not samples:
        raise DataError(
            f"no sample survived tokenization: {stats['records']} records, "
            f"{stats['dropped_overlong']} dropped as longer than max_length={max_length} "
            f"(overlong={overlong}), {stats['dropped_no_target']} with no response token "
            "inside the first max_length tokens"
        )
    return samples, stats
