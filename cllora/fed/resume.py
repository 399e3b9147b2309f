"""Resuming a killed run from its last complete round.

Usage::

    from cllora.fed.resume import open_resume
    cfg, ckpt = open_resume(Path("runs/x"), requested=cfg_or_None)
    # then the server continues at round ckpt.round + 1 (see cllora.fed.server.run_experiment)

``open_resume`` reads the run's saved ``config.yaml``; a config given with ``--resume`` must
resolve to the same experiment: any differing key (other than ``progress``, ``out_dir`` and
``run_name``) is refused with the list of keys. It loads the newest intact checkpoint (every file
checksummed, :mod:`cllora.fed.checkpoint`), refuses a ``config.yaml`` edited since that checkpoint
(the checkpoint holds the config it was made with) and data files that changed since the run
started (:mod:`cllora.data.fingerprint`; the samples are compared too, once rebuilt, by the
server), and cuts ``metrics.jsonl`` back to the records of the rounds that checkpoint covers, so
the resumed run's metrics read exactly as an uninterrupted run's.

A run directory with a ``config.yaml`` but no round checkpoint at all (its start failed or was
killed before round 0 was written) holds no results: ``open_resume`` returns no checkpoint and the
server starts the run over in the same directory (:func:`start_over`). Checkpoints that exist but
are all damaged are an error, never a silent restart.

What cllora deletes or rewrites, it must have written (docs/reliability.md):

- Every run directory holds the marker :data:`MARKER`, written when cllora creates it. A
  directory without a checkpoint is started over only when it holds the marker (a folder of the
  user's that happens to hold a ``config.yaml`` is refused, untouched) and no result
  (:func:`held_results`: a finished run whose ``checkpoint/`` was deleted is refused, never
  recomputed over). A run with an intact checkpoint but no marker (made before markers existed)
  is still resumed: its checksummed checkpoint shows that cllora wrote it.
- A deleted ``config.yaml`` is restored from the checkpoint, which holds the config.
- ``metrics.jsonl`` cannot be rebuilt: each checkpoint records how many records it held then,
  and a resume whose file is missing or shorter is refused naming it. ``clients.csv`` and
  ``samples.csv`` are recomputed when missing (:func:`cllora.fed.prepare.client_stats`); the
  final outputs (``summary.csv``, ``sample_losses.csv``, ``timing.json``, ``adapter/``) are
  written at the end of every run, resumed or not.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from cllora.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from cllora.data.fingerprint import data_changes, file_digests
from cllora.fed.checkpoint import Checkpoint, CheckpointError, load_checkpoint, round_dirs
from cllora.report.metrics import count_records

log = logging.getLogger("cllora")

# where a run reads and writes, not what it computes (eval.base_cache: cllora/eval_cache.py)
_IGNORED = {"progress", "out_dir", "run_name", "eval.base_cache"}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k != "fields":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ (ignoring progress, out_dir, run_name, eval.base_cache)."""
    fa, fb = _flatten(config_to_dict(a)), _flatten(config_to_dict(b))
    return sorted(k for k in fa if k not in _IGNORED and fa[k] != fb.get(k))


def truncate_metrics(path: Path, last_round: int) -> int:
    """Keep the records of rounds <= ``last_round`` (and those without a round); return kept."""
    if not path.exists():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if record.get("round", -1) <= last_round:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
    return len(kept)


MARKER = ".cllora-run"  # written into every run directory cllora creates
# what only a run that got past round 0 writes: its presence means results
RESULTS = ("summary.csv", "sample_losses.csv", "timing.json", "adapter")


def mark_run_dir(run_dir: Path) -> None:
    """Write :data:`MARKER` (JSON: when and by what) into a run directory cllora created."""
    from cllora import __version__

    stamp = {"cllora": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (Path(run_dir) / MARKER).write_text(json.dumps(stamp) + "\n", encoding="utf-8")


def is_marked(run_dir: Path) -> bool:
    """Whether cllora created ``run_dir`` (it holds :data:`MARKER`)."""
    return (Path(run_dir) / MARKER).is_file()


def held_results(run_dir: Path) -> list[str]:
    """The results ``run_dir`` holds (:data:`RESULTS`, and ``metrics.jsonl`` once it holds a
    round's record): names a restart must not delete."""
    run_dir = Path(run_dir)
    found = [name for name in RESULTS if (run_dir / name).exists()]
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        with metrics.open(encoding="utf-8", errors="replace") as fh:
            if any('"kind": "round"' in line for line in fh):
                found.append("metrics.jsonl (round records)")
    return found


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds at least one round checkpoint (intact or not)."""
    return bool(round_dirs(Path(run_dir) / "checkpoint"))


# what a run writes; start_over removes these and nothing else
_RUN_FILES = (
    "metrics.jsonl",
    "summary.csv",
    "sample_losses.csv",
    "timing.json",
    "clients.csv",
    "samples.csv",
    "run.log",
)
_RUN_DIRS = ("checkpoint", "adapter")


def start_over(run_dir: Path, keep_config: bool) -> None:
    """Remove what an unstarted run left in ``run_dir`` (its files only, and ``config.yaml``
    unless ``keep_config``), so the run can start again there."""
    names = [*_RUN_FILES, *(() if keep_config else ("config.yaml",))]
    for name in names:
        (run_dir / name).unlink(missing_ok=True)
    for name in _RUN_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def _check_saved_config(run_dir: Path, saved: Config, ckpt: Checkpoint) -> None:
    """``config.yaml`` must still be the config the checkpoint was written with."""
    if "config" not in ckpt.extra:
        return
    diff = config_diff(config_from_dict(ckpt.extra["config"]), saved)
    if diff:
        raise ConfigError(
            f"cannot resume {run_dir}: its config.yaml was edited after the run started "
            f"(differing keys: {', '.join(diff)}); restore it, or start a new run"
        )


def _check_data_files(run_dir: Path, cfg: Config, ckpt: Checkpoint) -> None:
    """The data files must be the ones the run trained on (before anything loads)."""
    old = ckpt.extra.get("data", {})
    if "files" not in old:
        return
    changes = data_changes(old, {"files": file_digests(cfg.data.path, cfg.data.format)})
    if changes:
        raise ConfigError(
            f"cannot resume {run_dir}: its data changed since the run started "
            f"({'; '.join(changes)} in {cfg.data.path}); restore the data it trained on, or "
            "start a new run"
        )


def check_restartable(run_dir: Path) -> None:
    """A run directory without a checkpoint may be started over (its files deleted) only when
    cllora created it and it holds no result; else a ConfigError says why, touching nothing."""
    if not is_marked(run_dir):
        raise ConfigError(
            f"{run_dir} is not a cllora run (no {MARKER} marker, no checkpoint): nothing there "
            "is deleted; start the run under another run_name"
        )
    results = held_results(run_dir)
    if results:
        raise ConfigError(
            f"{run_dir} holds the results of a run ({', '.join(results)}) but no checkpoint/ "
            "to resume from; cllora never overwrites results: start the run under another "
            "run_name (or move them away)"
        )


def _checkpoint_of(run_dir: Path) -> Checkpoint:
    try:
        ckpt = load_checkpoint(run_dir / "checkpoint")
    except CheckpointError as err:
        raise ConfigError(f"cannot resume {run_dir}: {err}") from None
    if "rng" not in ckpt.extra:
        raise ConfigError(
            f"cannot resume {run_dir}: its checkpoint predates resumable runs (no RNG states)"
        )
    return ckpt


def _saved_config(run_dir: Path, ckpt: Checkpoint | None) -> Config:
    """``config.yaml``, or (deleted) the config the checkpoint holds."""
    path = run_dir / "config.yaml"
    if path.is_file():
        return load_config(path)
    if ckpt is None or "config" not in ckpt.extra:
        raise ConfigError(
            f"{run_dir} is not a cllora run directory (no config.yaml and no checkpoint); "
            "pass the directory of a run cllora started"
        )
    return config_from_dict(ckpt.extra["config"])


def _check_metrics(run_dir: Path, ckpt: Checkpoint) -> None:
    """``metrics.jsonl`` holds at least the records it held at the checkpoint (it cannot be
    rebuilt: the evaluations and partition records of earlier rounds are only there)."""
    path, want = run_dir / "metrics.jsonl", ckpt.extra.get("metrics_records")
    if not path.is_file():
        raise ConfigError(
            f"cannot resume {run_dir}: its metrics.jsonl is missing (the records of rounds "
            f"0-{ckpt.round} cannot be rebuilt); restore it, or start a new run"
        )
    have = count_records(path)
    if want is not None and have < want:
        raise ConfigError(
            f"cannot resume {run_dir}: its metrics.jsonl holds {have} records, the checkpoint of "
            f"round {ckpt.round} was written after {want}; restore the file, or start a new run"
        )


def open_resume(
    run_dir: Path, requested: Config | None = None, truncate: bool = True
) -> tuple[Config, Checkpoint | None]:
    """The run's config and its newest intact checkpoint (None: the run never wrote one, start
    it over); refuses a different config, an edited config.yaml, changed data, lost metrics and
    a directory cllora may not restart (:func:`check_restartable`). Nothing is changed before
    every check passed; then a deleted ``config.yaml`` is restored from the checkpoint.
    ``truncate=False`` leaves ``metrics.jsonl`` alone (ranks other than 0 of a distributed run).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory; pass the directory of a cllora run")
    ckpt = _checkpoint_of(run_dir) if has_checkpoint(run_dir) else None
    if ckpt is None:
        if not (run_dir / "config.yaml").is_file():
            _saved_config(run_dir, None)  # raises: not a run directory
        check_restartable(run_dir)
    saved = _saved_config(run_dir, ckpt)
    if requested is not None:
        diff = config_diff(saved, requested)
        if diff:
            raise ConfigError(
                f"cannot resume {run_dir} with a different config; differing keys: "
                f"{', '.join(diff)} (resume without a config, or start a new run)"
            )
    if ckpt is None:
        return (requested if requested is not None else saved), None
    _check_saved_config(run_dir, saved, ckpt)
    _check_data_files(run_dir, saved, ckpt)
    if truncate:
        _check_metrics(run_dir, ckpt)
        if not (run_dir / "config.yaml").is_file():
            save_config(saved, run_dir / "config.yaml")
            log.warning(
                "%s: config.yaml was missing; restored from the checkpoint of round %d",
                run_dir, ckpt.round,
            )  # fmt: skip
        if not is_marked(run_dir):  # made before markers, or the marker was deleted
            mark_run_dir(run_dir)
        truncate_metrics(run_dir / "metrics.jsonl", ckpt.round)
    return (requested if requested is not None else saved), ckpt
