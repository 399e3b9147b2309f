"""Aggregation strategies: pure functions over adapter-only state dicts.

Usage::

    from cllora.fed.strategy import fedavg, client_weights
    w = client_weights([120, 80], "samples")     # [0.6, 0.4]
    global_state = fedavg([state_a, state_b], w)

FedAvg here averages LoRA's A and B separately, ``A = sum_k w_k A_k`` and ``B = sum_k w_k B_k``
(the common baseline; note that mean(B) mean(A) != mean(B A) — exact aggregation is the
strategies issue's). Accumulation is in fp32; the result has the inputs' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def client_weights(counts: Sequence[float], weighting: str) -> list[float]:
    """Normalised aggregation weights: by ``samples`` (or any count given) or ``uniform``."""
    if not counts:
        raise ValueError("no clients to weight")
    if weighting == "uniform":
        return [1.0 / len(counts)] * len(counts)
    if weighting == "samples":
        total = float(sum(counts))
        if total <= 0:
            raise ValueError(f"client weights need a positive total, got counts {list(counts)}")
        return [c / total for c in counts]
    raise ValueError(f"unknown weighting {weighting!r}; allowed: 'samples', 'uniform'")


def fedavg(
    states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Weighted average of adapter state dicts with identical keys and shapes."""
    if not states:
        raise ValueError("fedavg needs at least one client state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    keys = states[0].keys()
    for i, s in enumerate(states[1:], 1):
        if s.keys() != keys:
            diff = sorted(set(s) ^ set(keys))[:5]
            raise ValueError(f"client state {i} has different keys from client 0: {diff}")
    out = {}
    for k in keys:
        acc = torch.zeros_like(states[0][k], dtype=torch.float32)
        for s, w in zip(states, weights, strict=True):
            acc.add_(s[k].float(), alpha=float(w))
        out[k] = acc.to(states[0][k].dtype)
    return out
