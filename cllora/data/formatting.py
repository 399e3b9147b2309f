"""Turn records into chat messages and then into token ids with a response-only loss mask.

Usage::

    from cllora.data.formatting import build_samples, record_to_chat, tokenize_record

    record_to_chat({"question": "Why?", "answer": "Because."})
    # [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]
    samples, stats = build_samples(records, tokenizer, max_length=256)
    samples[0].input_ids, samples[0].labels     # labels are -100 outside the assistant turns
    samples[0].meta      # the record's other scalar fields, "where" (file:line), "sentences"
    stats   # {"records": .., "samples": .., "truncated": .., "dropped_overlong": ..,
            #  "dropped_no_target": .., "malformed_skipped": ..}
    build_samples(records, tokenizer, on_malformed="skip")   # skip records with bad fields

Record shapes (``SHAPES``; "auto" picks the first whose leading field the record has, in the
order messages, alpaca, qa, text; a missing second field is then a clear error):

- ``qa``: ``question`` + ``answer`` (or ``prompt`` + ``response``)
- ``alpaca``: ``instruction`` + optional ``input`` + ``output``; the user turn is the
  instruction, then a blank line and the input when the input is not empty
- ``messages``: ``messages``, a list of ``{"role", "content"}`` ending with an assistant turn
- ``text``: ``text``, plain text trained on every token (an end-of-sequence token is appended)

``fields`` maps a shape's canonical field names to the record's own, e.g.
``{"question": "Q", "answer": "A"}``.

Malformed records (:class:`cllora.data.readers.RecordError`, naming ``file:line``, the cause and
the fix): no field that tells the shape; a required field that is missing, null, not a string,
empty or blank, or holds an unpaired surrogate; a ``messages`` value that is not a non-empty
list, a turn that is not a ``{"role": str, "content": str}`` object, an unknown role (allowed:
``ROLES``), an empty user or assistant turn, a conversation that starts with the assistant, has
no assistant turn or does not end with one; a conversation the chat template rejects. With
``on_malformed="error"`` the first raises; with ``"skip"`` each is skipped and counted (a file
whose every record is skipped is still an error). Configuration errors (``fields`` that fit no
shape, a template that is not prefix-stable) always raise.

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
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from cllora.data.readers import DataError, Malformed, RecordError, json_type, where_file
from cllora.data.sentences import count_sentences

# The label of a token that carries no loss (torch's cross_entropy ignore_index default), defined
# here once for cllora; cllora_kernels (kernels/cllora_kernels/reference.py), which imports
# nothing of cllora, holds the same value (tests/model/test_loss.py checks they agree).
IGNORE_INDEX = -100

try:  # the errors of chat templates (transformers renders them with jinja2)
    from jinja2 import TemplateError as _TemplateError
    from jinja2 import TemplateSyntaxError as _TemplateSyntaxError
except ImportError:  # pragma: no cover - no jinja2, no chat templates
    _TemplateError = _TemplateSyntaxError = ()  # type: ignore[assignment,misc]

SHAPES = ("qa", "alpaca", "messages", "text")
SHAPE_FIELDS: dict[str, tuple[str, ...]] = {
    "qa": ("question", "answer"),
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages",),
    "text": ("text",),
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "qa": ("question", "answer"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
QA_ALIASES = {"question": "prompt", "answer": "response"}
ROLES = ("system", "user", "assistant")
OVERLONG = ("truncate", "drop", "error")
_PLAIN_ROLES = {"system": "System", "user": "Question", "assistant": "Answer"}
_CHUNK = 512  # records tokenized per call of the tokenizer
_SURROGATE = re.compile("[\\ud800-\\udfff]")


@dataclass
class Sample:
    """One tokenized example. ``labels`` is ``input_ids`` with -100 where there is no loss.

    ``full_length`` is the record's whole token count when it was cut (0 when it was not).
    ``meta``: the record's other scalar fields, ``where`` (``file:line``) and ``sentences``
    (the sentences of the response, :func:`response_sentences`).
    """

    input_ids: list[int]
    labels: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False
    full_length: int = 0

    @property
    def true_length(self) -> int:
        """The record's token count before any cut."""
        return max(self.full_length, len(self.input_ids))

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
    raise RecordError(
        _where(record),
        f"cannot tell the record shape from its fields {fields}; expected one of: {_shape_help()}",
        "set data.shape and data.fields (e.g. {question: Q, answer: A})",
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


def _a(word: str) -> str:
    """``word`` with its indefinite article: "a number", "an array"."""
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _text_problem(value: Any) -> str:
    """Why ``value`` is not usable text ("" when it is)."""
    if value is None:
        return "is null"
    if not isinstance(value, str):
        return f"is {_a(json_type(value))} ({value!r:.40}), not a string"
    if not value.strip():
        return "is blank (only whitespace)" if value else "is empty"
    if _SURROGATE.search(value):
        return "holds an unpaired surrogate (like \\ud800), not valid Unicode text"
    return ""


def _text_field(record: dict, key: str, need: str, optional: bool = False) -> str:
    """The text of ``record[key]``; ``need`` names the shape's required fields for the error."""
    if key not in record:
        if optional:
            return ""
        raise RecordError(_where(record), f"field {key!r} is missing ({need})")
    value = record[key]
    if optional and (value is None or (isinstance(value, str) and not value.strip())):
        return ""
    problem = _text_problem(value)
    if problem:
        raise RecordError(_where(record), f"field {key!r} {problem}")
    return value


def _check_turn(where: str, at: str, message: Any) -> dict[str, str]:
    """One ``messages`` item as ``{"role", "content"}``; ``at`` names it (field 'messages'[i])."""
    if not isinstance(message, dict):
        kind = _a(json_type(message))
        raise RecordError(where, f"{at} is {kind}, not a {{role, content}} object")
    for name in ("role", "content"):
        if name not in message:
            raise RecordError(where, f"{at} has no {name!r} (a turn is {{role, content}})")
        if not isinstance(message[name], str):
            raise RecordError(where, f"{at}: {name!r} {_text_problem(message[name])}")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise RecordError(
            where, f"{at} has the unknown role {role!r} (allowed: {', '.join(ROLES)})"
        )
    problem = _text_problem(content)
    if problem and not (role == "system" and not content.strip()):
        raise RecordError(where, f"{at}: the {role} turn's content {problem}")
    return {"role": role, "content": content}


def _check_messages(record: dict, key: str) -> list[dict]:
    where = _where(record)
    if key not in record:
        raise RecordError(where, f"field {key!r} is missing (a messages record needs {key!r})")
    messages = record[key]
    if not isinstance(messages, list):
        problem = "is null" if messages is None else f"is {_a(json_type(messages))}"
        raise RecordError(where, f"field {key!r} {problem}, not a list of {{role, content}} turns")
    if not messages:
        raise RecordError(where, f"field {key!r} is an empty list")
    turns = [_check_turn(where, f"field {key!r}[{i}]", m) for i, m in enumerate(messages)]
    roles = [t["role"] for t in turns]
    if roles[0] == "assistant":
        raise RecordError(where, f"field {key!r} must start with a user (or system) turn")
    if "assistant" not in roles:
        raise RecordError(where, f"field {key!r} has no assistant turn (nothing to train on)")
    if roles[-1] != "assistant":
        raise RecordError(where, f"field {key!r} must end with an assistant turn")
    return turns


def _needs(shape: str, mapping: dict[str, str]) -> str:
    names = " and ".join(repr(mapping[name]) for name in REQUIRED[shape])
    return f"{_a(shape)} record needs {names}"


def _chat(record: dict, shape: str, mapping: dict[str, str]) -> list[dict] | str:
    if shape == "messages":
        return _check_messages(record, mapping["messages"])
    need = _needs(shape, mapping)
    if shape == "text":
        return _text_field(record, mapping["text"], need)
    if shape == "qa":
        user = _text_field(record, mapping["question"], need)
        answer = _text_field(record, mapping["answer"], need)
    else:
        user = _text_field(record, mapping["instruction"], need)
        extra = _text_field(record, mapping["input"], need, optional=True)
        user = f"{user}\n\n{extra}" if extra else user
        answer = _text_field(record, mapping["output"], need)
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


def response_sentences(chat: list[dict] | str) -> int:
    """Sentences of the response (:mod:`cllora.data.sentences`): of every assistant turn's
    content, or of the whole text of a ``text`` record (trained on every token). Prompts never
    count, whatever ``response_only`` says; counted on the record's text, before any cut."""
    if isinstance(chat, str):
        return count_sentences(chat)
    return sum(count_sentences(m["content"]) for m in chat if m["role"] == "assistant")


def _render(
    tokenizer: Any, chat: list[dict], where: str, response_only: bool
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text and its labeled spans; a template that rejects this one
    conversation (``raise_exception`` in the template) makes the record malformed."""
    try:
        if not getattr(tokenizer, "chat_template", None):
            return _render_plain(tokenizer, chat)
        if response_only:
            return _render_template(tokenizer, chat, where)
        text = tokenizer.apply_chat_template(chat, tokenize=False)  # any template works
        return text, [(0, len(text))]
    except _TemplateSyntaxError as e:
        raise DataError(f"the tokenizer's chat template is broken ({e}); fix the template") from e
    except _TemplateError as e:
        reason = f"the tokenizer's chat template rejects the conversation ({e})"
        raise RecordError(where, reason) from None


def _prepare(
    record: dict, tokenizer: Any, shape: str, fields: dict | None, response_only: bool
) -> _Prepared:
    shape, mapping = _resolve(record, shape, fields)
    chat = _chat(record, shape, mapping)
    meta = _meta(record, mapping)
    meta["sentences"] = response_sentences(chat)
    if isinstance(chat, str):
        text = chat + (tokenizer.eos_token or "")
        return _Prepared(text, [(0, len(text))], meta)
    text, spans = _render(tokenizer, chat, meta["where"], response_only)
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


def overlong_message(where: str, tokens: int, limit: int, knob: str = "data.max_length") -> str:
    """The error for a record of ``tokens`` tokens (its true length) over a ``limit``."""
    return (
        f"{where}: the record is {tokens} tokens long, longer than {knob}={limit} "
        f"(data.overlong=error); raise {knob} to at least {tokens}, or set "
        "data.overlong=truncate (cut it) or data.overlong=drop (leave it out)"
    )


def _finish(
    ids: list[int], labels: list[int], meta: dict, max_length: int, overlong: str
) -> tuple[Sample | None, str]:
    """Apply the length policy; returns the sample (or None) and what happened to it.

    ``ids`` is the whole record (the tokenizer never cuts), so its length is the true one.
    """
    full_length = len(ids)
    truncated = full_length > max_length
    if truncated:
        if overlong == "drop":
            return None, "dropped_overlong"
        if overlong == "error":
            raise DataError(overlong_message(meta["where"], full_length, max_length))
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None, "dropped_no_target"
    sample = Sample(ids, labels, meta, truncated, full_length if truncated else 0)
    return sample, "truncated" if truncated else "ok"


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


def _prepare_or_skip(
    record: dict, tokenizer: Any, opts: _Options, malformed: Malformed
) -> _Prepared | str:
    """The prepared record, or the ``"where: reason"`` of a malformed one that is skipped
    (raises in error mode)."""
    try:
        return _prepare(record, tokenizer, opts.shape, opts.fields, opts.response_only)
    except RecordError as e:
        if malformed.mode == "error":
            raise
        malformed(e.where, e.reason, e.hint)
        return malformed.last


def _process(
    records: list[dict], tokenizer: Any, opts: _Options, malformed: Malformed
) -> list[tuple[Sample | None, str]]:
    """(sample or None, outcome) per record; outcome is ok, truncated, dropped_overlong,
    dropped_no_target or, for a skipped malformed record, ``"malformed: <where>: <reason>"``."""
    prepared = [_prepare_or_skip(r, tokenizer, opts, malformed) for r in records]
    good = [item for item in prepared if isinstance(item, _Prepared)]
    encoded = iter(_encode(tokenizer, good) if good else [])
    results: list[tuple[Sample | None, str]] = []
    for item in prepared:
        if isinstance(item, str):
            results.append((None, f"malformed: {item}"))
            continue
        ids, labels = next(encoded)
        results.append(_finish(ids, labels, item.meta, opts.max_length, opts.overlong))
    return results


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
    ``overlong="drop"``, or no labeled token left inside ``max_length``). A malformed record
    raises :class:`~cllora.data.readers.RecordError`."""
    opts = _Options(shape, fields, max_length, overlong, response_only)
    return _process([record], tokenizer, opts, Malformed("error"))[0][0]


class _FileTally:
    """Records and malformed records per file, to find files left without any record."""

    def __init__(self, records: list[dict]) -> None:
        self.total = Counter(where_file(_where(r)) for r in records)
        self.lost: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def skipped(self, record: dict, reason: str) -> None:
        file = where_file(_where(record))
        self.lost[file] += 1
        self.first.setdefault(file, reason)

    def check(self) -> None:
        """With records from several files, one whose every record was skipped is an error."""
        if len(self.total) < 2:
            return  # a single source: the "no sample survived" error says it
        for file, n in self.lost.items():
            if n == self.total[file]:
                raise DataError(
                    f"no usable records in {file}: all {n} of its records are malformed and "
                    f"were skipped (the first: {self.first[file]}); fix the file or leave it out"
                )


def _nothing_survived(stats: dict[str, int], opts: _Options, malformed: Malformed) -> str:
    skipped = (
        f", {stats['malformed_skipped']} skipped as malformed ({malformed.summary()})"
        if stats["malformed_skipped"]
        else ""
    )
    return (
        f"no sample survived tokenization: {stats['records']} records, "
        f"{stats['dropped_overlong']} dropped as longer than max_length={opts.max_length} "
        f"(overlong={opts.overlong}), {stats['dropped_no_target']} with no response token "
        f"inside the first max_length tokens{skipped}"
    )


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
    on_malformed: str = "error",
    malformed: Malformed | None = None,
) -> tuple[list[Sample], dict[str, int]]:
    """Tokenize every record (in batches); returns the surviving samples and counts of what
    happened: records, samples, truncated, dropped_overlong, dropped_no_target and
    malformed_skipped (the records skipped here with ``on_malformed="skip"``).

    With a ``malformed`` collector (its mode wins over ``on_malformed``) the skips are counted
    there too and the caller reports them; without one they are logged here as one warning.
    """
    opts = _Options(shape, fields, max_length, overlong, response_only)
    collector = Malformed(on_malformed) if malformed is None else malformed
    try:
        samples, stats = _build(records, tokenizer, opts, collector, progress)
    finally:
        if malformed is None:
            collector.report()
    return samples, stats


def _build(
    records: list[dict], tokenizer: Any, opts: _Options, malformed: Malformed, progress: bool
) -> tuple[list[Sample], dict[str, int]]:
    stats = dict(records=len(records), samples=0, truncated=0, dropped_overlong=0)
    stats.update(dropped_no_target=0, malformed_skipped=0)
    tally = _FileTally(records)
    samples: list[Sample] = []
    with tqdm(total=len(records), desc="tokenize", unit="rec", disable=not progress) as bar:
        for start in range(0, len(records), _CHUNK):
            chunk = records[start : start + _CHUNK]
            for record, (sample, outcome) in zip(
                chunk, _process(chunk, tokenizer, opts, malformed), strict=True
            ):
                if sample is not None:
                    samples.append(sample)
                if outcome.startswith("malformed: "):
                    stats["malformed_skipped"] += 1
                    tally.skipped(record, outcome.removeprefix("malformed: "))
                elif outcome != "ok":
                    stats[outcome] += 1
            bar.update(len(chunk))
    stats["samples"] = len(samples)
    tally.check()
    if not samples:
        raise DataError(_nothing_survived(stats, opts, malformed))
    return samples, stats
