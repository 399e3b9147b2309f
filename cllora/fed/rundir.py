"""Run directories: where a run writes, and what a failed start leaves (nothing that blocks).

Usage::

    from cllora.fed.rundir import attach_log_file, make_run_dir, remove_unstarted
    run_dir = make_run_dir(cfg)          # out_dir/run_name (or a timestamp), created empty
    handler = attach_log_file(run_dir)   # run.log
    remove_unstarted(run_dir)            # a start that failed before its first checkpoint

The rules (docs/reliability.md): a named directory holding a run (a round checkpoint) or any
result of one (:func:`cllora.fed.resume.held_results`, e.g. a finished run whose ``checkpoint/``
was deleted) is never reused; one that cllora created (its marker
:data:`cllora.fed.resume.MARKER`) and that a start left before its first checkpoint is reused;
anything else is refused. ``out_dir`` must be a writable directory (created when missing).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from cllora.config import Config, ConfigError
from cllora.fed.resume import check_restartable, has_checkpoint, mark_run_dir, start_over

log = logging.getLogger("cllora")


def out_root(cfg: Config) -> Path:
    """``out_dir``, created if missing; a path that cannot hold runs is a ConfigError."""
    root = Path(cfg.out_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"out_dir {root} is not a directory; set out_dir to a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"out_dir {root} cannot be created ({err.strerror}); set out_dir to a writable "
            "directory"
        ) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir {root} is not writable; set out_dir to a writable directory")
    return root


def make_run_dir(cfg: Config) -> Path:
    """``out_dir/run_name`` or ``out_dir/<timestamp>``, created empty and marked.

    A named directory that holds a run (a round checkpoint) is refused; one cllora created that
    a start left before its first checkpoint holds no results and is reused, so a failed start
    never blocks a retry; one that holds results, or that cllora did not create, is refused
    (cllora deletes nothing it did not write)."""
    root = out_root(cfg)
    name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = root / name
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} exists and is not a directory; choose another run_name")
    if run_dir.exists() and any(run_dir.iterdir()):
        if cfg.run_name and has_checkpoint(run_dir):
            raise FileExistsError(
                f"run directory {run_dir} already holds a run; choose another run_name, remove "
                f"it, or continue it with: cllora run --resume {run_dir}"
            )
        if cfg.run_name:
            try:
                check_restartable(run_dir)
            except ConfigError as err:
                raise FileExistsError(str(err)) from None
            log.info("run directory %s holds an unstarted run (no checkpoint): reusing it", run_dir)
            start_over(run_dir, keep_config=False)
        else:
            suffix = 1
            while (root / f"{name}-{suffix}").exists():
                suffix += 1
            run_dir = root / f"{name}-{suffix}"
    run_dir.mkdir(parents=True, exist_ok=True)
    mark_run_dir(run_dir)
    return run_dir


def attach_log_file(run_dir: Path) -> logging.Handler:
    """Log the ``cllora`` logger into ``run_dir/run.log`` (remove the handler when done)."""
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("cllora").addHandler(handler)
    logging.getLogger("cllora").setLevel(logging.INFO)
    return handler


def remove_unstarted(run_dir: Path | None) -> None:
    """Remove a run directory this process created when it holds no checkpoint yet."""
    if run_dir is not None and run_dir.is_dir() and not has_checkpoint(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
