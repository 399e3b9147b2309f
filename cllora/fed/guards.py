"""Run guards: what stops a federated run, and the finiteness checks that stop it.

Usage::

    from cllora.fed.guards import NonFiniteError, check_finite, non_finite
    non_finite({"m.lora_A": torch.tensor([1.0, float("nan")])})   # ['m.lora_A (1 of 2)']
    check_finite(state, "client c's update")     # raises NonFiniteError naming the tensors

A NaN or an infinity must never reach an aggregate, a checkpoint, ``summary.csv`` or an exported
adapter. Where each check sits (:mod:`cllora.fed.server`): every client update
before aggregation and every local-model evaluation (a bad one makes that client a failed client
of the round, logged as ``client_failed`` like a NaN training loss); the aggregated global adapter,
the server optimizer's state and every global evaluation (a bad one stops the run with
:class:`NonFiniteModelError`, keeping the last good checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self

import torch


class RunStopped(RuntimeError):
    """The run cannot go on; the checkpoint of its last complete round is kept (exit status 1)."""


class TooFewClientsError(RunStopped):
    """Fewer clients than fed.min_clients finished a round; the last checkpoint is kept."""

    @classmethod
    def of(cls, r: int, finished: int, trainees: int, min_clients: int, run_dir: Path) -> Self:
        """The error of round ``r`` (in-process and Flower runs say the same)."""
        return cls(
            f"round {r}: only {finished} of {trainees} clients finished local training, fewer "
            f"than fed.min_clients={min_clients}; the global adapter of round {r - 1} is in "
            f"{run_dir / 'checkpoint'}"
        )


class NonFiniteModelError(RunStopped):
    """The global model became non-finite (its adapter, server state or evaluation)."""


class NonFiniteError(FloatingPointError):
    """A tensor or a loss is NaN or infinite (a client's update, a local evaluation)."""


def _walk(tree: Any, prefix: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        yield prefix or "tensor", tree
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else str(k))


def non_finite(tree: Any) -> list[str]:
    """``"name (bad of total)"`` for every floating tensor of a (nested) state dict holding a
    NaN or an infinity; empty when all are finite."""
    out = []
    for name, t in _walk(tree):
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                out.append(f"{name} ({bad} of {t.numel()})")
    return out


def check_finite(tree: Any, what: str) -> None:
    """Raise :class:`NonFiniteError` when any tensor of ``tree`` is not finite."""
    bad = non_finite(tree)
    if bad:
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        raise NonFiniteError(f"{what} holds NaN/inf values: {', '.join(bad[:3])}{more}")


def non_finite_values(values: Mapping[str, float]) -> list[str]:
    """Names of the values that are NaN or infinite."""
    return [k for k, v in values.items() if not math.isfinite(v)]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped a run; ``run_dir`` is the directory to resume, or None when
    the run had not written its first checkpoint (nothing to resume: run it again)."""

    def __init__(self, run_dir: Path | None) -> None:
        super().__init__(str(run_dir) if run_dir else "")
        self.run_dir = run_dir
