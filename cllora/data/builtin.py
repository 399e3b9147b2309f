"""An offline question/answer corpus made from documentation that ships with Python itself.

Usage::

    from cllora.data.builtin import builtin_records

    records = builtin_records()        # [{"question", "answer", "source", "_where"}, ...]
    {r["source"] for r in records}     # {"language", "text", "data", "numeric", "system"}

Sources (one natural federated client each):

- ``language``: the language reference topics of :mod:`pydoc_data.topics` (what ``help("with")``
  shows); question "Explain <topic title> in Python.", answer the topic text. Long answers.
- ``text`` / ``data`` / ``numeric`` / ``system``: docstrings (at least ``MIN_WORDS`` words) of the
  public functions, classes and methods of a fixed list of side-effect-free standard-library
  modules (``MODULE_GROUPS``); question "What does `json.dumps` do?" or "What is the
  `collections.Counter` class for?". Short to medium answers.

Everything is sorted and each docstring source is thinned to at most ``MAX_PER_SOURCE`` records
(evenly spaced over the sorted names), so the corpus is identical across runs on the same Python
and the clients are of comparable size. Texts differ between Python versions.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

MIN_WORDS = 20
MAX_PER_SOURCE = 90
MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "text": (
        "re", "string", "textwrap", "difflib", "unicodedata", "html", "shlex", "fnmatch",
        "base64", "codecs",
    ),
    "data": (
        "json", "csv", "collections", "heapq", "bisect", "itertools", "functools", "operator",
        "dataclasses", "enum", "array", "struct", "contextlib", "queue", "graphlib",
    ),
    "numeric": ("math", "statistics", "random", "fractions", "decimal", "cmath", "numbers"),
    "system": (
        "os", "os.path", "pathlib", "shutil", "tempfile", "subprocess", "time", "datetime",
        "glob",
    ),
}  # fmt: skip


def _own_doc(obj: Any) -> str | None:
    """The object's own docstring, cleaned (never one inherited from a base class)."""
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return None
    doc = inspect.cleandoc(doc)
    return doc if len(doc.split()) >= MIN_WORDS else None


def _public_names(module: Any) -> list[str]:
    names = getattr(module, "__all__", None) or dir(module)
    return sorted({n for n in names if not n.startswith("_")})


def _class_methods(cls: type) -> list[tuple[str, Any]]:
    """Public methods defined in the class body itself, sorted by name."""
    methods = []
    for name, attr in sorted(vars(cls).items()):
        func = attr.__func__ if isinstance(attr, classmethod | staticmethod) else attr
        if not name.startswith("_") and inspect.isroutine(func):
            methods.append((name, func))
    return methods


def _module_entries(module_name: str) -> list[tuple[str, str, str]]:
    """(qualified name, kind, docstring) for the documented public API of one module."""
    module = importlib.import_module(module_name)
    entries = []
    for name in _public_names(module):
        obj = getattr(module, name, None)
        if not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        qual = f"{module_name}.{name}"
        doc = _own_doc(obj)
        if doc:
            entries.append((qual, "class" if inspect.isclass(obj) else "function", doc))
        if inspect.isclass(obj):
            for method_name, method in _class_methods(obj):
                doc = _own_doc(method)
                if doc:
                    entries.append((f"{qual}.{method_name}", "function", doc))
    return entries


def _thin(items: list, limit: int) -> list:
    """At most ``limit`` items, evenly spaced over the list (deterministic)."""
    if len(items) <= limit:
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def _docstring_records(seen: set[str]) -> list[dict]:
    records = []
    for source, modules in MODULE_GROUPS.items():
        group = []
        for module_name in modules:
            for qual, kind, doc in _module_entries(module_name):
                if doc in seen:  # aliases and re-exports share one docstring
                    continue
                seen.add(doc)
                question = (
                    f"What is the `{qual}` class for?"
                    if kind == "class"
                    else f"What does `{qual}` do?"
                )
                group.append(
                    {"question": question, "answer": doc, "source": source,
                     "_where": f"builtin:{qual}"}
                )  # fmt: skip
        records.extend(_thin(group, MAX_PER_SOURCE))
    return records


def _title(title: str) -> str:
    """'Mutable Sequence Types' -> 'mutable sequence types'; "Python" and quoted names stay."""
    words = title.split(" ")
    return " ".join(w.lower() if w.strip("(),").isalpha() and w != "Python" else w for w in words)


def _language_records(seen: set[str]) -> list[dict]:
    from pydoc_data.topics import topics

    records = []
    for key in sorted(topics):
        title, _, body = topics[key].strip().partition("\n")
        # Drop the reST underline ("*****") under the title.
        body = body.lstrip("\n").removeprefix("*" * len(title)).strip()
        if not body or body in seen:  # "if" and "else" share one text
            continue
        seen.add(body)
        records.append(
            {"question": f"Explain {_title(title.strip())} in Python.", "answer": body,
             "source": "language", "_where": f"builtin:topic/{key}"}
        )  # fmt: skip
    return records


def builtin_records() -> list[dict]:
    """The corpus, in a fixed order: language topics first, then the docstring sources."""
    seen: set[str] = set()
    return _language_records(seen) + _docstring_records(seen)
