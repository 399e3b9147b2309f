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

Precedence per cell: defaults < the file's config < ``key=value`` arguments < the cell's grid
values. Arguments starting with ``sweep.`` change the sweep itself, e.g. ``sweep.grid.seed=[0]``
or ``sweep.name=small``. Every cell's config is built and validated, and every cell's data
partitioned (tokenizer only, no model), before the first cell trains: an unknown key, a bad value
or a partition that cannot be made stops the sweep at once, naming the cell.

Cells run in grid order as runs named ``cells/<key=value__key=value>``; a cell whose run finished
(``summary.csv`` written) is not run again, an unfinished one is removed and run again. After
each cell, ``results.csv`` is rewritten in long format, one row per (cell, round, evaluated model,
test set, length bucket): columns ``cell``, the grid keys, ``round``, ``model`` (``global`` or
``local``), ``client`` (the local model's owner), ``test`` (a client's test set or
``__global__``), ``bucket`` (``all`` or a length bucket), ``loss``, ``tokens``.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cllora.config import Config, ConfigError, config_from_dict, get_key, parse_overrides
from cllora.report.metrics import read_metrics

log = logging.getLogger("cllora")
GLOBAL = "__global__"


@dataclass
class Cell:
    name: str
    values: dict[str, Any]
    cfg: Config


@dataclass
class Sweep:
    name: str
    root: Path
    keys: list[str]
    cells: list[Cell] = field(default_factory=list)


def _deep_update(base: dict, updates: dict) -> dict:
    out = dict(base)
    for k, v in updates.items():
        out[k] = _deep_update(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def cell_name(values: dict[str, Any]) -> str:
    """Directory name of a cell: ``key=value`` pairs joined by ``__``."""
    return "__".join(f"{k}={v}" for k, v in values.items()).replace("/", "_")


def _read_spec(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict) or not isinstance(loaded.get("sweep"), dict):
        raise ConfigError(f"{path}: a sweep file needs a 'sweep:' section with a 'grid:' mapping")
    spec = loaded.pop("sweep")
    unknown = set(spec) - {"name", "grid"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown sweep setting(s) {sorted(unknown)}; allowed: name, grid"
        )
    _check_spec(path, spec)
    return loaded, spec


def _check_spec(path: Path, spec: dict) -> None:
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}: sweep.grid must map config keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: sweep.grid.{key} must be a non-empty list of values")


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read a sweep file and build (and validate) the config of every cell."""
    path = Path(path)
    base, spec = _read_spec(path)
    mine = [o for o in overrides or [] if o.startswith("sweep.")]
    for item in mine:  # grid keys are dotted config keys: never nest them
        key, _, raw = item.partition("=")
        key = key.removeprefix("sweep.")
        value = yaml.safe_load(raw)
        if key.startswith("grid."):
            spec["grid"] = {**spec["grid"], key.removeprefix("grid."): value}
        else:
            spec[key] = value
    _check_spec(path, spec)
    base = _deep_update(base, parse_overrides([o for o in overrides or [] if o not in mine]))
    grid: dict[str, list] = spec["grid"]
    for key in grid:
        try:
            get_key(Config(), key)
        except AttributeError:
            raise ConfigError(f"sweep.grid key '{key}' is not a config key") from None
    probe = config_from_dict(base)
    root = Path(probe.out_dir) / str(spec.get("name") or path.stem)
    sweep = Sweep(name=root.name, root=root, keys=list(grid))
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo, strict=True))
        name = cell_name(values)
        cell_updates = parse_overrides(
            [f"{k}={yaml.safe_dump(v).strip()}" for k, v in values.items()]
        )
        cell_updates = _deep_update(
            cell_updates, {"out_dir": str(root / "cells"), "run_name": name}
        )
        try:
            cfg = config_from_dict(_deep_update(base, cell_updates))
        except ConfigError as err:
            raise ConfigError(f"sweep cell {name}: {err}") from None
        sweep.cells.append(Cell(name, values, cfg))
    return sweep


def is_done(cell: Cell) -> bool:
    return (Path(cell.cfg.out_dir) / cell.name / "summary.csv").is_file()


def check_cells(sweep: Sweep) -> None:
    """Partition every pending cell's data (tokenizer only) so bad data stops the sweep early."""
    from cllora.data.pipeline import build_clients
    from cllora.data.readers import DataError
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


def run_sweep(sweep: Sweep, check: bool = True) -> Path:
    """Run every unfinished cell in order; rewrite ``results.csv`` after each; return it."""
    from cllora.fed.server import run_experiment

    sweep.root.mkdir(parents=True, exist_ok=True)
    (sweep.root / "sweep.yaml").write_text(
        yaml.safe_dump({"name": sweep.name, "keys": sweep.keys,
                        "cells": [{"name": c.name, "values": c.values} for c in sweep.cells]},
                       sort_keys=False)
    )  # fmt: skip
    if check:
        check_cells(sweep)
    for i, cell in enumerate(sweep.cells, 1):
        run_dir = Path(cell.cfg.out_dir) / cell.name
        if is_done(cell):
            log.info(
                "sweep %s: cell %d/%d %s done, skipped", sweep.name, i, len(sweep.cells), cell.name
            )
            continue
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an unfinished cell: start it again
        log.info("sweep %s: cell %d/%d %s", sweep.name, i, len(sweep.cells), cell.name)
        run_experiment(cell.cfg)
        write_results(sweep)
    return write_results(sweep)


def cell_rows(cell_name_: str, values: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    """Long-format rows of one finished run's evaluation records."""
    rows = []
    for rec in read_metrics(run_dir / "metrics.jsonl"):
        if rec["kind"] not in ("global_eval", "local_eval"):
            continue
        local = rec["kind"] == "local_eval"
        test = rec["client"] if local and rec["test"] == "own" else rec.get("test", rec["client"])
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
    columns = ["cell", *sweep.keys, "round", "model", "client", "test", "bucket", "loss", "tokens"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for cell in sweep.cells:
            if is_done(cell):
                writer.writerows(
                    cell_rows(cell.name, cell.values, Path(cell.cfg.out_dir) / cell.name)
                )
    return path
