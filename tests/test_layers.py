"""docs/ARCHITECTURE.md's layer rule holds: each module of ``cllora`` imports only modules of
its own layer or of the layers above it in the "Layers" table, and every module is in the
table.

The table is the source: its rows, in order, are the layers; each row's backticked paths
(``cllora/data/``, ``cllora/eval.py``) are its modules, a directory meaning everything under
it, the longest path deciding. So the document cannot drift from the code: a new module the
table does not place, or an import that goes down a layer, fails here with the file, the line
and both layers. Imports under ``if TYPE_CHECKING:`` are not run and are not counted."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def layers() -> list[tuple[str, list[str]]]:
    """(layer, its paths) per row of the Layers table, top first."""
    section = DOC.read_text(encoding="utf-8").split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # no header
    out = []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        paths = [p for p in re.findall(r"`([^`]+)`", cells[1]) if p.startswith("cllora/")]
        out.append((cells[0], paths))
    return out


def layer_of(path: str, table: list[tuple[str, list[str]]]) -> int | None:
    """The row number of the longest table path that is ``path`` or a directory above it."""
    best, best_len = None, -1
    for k, (_, paths) in enumerate(table):
        for p in paths:
            hit = path == p or (p.endswith("/") and path.startswith(p))
            if hit and len(p) > best_len:
                best, best_len = k, len(p)
    return best


def _module_path(name: str) -> str | None:
    """``cllora.data.pipeline`` -> ``cllora/data/pipeline.py`` (or the package's __init__)."""
    base = ROOT / Path(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p.relative_to(ROOT).as_posix()
    return None


def _runtime_imports(tree: ast.Module, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every cllora import that runs (not under TYPE_CHECKING)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = []
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            for a in node.names:  # `from cllora.fed import runner` imports a module
                sub = f"{base}.{a.name}"
                found.append((node.lineno, sub if _module_path(sub) else base))
    return [(line, name) for line, name in found if name.split(".")[0] == "cllora"]


def _sources() -> list[Path]:
    return sorted((ROOT / "cllora").rglob("*.py"))


def test_every_module_is_in_a_layer():
    table = layers()
    assert len(table) >= 8, "the Layers table of docs/ARCHITECTURE.md was not found"
    unplaced = [p.relative_to(ROOT).as_posix() for p in _sources()
                if layer_of(p.relative_to(ROOT).as_posix(), table) is None]  # fmt: skip
    unplaced = [p for p in unplaced if p not in ("cllora/__init__.py", "cllora/__main__.py")]
    assert unplaced == [], "modules docs/ARCHITECTURE.md's Layers table does not place"


def test_no_import_goes_down_a_layer():
    table = layers()
    breaks = []
    for src in _sources():
        rel = src.relative_to(ROOT).as_posix()
        mine = layer_of(rel, table)
        if mine is None:
            continue
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        if src.name == "__init__.py":
            module += ".__init__"
        for line, name in _runtime_imports(ast.parse(src.read_text()), module):
            target = _module_path(name)
            theirs = layer_of(target, table) if target else None
            if theirs is not None and theirs > mine:
                breaks.append(f"{rel}:{line} ({table[mine][0]}) imports {name} "
                              f"({table[theirs][0]})")  # fmt: skip
    assert breaks == [], "imports that go down a layer:\n" + "\n".join(breaks)


def test_every_path_the_table_names_exists():
    names = [p for _, paths in layers() for p in paths]
    assert [p for p in names if not (ROOT / p).exists()] == []


def test_no_module_imports_another_modules_private_names():
    """A leading underscore means "this module's own": another module that needs the name gets
    it made public (``rng_states`` in fed/checkpoint.py, ``tiny_config`` in model/load.py)."""
    found = []
    for src in _sources():
        rel = src.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(src.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cllora"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{rel}:{node.lineno} imports {node.module}.{a.name}")
    assert found == []
