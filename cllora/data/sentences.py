"""Sentence counts: the second per-sample measure of the partition (``length_measure=sentences``).

Usage::

    from cllora.data.sentences import count_sentences, split_sentences

    count_sentences("Take 1.5 mg, e.g. after meals. Then rest!")    # 2
    split_sentences("Hello there. How are you? Fine")
    # ["Hello there.", "How are you?", "Fine"]
    count_sentences(""), count_sentences("...")                      # 0, 0

What a sentence is: a piece of text, between two sentence ends, that holds at least one letter
(any script). A sentence end is

- ``.``, ``!`` or ``?``, optionally followed by closing quotes or brackets, then whitespace;
- a blank line (paragraphs, a heading, a list block).

Not an end: a point inside a number (``1.5 mg``: no whitespace follows it); the point of a dotted
abbreviation (``e.g.``, ``i.e.``, ``U.S.``, ``a.m.``) or of one in :data:`ABBREVIATIONS` (``Dr.``,
``vs.``, ``et al.``); a single line break (a wrapped line goes on with its sentence). The last
piece counts without final punctuation. A piece without a letter is no sentence (``...``, the
``1.`` of a numbered list). What this cannot tell: an abbreviation that really ends a sentence
("... in the U.S. Then") is read as one sentence, an abbreviation not listed (``approx.`` is,
``etc.`` is not, since it often ends one) as an end.
"""

from __future__ import annotations

import re

# Abbreviations (lower case, without their point) whose point does not end a sentence.
ABBREVIATIONS = ("al", "approx", "cf", "dr", "fig", "mr", "mrs", "ms", "prof", "viz", "vs")

_BOUNDARY = re.compile(r"(?P<blank>[ \t]*\n\s*\n)|(?P<end>(?<=[.!?])[\"'\u201d\u2019)\]]*\s+)")
_ABBREVIATED = re.compile(
    r"(?<![\w.])(?:(?:[a-z]\.){2,}|(?:" + "|".join(ABBREVIATIONS) + r")\.)$", re.IGNORECASE
)
_LETTER = re.compile(r"[^\W\d_]")


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (stripped), by the rule of the module docstring."""
    pieces, start = [], 0
    for m in _BOUNDARY.finditer(text):
        if m.lastgroup == "end" and _ABBREVIATED.search(text, start, m.start()):
            continue  # an abbreviation's point: the sentence goes on
        pieces.append(text[start : m.end()])
        start = m.end()
    pieces.append(text[start:])
    return [p.strip() for p in pieces if _LETTER.search(p)]


def count_sentences(text: str) -> int:
    """The number of sentences of ``text`` (:func:`split_sentences`)."""
    return len(split_sentences(text))
