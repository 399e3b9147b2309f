"""Round checkpoints: the global adapter, the server optimizer's state and the round reached.

Usage::

    save_checkpoint(run_dir / "checkpoint", round_idx=3, global_state=g, server_state=s, rows=rows)
    ckpt = load_checkpoint(run_dir / "checkpoint")    # Checkpoint(round, global_state, ...)

Written atomically: into a temporary sibling directory, then renamed over the previous one, so
a run killed while writing keeps the last complete checkpoint. Tensors go to safetensors (never
pickle); everything else (round, summary rows, server-optimizer scalars) to ``state.json``.
Resuming a run from it (``cllora run --resume``) is the scale-out issue's work.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_SEP = "/"


@dataclass
class Checkpoint:
    round: int
    global_state: dict[str, torch.Tensor]
    server_state: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


def _split(tree: dict[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """Nested dict -> (flat tensors keyed "a/b/c", the same tree with tensors left out)."""
    tensors, rest = {}, {}
    for k, v in tree.items():
        if isinstance(v, torch.Tensor):
            tensors[prefix + k] = v.contiguous()
        elif isinstance(v, dict):
            sub_t, sub_r = _split(v, prefix + k + _SEP)
            tensors.update(sub_t)
            rest[k] = sub_r
        else:
            rest[k] = v
    return tensors, rest


def _join(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = json.loads(json.dumps(rest))
    for key, t in tensors.items():
        *path, leaf = key.split(_SEP)
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = t
    return tree


def save_checkpoint(
    directory: Path,
    round_idx: int,
    global_state: dict[str, torch.Tensor],
    server_state: dict[str, Any],
    rows: list[dict[str, Any]],
) -> Path:
    """Write a checkpoint directory atomically (replacing the previous one)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in global_state.items()}, str(tmp / "adapter.safetensors")
    )
    server_tensors, server_rest = _split(server_state)
    save_file(server_tensors, str(tmp / "server_state.safetensors"))
    meta = {"round": round_idx, "server_state": server_rest, "rows": rows}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def load_checkpoint(directory: Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    directory = Path(directory)
    meta = json.loads((directory / "state.json").read_text())
    server = _join(load_file(str(directory / "server_state.safetensors")), meta["server_state"])
    return Checkpoint(
        round=int(meta["round"]),
        global_state=load_file(str(directory / "adapter.safetensors")),
        server_state=server,
        rows=meta["rows"],
    )
