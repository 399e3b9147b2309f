"""Resuming a killed run from its last complete round.

Usage::

    from cllora.fed.resume import open_resume
    cfg, ckpt = open_resume(Path("runs/x"), requested=cfg_or_None)
    # then the server continues at round ckpt.round + 1 (see cllora.fed.server.run_experiment)

``open_resume`` reads the run's saved ``config.yaml``; a config given with ``--resume`` must
resolve to the same experiment: any differing key (other than ``progress``, ``out_dir`` and
``run_name``) is refused with the list of keys. It loads the newest intact checkpoint and cuts
``metrics.jsonl`` back to the records of the rounds that checkpoint covers, so the resumed run's
metrics read exactly as an uninterrupted run's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cllora.config import Config, ConfigError, config_to_dict, load_config
from cllora.fed.checkpoint import Checkpoint, CheckpointError, load_checkpoint

_IGNORED = {"progress", "out_dir", "run_name"}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k != "fields":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ (ignoring progress, out_dir, run_name)."""
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


def open_resume(
    run_dir: Path, requested: Config | None = None, truncate: bool = True
) -> tuple[Config, Checkpoint]:
    """The run's config and its newest intact checkpoint; refuses a different config.
    ``truncate=False`` leaves ``metrics.jsonl`` alone (ranks other than 0 of a distributed run).
    """
    run_dir = Path(run_dir)
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"{run_dir} is not a cllora run directory (no config.yaml)")
    saved = load_config(saved_path)
    if requested is not None:
        diff = config_diff(saved, requested)
        if diff:
            raise ConfigError(
                f"cannot resume {run_dir} with a different config; differing keys: "
                f"{', '.join(diff)} (resume without a config, or start a new run)"
            )
    try:
        ckpt = load_checkpoint(run_dir / "checkpoint")
    except CheckpointError as err:
        raise ConfigError(f"cannot resume {run_dir}: {err}") from err
    if "rng" not in ckpt.extra:
        raise ConfigError(
            f"cannot resume {run_dir}: its checkpoint predates resumable runs (no RNG states)"
        )
    if truncate:
        truncate_metrics(run_dir / "metrics.jsonl", ckpt.round)
    return (requested if requested is not None else saved), ckpt
