"""Round checkpoints: the global adapter, the server optimizer's state and the round reached.

Usage::

    save_checkpoint(run_dir / "checkpoint", 3, global_state, server_state, rows, extra={...})
    ckpt = load_checkpoint(run_dir / "checkpoint")  # newest intact one: Checkpoint(round, ...)

Layout: ``checkpoint/round-0003/`` holding ``adapter.safetensors``, ``server_state.safetensors``
and ``state.json`` (round, summary rows, server-optimizer scalars, ``extra`` such as RNG states,
the config and the data fingerprint, and the SHA-256 of both tensor files). ``state.json`` also
carries the SHA-256 of its own canonical content (``self_sha256``), so every file of a checkpoint
is covered: an edited or damaged ``state.json`` is detected like a damaged tensor file. Each
round directory is written under a temporary name and renamed when complete, so a run killed
while writing never leaves a half checkpoint under a real name; the two newest are kept.
:func:`load_checkpoint` verifies the checksums and falls back to the previous checkpoint, with a
warning, when the newest is damaged (e.g. truncated on disk) or edited.
Tensors go to safetensors only (never pickle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cllora.data.fingerprint import sha256_file
from cllora.files import as_umask

log = logging.getLogger("cllora")
_SEP = "/"
KEEP = 2


class CheckpointError(RuntimeError):
    """No intact checkpoint could be read."""


@dataclass
class Checkpoint:
    round: int
    global_state: dict[str, torch.Tensor]
    server_state: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _split(tree: dict[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """Nested dict -> (flat tensors keyed "a/b/c", the same tree with tensors left out)."""
    tensors, rest = {}, {}
    for k, v in tree.items():
        if isinstance(v, torch.Tensor):
            tensors[prefix + k] = v.detach().cpu().contiguous()
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
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``directory/round-NNNN`` atomically; keep the two newest round checkpoints."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"round-{round_idx:04d}"
    tmp = directory / f".tmp-round-{round_idx:04d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in global_state.items()},
        str(tmp / "adapter.safetensors"),
    )
    server_tensors, server_rest = _split(server_state)
    save_file(server_tensors, str(tmp / "server_state.safetensors"))
    meta = {
        "round": round_idx,
        "server_state": server_rest,
        "rows": rows,
        "extra": extra or {},
        "sha256": {
            f: sha256_file(tmp / f) for f in ("adapter.safetensors", "server_state.safetensors")
        },
    }
    meta = json.loads(json.dumps(meta))  # the digest is of what a reader gets back
    meta["self_sha256"] = _meta_digest(meta)
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    as_umask(tmp)  # safetensors writes 0600
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in round_dirs(directory)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def round_dirs(directory: Path) -> list[Path]:
    """Round checkpoint directories, newest first."""
    return sorted(directory.glob("round-*"), reverse=True) if directory.is_dir() else []


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of ``state.json``'s content without its own digest (canonical JSON)."""
    body = {k: v for k, v in meta.items() if k != "self_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read(path: Path) -> Checkpoint:
    meta = json.loads((path / "state.json").read_text())
    if "self_sha256" not in meta:
        raise CheckpointError(
            f"{path / 'state.json'}: no checksum of its own (written before cllora checksummed "
            "state.json); it cannot be verified"
        )
    if _meta_digest(meta) != meta["self_sha256"]:
        raise CheckpointError(f"{path / 'state.json'}: checksum mismatch (edited or damaged)")
    for name, digest in meta["sha256"].items():
        if sha256_file(path / name) != digest:
            raise CheckpointError(f"{path / name}: checksum mismatch (damaged or truncated)")
    server = _join(load_file(str(path / "server_state.safetensors")), meta["server_state"])
    return Checkpoint(
        round=int(meta["round"]),
        global_state=load_file(str(path / "adapter.safetensors")),
        server_state=server,
        rows=meta["rows"],
        extra=meta.get("extra", {}),
        path=path,
    )


def load_checkpoint(directory: Path) -> Checkpoint:
    """The newest intact checkpoint under ``directory`` (falls back past damaged ones)."""
    errors = []
    for path in round_dirs(Path(directory)):
        try:
            ckpt = _read(path)
        except (OSError, ValueError, KeyError, TypeError, CheckpointError) as err:
            log.warning("checkpoint %s is unusable (%s); trying the previous one", path, err)
            errors.append(f"{path.name}: {err}")
            continue
        return ckpt
    raise CheckpointError(f"no intact checkpoint in {directory}: {'; '.join(errors) or 'none'}")


def rng_states(*rngs: random.Random) -> list[dict[str, Any]]:
    """JSON-able states of Python RNGs (client sampling, simulated failures)."""
    out = []
    for rng in rngs:
        version, internal, gauss = rng.getstate()
        out.append({"version": version, "state": list(internal), "gauss": gauss})
    return out


def set_rng_states(states: list[dict[str, Any]], *rngs: random.Random) -> None:
    """Restore Python RNGs from :func:`rng_states` (a checkpoint's ``extra["rng"]``)."""
    for s, rng in zip(states, rngs, strict=True):
        rng.setstate((s["version"], tuple(s["state"]), s["gauss"]))
