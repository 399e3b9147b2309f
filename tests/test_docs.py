"""The documentation stays true and reachable: the README is a short entry whose links, like
every link in docs/, reach a file (and a heading); docs/config.md's config reference is
generated and lists every config key, its algorithm table every algorithm file; every test a
doc cites as the backing of a claim exists; and the install page names what the set-up
installs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from cllora.config import Config
from cllora.config_reference import config_items

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
CONFIG_DOC = ROOT / "docs" / "config.md"


def _documented(text: str, heading: str) -> set[str]:
    if heading not in text:
        return set()
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `([a-z0-9_.]+)` \|", section, flags=re.M))


def test_config_reference_is_complete():
    documented = _documented(CONFIG_DOC.read_text(), "## Config reference")
    assert documented == {key for key, _ in config_items(Config())}


def test_algorithm_table_lists_every_algorithm():
    from cllora.fed.algorithms import algorithm_names

    documented = _documented(CONFIG_DOC.read_text(), "## Algorithms")
    assert documented == set(algorithm_names())


def test_every_test_the_docs_name_exists():
    """docs/reliability.md backs each guarantee by a test file or test name, and other pages
    cite tests for what they claim: both must exist (a renamed test would leave a claim without
    its test). A name cut short with ``...`` must start a test's name."""
    text = "\n".join(p.read_text() for p in (README, *DOCS))
    files = set(re.findall(r"`(tests/[\w/]+\.py)", text))
    names = set(re.findall(r"::(test_\w+(?:\.\.\.)?)", text))
    reliability = (ROOT / "docs" / "reliability.md").read_text()
    assert re.search(r"`tests/[\w/]+\.py", reliability) and "::test_" in reliability
    assert [f for f in sorted(files) if not (ROOT / f).is_file()] == []
    defined = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    wanted = {n: f"def {n[:-3]}" if n.endswith("...") else f"def {n}(" for n in names}
    assert [n for n in sorted(names) if wanted[n] not in defined] == []


def test_config_reference_table_is_generated():
    """docs/config.md's table is what ``cllora config --keys --markdown`` prints (one source:
    cllora/config_reference.py), so the two cannot drift; regenerate it with that command."""
    from cllora.config_reference import reference_markdown

    section = CONFIG_DOC.read_text().split("## Config reference\n\n", 1)[1]
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


def test_the_readme_stays_short():
    """The README is the entry (what cllora is, the two commands, a smoke run, what to do next,
    where the reference is); the reference itself lives in docs/."""
    lines = README.read_text().count("\n")
    assert lines < 200, f"README.md has {lines} lines: move the reference into docs/"
    for heading in ("## The two commands", "## A smoke run", "## Documentation"):
        assert heading in README.read_text()


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces -> ``-``."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def _links(path: Path) -> list[str]:
    """The targets of the Markdown links of a file, outside code blocks and code spans."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    """A moved section leaves no link behind: every relative link reaches an existing file,
    and a ``#section`` link a heading of its page."""
    broken = []
    for target in _links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no such heading)")
    assert broken == [], f"{doc.relative_to(ROOT)}: {broken}"


def test_the_install_page_names_the_extras_the_set_up_installs():
    """docs/install.md lists each package of the extras that scripts/setup.sh installs (a new
    test dependency must show up there), and says which extras those are."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    extras = re.search(r'-e "\.\[([\w,]+)\]"', setup).group(1).split(",")
    assert extras == ["test", "flower"]
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    install = (ROOT / "docs" / "install.md").read_text()
    assert f'pip install -e ".[{",".join(extras)}]"' in install
    for extra in extras:
        for requirement in optional[extra]:
            name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
            assert name.split("[")[0] in install, f"docs/install.md does not name {name}"
