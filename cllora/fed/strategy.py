"""Aggregation maths: pure functions over adapter-only state dicts.

Usage::

    from cllora.fed.strategy import client_weights, exact_aggregate, fedavg, fedavg_factors

    w = client_weights([1200, 800], "tokens")                  # [0.6, 0.4]
    res = fedavg_factors(global_state, [state_a, state_b], w, [2.0, 4.0], global_scaling=2.0)
    res.state, res.info               # the new global adapter; rank method, rank, scalings, ...
    res = exact_aggregate(global_state, [state_a, state_b], w, [2.0, 4.0], global_scaling=2.0)

    global_state = fedavg([state_a, state_b], w)               # plain FedAvg (equal shapes)

The functions here know no algorithm names: each algorithm of :mod:`cllora.fed.algorithms`
calls the maths it needs (the server optimizers of Reddi et al., 2021 live in
:mod:`cllora.fed.algorithms._fedopt` and one file each, on the :func:`pseudo_gradient` computed
here). Every function works over ``<module>.lora_A`` (r, in) / ``<module>.lora_B`` (out, r) pairs
whose update is ``s * B @ A`` (``s = alpha / r``, the scaling):

- :func:`fedavg_factors`: ``A = sum_k w_k A_k``, ``B = sum_k w_k B_k`` (the common baseline; note
  that mean(B) mean(A) != mean(B A)).
- :func:`pseudo_gradient`: ``d = fedavg(clients) - global``, which a server optimizer steps on
  (``d`` is exactly 0 where the clients did not move).
- :func:`exact_aggregate`: the rank-r truncated SVD of ``sum_k w_k s_k B_k A_k``, re-factored into
  the global rank r (``global_scaling * B A`` is the truncation; exact when the sum has rank
  <= r), computed from the stacked factors without the dense (out, in) product
  (:mod:`cllora.fed.lora_algebra`).
- :func:`frozen_a_aggregate` (FFA-LoRA): every client's A must equal the global A; only B is
  averaged, which is then exact.

Ranks may differ between clients: the FedAvg family zero-pads every A (rows) and B (columns) to
``R = max(global rank, client ranks)`` (:func:`pad_clients`) and returns a rank-R global
(``info["rank_method"] == "zero-padding"``); ``exact`` stacks the factors and returns the global
rank (``"stacked-factors-svd"``); :func:`to_client_rank` re-factors a global adapter down to a
low-rank client's rank. Scalings (``client_scalings``, ``global_scaling``) default to the other
side's common value, else 1. Where they differ, the FedAvg family averages ``sqrt(s_k / s) A_k``
and ``sqrt(s_k / s) B_k`` (``frozen_a``: ``(s_k / s) B_k``) so that each client's own update reads
the same under the global scaling. All maths runs in fp32; results have the global's dtypes;
inputs are never mutated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cllora.fed.lora_algebra import (
    A_SUFFIX,
    B_SUFFIX,
    SPLITS,
    lowrank_svd,
    modules_of,
    pad_tensor,
    refactor,
    to_client_rank,
)

__all__ = [
    "WEIGHTINGS",
    "AggregateResult",
    "Inputs",
    "check_inputs",
    "client_weights",
    "exact_aggregate",
    "fedavg",
    "fedavg_factors",
    "frozen_a_aggregate",
    "pad_clients",
    "pseudo_gradient",
    "to_client_rank",
]

WEIGHTINGS = ("uniform", "samples", "tokens", "quality")

State = dict[str, torch.Tensor]


@dataclass
class AggregateResult:
    state: State  # the new global adapter
    server_state: dict[str, Any]  # the server optimizer's state for the next round ({}: none)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Inputs:
    """One aggregation's checked inputs: the module names, each client's scaling and the
    global one, and the ``info`` every aggregation starts its record with."""

    mods: list[str]
    scales: list[float]
    g_scale: float
    info: dict[str, Any]


def client_weights(counts: Sequence[float], weighting: str) -> list[float]:
    """Normalised aggregation weights.

    ``uniform``: ``1/n`` (``counts`` only gives n); ``samples``, ``tokens``, ``quality``:
    proportional to the per-client numbers passed (sample counts, token counts, quality scores
    where higher is better). Entries must be finite and >= 0, with a positive total.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
    if not counts:
        raise ValueError("no clients to weight")
    values = [float(c) for c in counts]
    bad = [i for i, c in enumerate(values) if not math.isfinite(c) or c < 0]
    if bad:
        raise ValueError(
            f"{weighting} weighting needs finite entries >= 0; clients {bad} have "
            f"{[values[i] for i in bad]}"
        )
    if weighting == "uniform":
        return [1.0 / len(values)] * len(values)
    total = sum(values)
    if total <= 0:
        raise ValueError(f"{weighting} weighting needs a positive total, got {values}")
    return [c / total for c in values]


def fedavg(states: Sequence[State], weights: Sequence[float]) -> State:
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
        shapes = [k for k in keys if s[k].shape != states[0][k].shape]
        if shapes:
            raise ValueError(
                f"client state {i} has other shapes than client 0 at {shapes[:5]}; mixed LoRA "
                "ranks: use fedavg_factors, which zero-pads"
            )
    out = {}
    for k in keys:
        acc = torch.zeros_like(states[0][k], dtype=torch.float32)
        for s, w in zip(states, weights, strict=True):
            acc.add_(s[k].float(), alpha=float(w))
        out[k] = acc.to(states[0][k].dtype)
    return out


def check_inputs(
    name: str,
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
    client_scalings: Sequence[float] | None = None,
    global_scaling: float | None = None,
) -> Inputs:
    """Check keys, in/out shapes, weights and scalings; ``name`` opens ``info["strategy"]``.

    ``weights``: one per client, >= 0, summing to 1 (:func:`client_weights`).
    ``client_scalings``: each client's ``alpha / r_k``; ``global_scaling``: the global adapter's.
    """
    mods = _checked_modules(global_state, client_states, weights)
    scales, g_scale = _scalings(client_scalings, global_scaling, len(client_states))
    info: dict[str, Any] = {
        "strategy": name,
        "global_scaling": g_scale,
        "client_ranks": [max(c[m + A_SUFFIX].shape[0] for m in mods) for c in client_states],
    }
    return Inputs(mods, scales, g_scale, info)


def fedavg_factors(
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
    client_scalings: Sequence[float] | None = None,
    global_scaling: float | None = None,
) -> AggregateResult:
    """FedAvg of the LoRA factors, mixed ranks zero-padded to the largest (``strategy`` in the
    info: ``fedavg``); see the module doc."""
    args = check_inputs(
        "fedavg", global_state, client_states, weights, client_scalings, global_scaling
    )
    _, padded = pad_clients(global_state, client_states, args)
    new_x = fedavg(padded, weights)
    state = {k: new_x[k].to(global_state[k].dtype) for k in global_state}
    return AggregateResult(state, {}, args.info)


def pseudo_gradient(
    global_state: State, client_states: Sequence[State], weights: Sequence[float], args: Inputs
) -> tuple[State, State]:
    """``(x, d)``: the fp32 global zero-padded to the largest rank and ``d = sum_k w_k (x_k - x)``
    (``fedavg(clients) - x``; exactly 0 where the clients did not move)."""
    x, padded = pad_clients(global_state, client_states, args)
    return x, fedavg([{k: p[k] - x[k] for k in x} for p in padded], weights)


def _checked_modules(
    global_state: State, client_states: Sequence[State], weights: Sequence[float]
) -> list[str]:
    """Module names, after checking keys, in/out shapes and the weights."""
    if not client_states:
        raise ValueError("aggregate needs at least one client state")
    if len(client_states) != len(weights):
        raise ValueError(f"{len(client_states)} client states but {len(weights)} weights")
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) or x < 0 for x in w) or abs(sum(w) - 1) > 1e-6:
        raise ValueError(f"weights must be finite, >= 0 and sum to 1 (client_weights), got {w}")
    mods = modules_of(global_state)
    if not mods:
        raise ValueError("the global adapter has no LoRA tensors")
    for i, c in enumerate(client_states):
        if c.keys() != global_state.keys():
            diff = sorted(set(c) ^ set(global_state))[:5]
            raise ValueError(f"client state {i} has different keys from the global adapter: {diff}")
        modules_of(c)
        for m in mods:
            a, b = c[m + A_SUFFIX], c[m + B_SUFFIX]
            ga, gb = global_state[m + A_SUFFIX], global_state[m + B_SUFFIX]
            if a.shape[1] != ga.shape[1] or b.shape[0] != gb.shape[0]:
                raise ValueError(
                    f"client state {i}, module {m!r}: A {tuple(a.shape)} / B {tuple(b.shape)} "
                    f"do not match the global (in={ga.shape[1]}, out={gb.shape[0]})"
                )
    return mods


def _scalings(
    client_scalings: Sequence[float] | None, global_scaling: float | None, n: int
) -> tuple[list[float], float]:
    """Each client's scaling and the global one; a missing side takes the other's, else 1."""
    if client_scalings is not None and len(client_scalings) != n:
        raise ValueError(f"{len(client_scalings)} client scalings for {n} clients")
    if client_scalings is None:
        scales = [1.0 if global_scaling is None else float(global_scaling)] * n
    else:
        scales = [float(s) for s in client_scalings]
    if global_scaling is None:
        if len(set(scales)) > 1:
            raise ValueError(f"client scalings differ ({scales}): pass global_scaling")
        global_scaling = scales[0]
    if not all(math.isfinite(s) and s > 0 for s in [*scales, global_scaling]):
        raise ValueError(f"scalings must be finite and > 0, got {scales} and {global_scaling}")
    return scales, float(global_scaling)


def pad_clients(
    global_state: State, client_states: Sequence[State], args: Inputs
) -> tuple[State, list[State]]:
    """fp32 global and clients (scalings folded), zero-padded per module to the largest rank;
    records the rank method, rank and folding in ``args.info``."""
    x: State = {}
    padded: list[State] = [{} for _ in client_states]
    folds = [math.sqrt(s / args.g_scale) for s in args.scales]
    mixed, ranks = False, {}
    for m in args.mods:
        ranks_m = [c[m + A_SUFFIX].shape[0] for c in [global_state, *client_states]]
        r = ranks[m] = max(ranks_m)
        mixed = mixed or len(set(ranks_m)) > 1
        for k in (m + A_SUFFIX, m + B_SUFFIX):
            x[k] = pad_tensor(k, global_state[k].float(), r)
            for p, c, f in zip(padded, client_states, folds, strict=True):
                p[k] = pad_tensor(k, c[k].float() * f if f != 1 else c[k].float(), r)
    info = args.info
    info["rank_method"] = "zero-padding" if mixed else "same-rank"
    info["rank"] = max(ranks.values())
    info["scaling_folded"] = any(f != 1 for f in folds)
    grew = [m for m in args.mods if ranks[m] > global_state[m + A_SUFFIX].shape[0]]
    if grew:
        info["rank_grew"] = grew
    return x, padded


def exact_aggregate(
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
    client_scalings: Sequence[float] | None = None,
    global_scaling: float | None = None,
    factor_split: str = "sqrt",
) -> AggregateResult:
    """Truncated SVD of ``sum_k w_k s_k B_k A_k`` into the global rank (stacked factors).

    ``factor_split``: ``"sqrt"`` (``B = U sqrt(S)``, ``A = sqrt(S) V^T``) or ``"b"``
    (``A = V^T``). The info has the discarded energy per module and in total."""
    if factor_split not in SPLITS:
        raise ValueError(f"factor_split must be one of {SPLITS}, got {factor_split!r}")
    args = check_inputs(
        "exact", global_state, client_states, weights, client_scalings, global_scaling
    )
    coefs = [float(w) * s for w, s in zip(weights, args.scales, strict=True)]
    used = [i for i, c in enumerate(coefs) if c > 0]
    out, energy = {}, {}
    disc_sum = total_sum = 0.0
    for m in args.mods:
        ga = global_state[m + A_SUFFIX]
        U, S, Vh = lowrank_svd(
            [client_states[i][m + B_SUFFIX] for i in used],
            [client_states[i][m + A_SUFFIX] for i in used],
            [coefs[i] for i in used],
        )
        A, B, disc, total = refactor(U, S, Vh, ga.shape[0], args.g_scale, factor_split, ga)
        out[m + A_SUFFIX] = A.to(ga.dtype)
        out[m + B_SUFFIX] = B.to(global_state[m + B_SUFFIX].dtype)
        energy[m] = disc / total if total > 0 else 0.0
        disc_sum, total_sum = disc_sum + disc, total_sum + total
    info = args.info
    info["rank_method"] = "stacked-factors-svd"
    info["rank"] = max(global_state[m + A_SUFFIX].shape[0] for m in args.mods)
    info["discarded_energy"] = energy
    info["discarded_energy_total"] = disc_sum / total_sum if total_sum > 0 else 0.0
    return AggregateResult(out, {}, info)


def frozen_a_aggregate(
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
    client_scalings: Sequence[float] | None = None,
    global_scaling: float | None = None,
    atol: float = 0.0,
) -> AggregateResult:
    """FFA-LoRA: A stays the global's, ``B = sum_k w_k (s_k / s) B_k`` (exact: A is shared).

    ``atol``: the largest ``|A_k - A|`` accepted (0: bitwise equal)."""
    if not atol >= 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    args = check_inputs(
        "frozen_a", global_state, client_states, weights, client_scalings, global_scaling
    )
    out = {}
    for m in args.mods:
        _check_shared_a(m, global_state, client_states, atol)
        ga, gb = global_state[m + A_SUFFIX], global_state[m + B_SUFFIX]
        acc = torch.zeros_like(gb, dtype=torch.float32)
        for c, w, s in zip(client_states, weights, args.scales, strict=True):
            acc.add_(c[m + B_SUFFIX].float(), alpha=float(w) * s / args.g_scale)
        out[m + A_SUFFIX], out[m + B_SUFFIX] = ga.clone(), acc.to(gb.dtype)
    args.info["rank_method"] = "frozen-a"
    args.info["rank"] = max(global_state[m + A_SUFFIX].shape[0] for m in args.mods)
    return AggregateResult(out, {}, args.info)


def _check_shared_a(
    m: str, global_state: State, client_states: Sequence[State], atol: float
) -> None:
    """ValueError unless every client's ``m.lora_A`` is the global A (within ``atol``)."""
    ga = global_state[m + A_SUFFIX]
    for i, c in enumerate(client_states):
        a = c[m + A_SUFFIX]
        if a.shape != ga.shape:
            raise ValueError(
                f"frozen_a: client {i}'s {m}.lora_A is {tuple(a.shape)}, the global's "
                f"{tuple(ga.shape)}; FFA-LoRA needs one shared A (use exact for mixed ranks)"
            )
        gap = float((a.float() - ga.float()).abs().max())
        if not gap <= atol:
            raise ValueError(
                f"frozen_a: client {i}'s {m}.lora_A differs from the global A (max |diff| "
                f"{gap:.3g} > {atol:g}); FFA-LoRA clients must keep A frozen"
            )
