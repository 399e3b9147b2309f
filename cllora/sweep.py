"""Sweeps: a grid over any config keys, run one cell after another, resumable, one long CSV.

Usage::

    cllora sweep examples/length_heterogeneity.yaml [key=value ...]

    from cllora.sweep import load_sweep, run_sweep
    sweep = load_sweep("examples/length_heterogeneity.yaml", ["fed.rounds=2"])
    run_sweep(sweep)                 # -> out_dir/<name>/ with cells/, results.csv

A sweep file is a normal config file (the base of every cell) plus a ``sweep:`` section::

    sweep:
      name: length            # directory under out_dir (default: the file's stem)
      grid:                   # dotted config key -> list of values; cells = the product
        partition.alpha_len: [0.1, 100.0]
        seed: [0, 1]

**Arms and studies.** ``sweep.arms`` (optional) names settings that are crossed with the grid
(``arms: {iid: {partition.method: iid}, length: {partition.method: pathological}}``): a cell is
``seed=0__arm=length``, its values hold ``arm``, and a seed's arms run together. Two arms that
set the same values are refused. ``sweep.study`` (optional) declares a study's endpoints
(:mod:`cllora.report.study`): checked against the arms when the sweep is loaded, frozen in
``<sweep>/study.yaml`` when it first runs (:func:`declare_study`), and refused when changed after
a cell has finished. ``examples/study/crn.yaml`` uses both.

Precedence per cell: defaults < the file's config < ``key=value`` arguments < the cell's arm
settings < the cell's grid values. Arguments starting with ``sweep.`` change the sweep itself,
e.g. ``sweep.grid.seed=[0]`` or ``sweep.name=small``. ``sweep.name`` is a relative path that
stays inside ``out_dir`` (an absolute path, a ``..`` part or a link leading out is refused; set
``out_dir`` to write elsewhere). Every grid key must be a config key other than ``out_dir`` /
``run_name`` (the sweep sets those), no two grid keys may overlap (``partition`` and
``partition.alpha_len``), and no two cells may be the same experiment (``seed: [0, 0]``, or
``train.lr: [1e-3, 0.001]``, which both give 0.001). Every cell's config is built and validated,
and every cell's data partitioned (tokenizer only, no model), before the first cell trains: an
unknown key, a bad value or a partition that cannot be made stops the sweep at once, naming the
cell.

**Cell names.** A cell runs as ``cells/<name>``, the name built from the cell's values as the
config holds them (``train.lr: "1e-3"`` is the number 0.001): ``key=value`` pairs joined by
``__``, floats written so YAML reads them back as floats (``1.0e-05``), None as ``null``, e.g.
``partition.alpha_len=0.1__seed=0``. That readable name is used as it is when it spells the
values exactly (YAML reads each value back to the same value, only letters, digits and ``._=+,-``,
no ``__`` inside a value, at most 200 characters, not ending like a hash suffix). Otherwise
(a ``/`` or other character replaced by ``_``, a string YAML would read as a number, a list, a
name cut to length) the name is the sanitised text, cut, plus ``-`` and the first 8 hex digits
of the SHA-256 of the exact values: ``data.path=a_b.jsonl-9e178fea`` for ``a/b.jsonl``, next to
``data.path=a_b.jsonl`` for ``a_b.jsonl``. A name depends on its cell's values only, so a re-run
of the same sweep finds its cells, and distinct values always give distinct names.

**Cell records.** When a cell's run finishes, ``cell.json`` (``{"name": ..., "values": {grid
key: value}}``) is written into its directory (the run's ``config.yaml``, written when the run
starts, records the same values for a run still going). Before any cell runs, every existing
cell directory is checked against its cell: a ``cell.json`` with other values, a finished run
whose ``config.yaml`` differs from the cell's config (any key other than ``progress``,
``out_dir`` and ``run_name``: e.g. ``fed.rounds`` changed since), or an unfinished directory
holding another cell's run, stops the sweep with a ``ConfigError`` naming the directory, both
sides and how to proceed. A finished cell directory **without** ``cell.json`` (from a cllora
before cell records, or a run stopped between ``summary.csv`` and ``cell.json``) is adopted, and
its ``cell.json`` written, only when its ``config.yaml`` resolves to exactly the cell's config
(and its ``metrics.jsonl`` holds the last round's evaluation, else it counts as unfinished);
with another config it is refused, saying to remove it (to run the cell again) or to choose
another ``sweep.name``. An older directory whose name this scheme spells differently (values
with ``/``, ``1e-05``, None, lists, strings YAML reads as numbers) is not looked at: that cell
runs again under its new name and the old directory is left as it is.

Cells run in grid order; a cell whose run finished (``summary.csv`` and a matching
``cell.json``) is not run again, an unfinished one is removed and run again (only ever a
directory directly under this sweep's ``cells/``, not a link, recorded as this cell's or holding
nothing but ``run.log``). After each cell, ``results.csv`` is rewritten in long format, one row
per (cell, round, evaluated model, test set, length bucket): columns ``cell``, the grid keys,
``round``, ``model`` (``global`` or ``local``), ``client`` (the local model's owner), ``test`` (a
client's test set or ``__global__``), ``bucket`` (``all`` or a length bucket), ``loss``,
``tokens``.

**Several processes, one sweep.** The same ``cllora sweep`` command may run in several shells at
once (a core, a GPU or a machine on a shared disk each): a process claims a cell by an exclusive
``flock`` on ``<sweep>/.claims/<name>`` for as long as it runs the cell, and passes over a cell
another live process holds (the lock dies with its process, so a killed one's cell is redone by
whoever comes next). An unfinished cell directory is only removed by the process that holds its
claim. Each process rewrites ``results.csv`` (atomically) from every cell finished so far; the
last to finish writes the whole sweep.

**Shared round 0.** Every cell starts from the same initial model, so each cell's
``eval.base_cache`` is ``<sweep>/base_cache`` unless the file sets it (``""`` = off): the
quality scores and round-0 evaluations of samples an earlier cell already evaluated are read
from there (:mod:`cllora.eval_cache`; keyed by the exact weights and tokens).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import difflib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import yaml

from cllora.config import (
    Config,
    ConfigError,
    config_from_dict,
    get_key,
    load_config,
    parse_overrides,
    read_yaml,
)
from cllora.data.readers import DataError
from cllora.report.metrics import read_metrics
from cllora.report.records import OWN, Kind

log = logging.getLogger("cllora")
CELL_FILE = "cell.json"
CLAIMS = ".claims"  # <sweep>/.claims/<cell name>: flock'd by the process running that cell
RESULT_COLUMNS = ("cell", "round", "model", "client", "test", "bucket", "loss", "tokens")
SET_BY_SWEEP = ("out_dir", "run_name")
MAX_NAME = 200
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,-]")
_ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ARM_KEY = "arm"  # the cell value naming a cell's arm (sweep.arms)
_HASH_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


@dataclass
class Cell:
    name: str
    values: dict[str, Any]
    cfg: Config
    raw: dict[str, Any] = field(default_factory=dict)  # the grid values as written


@dataclass
class Sweep:
    name: str
    root: Path
    keys: list[str]
    cells: list[Cell] = field(default_factory=list)
    out_dir: Path | None = None
    study: dict[str, Any] | None = None  # sweep.study: the declared endpoints (cllora.report.study)


# --- cell names -------------------------------------------------------------------------------


def canonical(values: Any) -> str:
    """Exact, type-keeping text of plain values (1, 1.0 and "1" differ); the basis of hashes."""
    return json.dumps(values, sort_keys=True, separators=(",", ":"), default=repr)


def value_text(value: Any) -> str:
    """Readable text of one value: YAML reads scalars back as the same value where it can."""
    if value is None:
        return "null"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text:  # 1e-05: YAML 1.1 needs the dot to read a float
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, list):
        return ",".join(value_text(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}:{value_text(v)}" for k, v in value.items())
    return str(value)


def _reads_back(value: Any, text: str) -> bool:
    try:
        return canonical(yaml.safe_load(text)) == canonical(value)
    except yaml.YAMLError:
        return False


def _sanitise(text: str) -> str:
    return re.sub(r"(?<=\.)\.", "_", _UNSAFE.sub("_", text))  # no '..' either


def cell_name(values: dict[str, Any]) -> str:
    """Directory name of a cell: readable ``key=value__key=value``, plus ``-<hash>`` of the exact
    values where the readable text does not spell them exactly (see the module doc)."""
    texts = {k: value_text(v) for k, v in values.items()}
    readable = "__".join(f"{k}={t}" for k, t in texts.items())
    safe = _sanitise(readable)
    exact = (
        safe == readable
        and len(safe) <= MAX_NAME
        and not _HASH_SUFFIX.search(safe)
        and all("__" not in t and _reads_back(values[k], t) for k, t in texts.items())
    )
    if exact:
        return safe
    digest = hashlib.sha256(canonical(values).encode()).hexdigest()[:8]
    return f"{safe[: MAX_NAME - 9]}-{digest}"


def _label(raw: dict[str, Any]) -> str:
    """The cell as written in the grid, for messages about cells that could not be built."""
    return "__".join(f"{k}={v}" for k, v in raw.items())


# --- reading the sweep file -------------------------------------------------------------------


def _deep_update(base: dict, updates: dict) -> dict:
    out = dict(base)
    for k, v in updates.items():
        out[k] = _deep_update(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def _nest(values: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in values.items():
        *parents, last = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return nested


def _read_spec(path: Path) -> tuple[dict, dict]:
    loaded = read_yaml(path, "sweep file") or {}
    if not isinstance(loaded, dict) or not isinstance(loaded.get("sweep"), dict):
        raise ConfigError(f"{path}: a sweep file needs a 'sweep:' section with a 'grid:' mapping")
    spec = loaded.pop("sweep")
    _check_spec(path, spec)
    return loaded, spec


SPEC_KEYS = ("name", "grid", "arms", "study")


def _check_spec(path: Path, spec: dict) -> None:
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown sweep setting(s) {sorted(map(str, unknown))}; allowed: "
            + ", ".join(SPEC_KEYS)
        )
    _check_arms(path, spec.get("arms"))
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}: sweep.grid must map config keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: sweep.grid.{key} must be a non-empty list of values")
        seen: dict[str, Any] = {}
        for v in values:
            if canonical(v) in seen:
                raise ConfigError(f"{path}: sweep.grid.{key} lists {v!r} twice; remove one")
            seen[canonical(v)] = v


def _check_arms(path: Path, arms: Any) -> None:
    """``sweep.arms``: arm name -> {dotted config key: value}; distinct names and settings."""
    if arms is None:
        return
    if not isinstance(arms, dict) or not arms:
        raise ConfigError(f"{path}: sweep.arms must map arm names to {{config key: value}}")
    seen: dict[str, str] = {}
    for name, settings in arms.items():
        if not isinstance(name, str) or not _ARM_NAME.fullmatch(name):
            raise ConfigError(
                f"{path}: sweep.arms name {name!r}: use letters, digits, '.', '_' and '-' only"
            )
        if not isinstance(settings, dict):
            raise ConfigError(f"{path}: sweep.arms.{name} must map config keys to values")
        for key in settings:
            check_grid_key(key)
        other = seen.setdefault(canonical(settings), name)
        if other != name:
            raise ConfigError(
                f"{path}: sweep.arms {other} and {name} set the same values, so they would be "
                "one experiment under two names; remove one (an A/A control differs in "
                "partition.draw)"
            )


def _apply_sweep_overrides(path: Path, spec: dict, items: list[str]) -> dict:
    """``sweep.name=x`` / ``sweep.grid.KEY=[...]`` arguments (grid keys are never nested)."""
    spec = dict(spec)
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.removeprefix("sweep.").strip()
        if not eq or not key:
            raise ConfigError(f"override {item!r} is not of the form sweep.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
        if key.startswith("grid."):
            spec["grid"] = {**spec["grid"], key.removeprefix("grid."): value}
        else:
            spec[key] = value
    _check_spec(path, spec)
    return spec


def check_grid_key(key: Any) -> None:
    """A grid key must name a config key (or section) the sweep does not set itself."""
    if not isinstance(key, str):
        raise ConfigError(f"sweep.grid key {key!r} is not a config key (a dotted name)")
    obj: Any = Config()
    for part in key.split("."):
        names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
        if part not in names:
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"sweep.grid key '{key}' is not a config key{hint}")
        obj = getattr(obj, part)
    if key in SET_BY_SWEEP:
        raise ConfigError(
            f"sweep.grid key '{key}': the sweep sets every cell's out_dir and run_name "
            "(out_dir/<sweep.name>/cells/<cell>); set out_dir outside the grid, run_name not at all"
        )
    if key in RESULT_COLUMNS:
        raise ConfigError(
            f"sweep.grid key '{key}' would clash with the '{key}' column of results.csv; grid "
            f"the keys inside it instead, e.g. {key}.name"
        )


def _check_grid_keys(grid: dict) -> None:
    for key in grid:
        check_grid_key(key)
    for a, b in itertools.permutations(grid, 2):
        if b.startswith(a + "."):
            raise ConfigError(
                f"sweep.grid keys '{a}' and '{b}' overlap (one sets the other); keep one"
            )


def sweep_root(out_dir: str | Path, name: Any) -> Path:
    """``out_dir/name``, refusing a name that is not a relative path staying inside ``out_dir``."""
    text = name if isinstance(name, str) else None
    if isinstance(name, int | float) and not isinstance(name, bool):
        text = str(name)
    fix = "set out_dir to write elsewhere (e.g. out_dir=/elsewhere sweep.name=mysweep)"
    if text is None:
        raise ConfigError(f"sweep.name: got {name!r}; allowed: a directory name; {fix}")
    parts = PurePath(text).parts
    bad = (
        not parts
        or text != text.strip()
        or "\0" in text
        or PurePath(text).is_absolute()
        or ".." in parts
    )
    out = Path(out_dir)
    root = out / text
    if bad or not root.resolve().is_relative_to(out.resolve()) or root.resolve() == out.resolve():
        raise ConfigError(
            f"sweep.name {text!r} must be a directory inside out_dir ({out}): not absolute, no "
            f"'..', not out_dir itself, no link leading out; {fix}"
        )
    return root


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value))


def _make_cell(
    base: dict, root: Path, raw: dict[str, Any], arm: tuple[str, dict] | None = None
) -> Cell:
    """The cell of grid values ``raw`` (and of ``arm``: its name and settings, which come
    before the grid values): its config, values as the config holds them, name."""
    cells_dir = str(root / "cells")
    written = {**raw, **({ARM_KEY: arm[0]} if arm else {})}  # the cell as the file names it
    label = _label(written)
    settings = _nest(arm[1]) if arm else {}
    try:
        base = _deep_update(base, settings)
        probe = config_from_dict(_deep_update(base, {**_nest(raw), "out_dir": cells_dir}))
        values = {k: _plain(get_key(probe, k)) for k in raw}
        if arm:
            values[ARM_KEY] = arm[0]
        name = cell_name(values)
        updates = {**_nest(raw), "out_dir": cells_dir, "run_name": name}
        cfg = config_from_dict(_deep_update(base, updates))
        if cfg.eval.base_cache is None:  # the cells share their initial model's losses
            cfg.eval.base_cache = str(root / "base_cache")
    except ConfigError as err:
        raise ConfigError(f"sweep cell {label}: {err}") from None
    return Cell(name, values, cfg, written)


def _check_distinct(cells: list[Cell]) -> None:
    by_name: dict[str, Cell] = {}
    for cell in cells:
        other = by_name.setdefault(cell.name, cell)
        if other is cell:
            continue
        if canonical(other.values) != canonical(cell.values):  # a hash collision
            raise ConfigError(
                f"sweep cells {_label(other.raw)} and {_label(cell.raw)} got the same "
                f"directory name {cell.name}; change one of their values"
            )
        key = next(k for k in cell.raw if canonical(cell.raw[k]) != canonical(other.raw[k]))
        raise ConfigError(
            f"sweep.grid.{key}: {other.raw[key]!r} and {cell.raw[key]!r} are the same value "
            f"({cell.values[key]!r}), so two cells would be one experiment; remove one"
        )


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read a sweep file and build (and validate) the config of every cell."""
    path = Path(path)
    base, spec = _read_spec(path)
    mine = [o for o in overrides or [] if o.startswith("sweep.")]
    spec = _apply_sweep_overrides(path, spec, mine)
    base = _deep_update(base, parse_overrides([o for o in overrides or [] if o not in mine]))
    grid: dict[str, list] = spec["grid"]
    _check_grid_keys(grid)
    # The base alone need not be a valid config: a grid or an arm may supply what it lacks
    # (partition.method=dirichlet in the file, partition.alpha_len in the grid); each cell's
    # resolved config is validated below, and out_dir is the only thing read here.
    out_dir = base.get("out_dir") or Config().out_dir
    if not isinstance(out_dir, str) or not out_dir.strip():
        raise ConfigError(f"config key 'out_dir': got {out_dir!r}; give a directory such as runs")
    name = spec.get("name")
    root = sweep_root(out_dir, path.stem if name is None or name == "" else name)
    arms: list[tuple[str, dict] | None] = list((spec.get("arms") or {}).items()) or [None]
    keys = [*grid, *([ARM_KEY] if arms[0] else [])]
    sweep = Sweep(name=root.name, root=root, keys=keys, out_dir=Path(out_dir),
                  study=spec.get("study"))  # fmt: skip
    for combo in itertools.product(*grid.values()):
        for arm in arms:  # innermost: a seed's arms run together
            sweep.cells.append(_make_cell(base, root, dict(zip(grid, combo, strict=True)), arm))
    _check_distinct(sweep.cells)
    if sweep.study is not None:  # a declaration's mistake stops the sweep before any cell runs
        from cllora.report.study import parse_declaration

        try:
            parse_declaration(sweep.study, [a[0] for a in arms if a])
        except DataError as err:
            raise ConfigError(f"{path}: {err}") from None
    return sweep


# --- cell directories -------------------------------------------------------------------------


def cell_dir(cell: Cell) -> Path:
    return Path(cell.cfg.out_dir) / cell.name


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The grid values ``cell.json`` records for ``run_dir`` (None: no ``cell.json``)."""
    path = Path(run_dir) / CELL_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("values"), dict):
        raise ConfigError(
            f"{path} is not a sweep cell record (JSON with 'values'); remove {run_dir} to run "
            "its cell again"
        )
    return record["values"]


def write_record(cell: Cell) -> Path:
    """Write ``cell.json`` (the cell's name and grid values) into the cell's directory."""
    path = cell_dir(cell) / CELL_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"name": cell.name, "values": cell.values}, indent=1) + "\n")
    tmp.replace(path)
    return path


def is_done(cell: Cell) -> bool:
    """The cell's run finished (``summary.csv``) and ``cell.json`` records this cell's values."""
    run_dir = cell_dir(cell)
    if not (run_dir / "summary.csv").is_file():
        return False
    try:
        recorded = read_record(run_dir)
    except ConfigError:
        return False
    return recorded is not None and canonical(recorded) == canonical(cell.values)


def _saved_config(run_dir: Path) -> Config | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        return load_config(path)
    except ConfigError as err:
        raise ConfigError(
            f"{run_dir} holds a config.yaml this cllora cannot read ({err}); remove {run_dir} "
            "to run its cell again, or choose another sweep.name"
        ) from None


def _differences(saved: Config, cell: Cell) -> list[str]:
    from cllora.fed.resume import config_diff

    return [f"{k}: {get_key(saved, k)!r} there, {get_key(cell.cfg, k)!r} here"
            for k in config_diff(saved, cell.cfg)]  # fmt: skip


def _all_rounds_evaluated(run_dir: Path, rounds: int) -> bool:
    try:
        records = read_metrics(run_dir / "metrics.jsonl")
    except (OSError, ValueError):
        return False
    return any(r.get("kind") == Kind.GLOBAL_EVAL and r.get("round") == rounds for r in records)


def _refuse(run_dir: Path, what: str) -> ConfigError:
    return ConfigError(
        f"sweep cell directory {run_dir} {what}; to run this cell again remove {run_dir} (or "
        "move it away), to keep it choose another sweep.name"
    )


def cell_state(cell: Cell) -> str:
    """``"new"``, ``"done"`` or ``"unfinished"``; refuses (ConfigError) a directory that is not
    this cell's. A finished one without ``cell.json`` is adopted when its config is the cell's.
    Read it only while holding the cell's claim (:func:`claim`): another process running the
    cell changes its directory."""
    run_dir = cell_dir(cell)
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise _refuse(run_dir, "is a link or a file, not a cell directory")
    if not run_dir.exists():
        return "new"
    mine = json.dumps(cell.values, sort_keys=True)
    recorded = read_record(run_dir)
    if recorded is not None and canonical(recorded) != canonical(cell.values):
        there = json.dumps(recorded, sort_keys=True)
        raise _refuse(run_dir, f"records the cell values {there}, this sweep's cell is {mine}")
    saved = _saved_config(run_dir)
    if (run_dir / "summary.csv").is_file():
        if saved is None:
            raise _refuse(run_dir, "holds summary.csv but no config.yaml")
        diff = _differences(saved, cell)
        if diff:
            raise _refuse(run_dir, f"holds a finished run of another config ({'; '.join(diff)})")
        if recorded is not None:
            return "done"
        if not _all_rounds_evaluated(run_dir, cell.cfg.fed.rounds):
            return "unfinished"  # stopped while summary.csv was being written
        log.info("sweep cell %s: adopted (its config.yaml is this cell's)", run_dir)
        write_record(cell)
        return "done"
    if recorded is None and saved is not None:
        there = {k: _plain(get_key(saved, k)) for k in cell.values}
        if canonical(there) != canonical(cell.values):
            where = json.dumps(there, sort_keys=True)
            raise _refuse(run_dir, f"holds an unfinished run of the values {where}, not {mine}")
    if recorded is None and saved is None and {p.name for p in run_dir.iterdir()} - {"run.log"}:
        raise _refuse(run_dir, "holds files but neither cell.json nor config.yaml")
    return "unfinished"


def _remove_unfinished(sweep: Sweep, cell: Cell) -> None:
    """Remove an unfinished cell directory: only ever one directly under this sweep's cells/."""
    run_dir, cells = cell_dir(cell), sweep.root / "cells"
    top = (sweep.out_dir or sweep.root.parent).resolve()
    inside = (
        any(c is cell for c in sweep.cells)
        and cell.name not in ("", ".", "..")
        and Path(cell.name).name == cell.name
        and not cells.is_symlink()
        and not run_dir.is_symlink()
        and run_dir.is_dir()
        and run_dir.resolve().parent == cells.resolve()
        and cells.resolve().parent == sweep.root.resolve()
        and sweep.root.resolve().is_relative_to(top)
        and sweep.root.resolve() != top
    )
    if not inside or cell_state(cell) != "unfinished":
        raise ConfigError(f"refusing to remove {run_dir}: not an unfinished cell of {cells}")
    shutil.rmtree(run_dir)


def check_cell_dirs(sweep: Sweep) -> dict[str, str]:
    """The state of every cell (see :func:`cell_state`), ``"running"`` for one another process
    holds (its directory is being written or removed: it is not read); refuses foreign
    directories."""
    if not sweep.root.is_dir():  # nothing of this sweep exists yet: nobody runs a cell
        return {cell.name: cell_state(cell) for cell in sweep.cells}
    states = {}
    for cell in sweep.cells:
        with claim(sweep, cell) as mine:
            states[cell.name] = cell_state(cell) if mine else "running"
    return states


def check_cells(sweep: Sweep) -> None:
    """Partition every pending cell's data (tokenizer only) so bad data stops the sweep early."""
    from cllora.data.pipeline import build_clients
    from cllora.model.load import load_tokenizer

    tokenizers: dict[str, Any] = {}
    for cell in sweep.cells:
        if is_done(cell):
            continue
        name = cell.cfg.model.name
        tok = tokenizers.setdefault(name, load_tokenizer(name))
        quiet = dataclasses.replace(cell.cfg, progress=False)
        try:
            build_clients(quiet, tok)
        except (DataError, ConfigError) as err:
            raise type(err)(f"sweep cell {cell.name}: {err}") from None


@contextlib.contextmanager
def claim(sweep: Sweep, cell: Cell) -> Iterator[bool]:
    """Hold the cell's claim (``<sweep>/.claims/<name>``, an exclusive ``flock``) for the block;
    yields False, holding nothing, when another process holds it."""
    path = sweep.root / CLAIMS / cell.name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_spec(sweep: Sweep) -> None:
    path = sweep.root / "sweep.yaml"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # several processes may write it at once
    tmp.write_text(
        yaml.safe_dump({"name": sweep.name, "keys": sweep.keys,
                        "cells": [{"name": c.name, "values": c.values} for c in sweep.cells]},
                       sort_keys=False)
    )  # fmt: skip
    tmp.replace(path)


def declare_study(sweep: Sweep) -> None:
    """Freeze ``sweep.study`` (the declared endpoints) in ``<sweep>/study.yaml`` with the time
    it was declared. Once a cell has finished, a different declaration is refused: endpoints
    chosen after seeing results are not declared (a new declaration is a new sweep.name)."""
    if not sweep.study:
        return
    from cllora.report.study import STUDY_FILE

    path = sweep.root / STUDY_FILE
    if path.is_file():
        frozen = read_yaml(path, "study declaration") or {}
        if canonical(frozen.get("study")) == canonical(_plain(sweep.study)):
            return
        if any(is_done(c) for c in sweep.cells):
            raise ConfigError(
                f"{path}: sweep.study differs from the declaration frozen at "
                f"{frozen.get('declared_at', '?')} and cells have finished since; endpoints "
                "changed after results exist are not declared: restore the declaration, or run "
                "the new one as a new study (another sweep.name)"
            )
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump({"declared_at": stamp, "study": _plain(sweep.study)},
                                  sort_keys=False))  # fmt: skip
    tmp.replace(path)


def run_sweep(sweep: Sweep, check: bool = True) -> Path:
    """Run every unfinished cell no other process holds, in order; rewrite ``results.csv``
    after each; return it."""
    check_cell_dirs(sweep)  # before anything is written: a foreign directory stops the sweep
    sweep.root.mkdir(parents=True, exist_ok=True)
    declare_study(sweep)
    _write_spec(sweep)
    if check:
        check_cells(sweep)
    elsewhere = []
    for i, cell in enumerate(sweep.cells, 1):
        where = f"sweep {sweep.name}: cell {i}/{len(sweep.cells)} {cell.name}"
        with claim(sweep, cell) as mine:
            if not mine:
                log.info("%s is being run by another process, passed over", where)
                elsewhere.append(cell.name)
                continue
            _run_cell(sweep, cell, where)
    if elsewhere:
        log.info(
            "sweep %s: %d cell(s) still running in other processes (%s); the last to finish "
            "rewrites results.csv", sweep.name, len(elsewhere), ", ".join(elsewhere),
        )  # fmt: skip
    return write_results(sweep)


def _run_cell(sweep: Sweep, cell: Cell, where: str) -> None:
    """Run one claimed cell unless it is done (another process may have finished it)."""
    from cllora.fed.server import run_experiment

    state = cell_state(cell)
    if state == "done":
        log.info("%s done, skipped", where)
        return
    if state == "unfinished":
        _remove_unfinished(sweep, cell)  # start it again
    log.info("%s", where)
    run_experiment(cell.cfg)
    if not (cell_dir(cell) / "summary.csv").is_file():
        raise RuntimeError(f"sweep cell {cell.name}: the run ended without summary.csv")
    write_record(cell)
    write_results(sweep)


# --- results ----------------------------------------------------------------------------------


def cell_rows(cell_name_: str, values: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    """Long-format rows of one finished run's evaluation records."""
    rows = []
    for rec in read_metrics(run_dir / "metrics.jsonl"):
        if rec["kind"] not in (Kind.GLOBAL_EVAL, Kind.LOCAL_EVAL):
            continue
        local = rec["kind"] == Kind.LOCAL_EVAL
        test = rec["client"] if local and rec["test"] == OWN else rec.get("test", rec["client"])
        base = {"cell": cell_name_, **values, "round": rec["round"],
                "model": "local" if local else "global", "client": rec["client"] if local else "",
                "test": test}  # fmt: skip
        rows.append({**base, "bucket": "all", "loss": rec["loss"], "tokens": rec["tokens"]})
        for bucket, b in rec.get("buckets", {}).items():
            rows.append({**base, "bucket": bucket, "loss": b["loss"], "tokens": b["tokens"]})
    return rows


def write_results(sweep: Sweep) -> Path:
    """``results.csv`` of every finished cell (long format, see module doc)."""
    path = sweep.root / "results.csv"
    columns = ["cell", *sweep.keys, *RESULT_COLUMNS[1:]]
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # several processes may write it at once
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for cell in sweep.cells:
            if is_done(cell):
                writer.writerows(cell_rows(cell.name, cell.values, cell_dir(cell)))
    tmp.replace(path)
    return path
