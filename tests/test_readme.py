"""The README's config reference lists every config key (and no key that does not exist), and
its algorithm table every algorithm file."""

from __future__ import annotations

import re
from pathlib import Path

from cllora.config import Config
from cllora.config_reference import config_items


def _documented(text: str, heading: str) -> set[str]:
    if heading not in text:
        return set()
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `([a-z0-9_.]+)` \|", section, flags=re.M))


def test_config_reference_is_complete():
    root = Path(__file__).resolve().parents[1]
    documented = _documented((root / "README.md").read_text(), "### Config reference")
    assert documented == {key for key, _ in config_items(Config())}


def test_algorithm_table_lists_every_algorithm():
    from cllora.fed.algorithms import algorithm_names

    root = Path(__file__).resolve().parents[1]
    documented = _documented((root / "README.md").read_text(), "### Algorithms")
    assert documented == set(algorithm_names())


def test_every_test_the_readme_names_exists():
    """The Reliability section backs each guarantee by a test file or test name: both must
    exist (a renamed test would leave a guarantee without its test)."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    files = set(re.findall(r"`(tests/[\w/]+\.py)", text))
    names = set(re.findall(r"::(test_\w+)", text))
    assert files and names
    assert [f for f in files if not (root / f).is_file()] == []
    defined = "\n".join(p.read_text() for p in (root / "tests").rglob("test_*.py"))
    assert [n for n in sorted(names) if f"def {n}(" not in defined] == []


def test_config_reference_table_is_generated():
    """README's table is what ``cllora config --keys --markdown`` prints (one source:
    cllora/config_reference.py), so the two cannot drift; regenerate it with that command."""
    from cllora.config_reference import reference_markdown

    root = Path(__file__).resolve().parents[1]
    section = (root / "README.md").read_text().split("### Config reference\n\n", 1)[1]
    table = section[: section.index("\n\n") + 1]
    assert table == reference_markdown()


def test_config_reference_names_every_allowed_value():
    """A key whose type is a ``Literal`` names each of its values under "allowed"."""
    import typing

    from cllora.config_reference import config_reference

    allowed = {key: text for key, _, text, _ in config_reference()}
    for key, _ in config_items(Config()):
        section, _, name = key.rpartition(".")
        obj = Config() if not section else getattr(Config(), section)
        hint = typing.get_type_hints(type(obj))[name]
        literals = [a for t in (hint, *typing.get_args(hint)) if typing.get_origin(t) is
                    typing.Literal for a in typing.get_args(t)]  # fmt: skip
        for value in literals:
            assert str(value) in allowed[key], f"{key}: {value!r} not in {allowed[key]!r}"
